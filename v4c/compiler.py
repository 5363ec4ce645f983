"""``v4c.compile``: checkpoint directory -> verified graph -> artifact directory.

The artifact is written into a temporary sibling directory and renamed into place
at the end, so an interrupted compile never leaves a half-written artifact.
"""
from __future__ import annotations

import os
import platform
import shutil  # noqa: F401 - the artifact writer copies with it (tests interrupt a compile there)
import time
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .artifact.output import check_output
from .artifact.shapes import default_buckets, parse_bucket
from .artifact.writer import ArtifactWriter
from .autotune.choose import choose_configs, summarize_ops
from .autotune.store import open_for_lookup
from .codegen.emit import emit
from .errors import CheckpointError, ConfigError
from .graph.text import print_graph
from .graph.verify import verify
from .io.checkpoint import Checkpoint
from .io.naming import plan_sources
from .model.build import build_graph
from .model.config import V4Config
from .model.weight_quant import quantized_graph
from .mtp_compile import kernel_view, mtp_graph
from .passes import PassManager, default_pipeline
from .passes.pipeline import resolve_cache_formats
from .passes.shard import parallel_plan, shard_all
from .targets import resolve_target

COPY_LIMIT = 2 << 30  # weights up to this size are copied into the artifact by default


def _has_weights(model: Path) -> bool:
    return model.is_file() or any(model.glob("*.safetensors")) or (model / "model.safetensors.index.json").exists()


def _toolchain() -> dict:
    try:
        import triton  # noqa: F401
        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU machines
        triton_version = None
    return {"v4c": __version__, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version()}


def compile(model: str | os.PathLike, output: str | os.PathLike, *, target: str = "auto", dtype: str = "f32",
            weights: str = "auto", overwrite: bool = False, fuse: bool = True, kv_cache: str = "auto",
            indexer_cache: str = "auto", tuning_cache=None, world_size: int = 1, parallel: str | None = None,
            print_after: set[str] | None = None, print_after_all: bool = False, aot: bool = True,
            allow_fallback: bool = False, context: int | None = None, workers: int | None = None,
            buckets: list[str] | None = None, mtp: str = "auto",
            log: Callable[[str], None] | None = None) -> Path:
    """Compile the checkpoint (or config-only) directory ``model`` into the artifact ``output``.

    Kernel meta-parameters come from the tuning cache (``tuning_cache``: a store path, None for
    ``$V4C_CACHE_DIR``, False for none), else the cost model for GPU targets, else defaults.
    ``weights``: "copy" puts the safetensors files into the artifact, "reference" records
    their paths and header hashes, "auto" copies up to 2 GiB. A directory with only
    ``config.json`` gives a weight-free artifact that can be inspected but not run.

    For GPU targets every kernel launch of every shape bucket is compiled ahead of time at
    ``context`` tokens (default: the model's maximum) with Triton's compiler (``v4c/aot``; no GPU
    needed), which also decides the configs; ``aot=False`` skips it (configs then come unchecked
    from the tuning cache, the cost model or the defaults). A launch that cannot be compiled fails
    the compile unless ``allow_fallback`` routes it to its op's PyTorch reference. ``buckets``: the
    shape buckets ("B=1,T=1", ...) configs are chosen and compiled for (default: ``artifact/shapes.py``).

    ``mtp``: the MTP block as a graph of its own (``mtp_compile.py``): "auto" when the checkpoint holds a
    complete one, "on" always (an error when it cannot), "off" never. With it, the main graph also
    outputs its streams before ``hc_head``; both graphs go through the same passes, kernels and AOT.
    """
    log = log or (lambda s: None)
    t0 = time.perf_counter()
    model, output = Path(model), Path(output)
    cfg_path = model / "config.json" if model.is_dir() else model.parent / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{model}: no config.json found")
    if weights not in ("auto", "copy", "reference", "none"):
        raise ValueError(f"weights must be auto, copy, reference or none, got {weights!r}")
    check_output(output, model, overwrite)  # before any work: --force replaces only a v4c artifact
    cfg = V4Config.from_json_file(cfg_path)
    tgt = resolve_target(target)
    source = model if weights != "none" and _has_weights(model) else None
    mtp_g, mtp_note = mtp_graph(cfg, cfg_path, source, mtp, dtype, world_size)
    log(mtp_note)
    # quantised weights (FP8 / MXFP4 in the checkpoint, or in the config's release layout) stay quantised
    graph = verify(quantized_graph(build_graph(cfg, dtype, stream_output=mtp_g is not None), cfg_path, source))
    log(f"graph: {len(graph.nodes)} nodes, {len(graph.params)} params, {len(graph.states)} state buffers "
        f"({time.perf_counter() - t0:.2f}s)")
    kv, ix = resolve_cache_formats(cfg, dtype, kv_cache, indexer_cache)
    pm = PassManager(default_pipeline(fuse, kv, ix), print_after=print_after, print_after_all=print_after_all, out=log)
    graph = pm.run(graph)
    log(pm.report())
    if mtp_g is not None:  # the same pipeline, run on the block's graph
        pm_mtp = PassManager(default_pipeline(fuse, kv, ix), print_after=print_after, print_after_all=print_after_all,
                             out=log)
        mtp_g = pm_mtp.run(mtp_g)
        log(f"mtp graph: {len(mtp_g.nodes)} nodes, {len(mtp_g.states)} state buffers after the passes")
    par, rank_graphs = shard_all(graph, world_size, parallel) if world_size != 1 else (None, [])  # multi-GPU

    ckpt = None
    if weights != "none" and _has_weights(model):
        ckpt = Checkpoint.open(model)
        plan_sources(ckpt, dict(graph.params))
        log(f"checkpoint: {len(ckpt.files())} file(s), {len(ckpt)} tensors match the graph")
    if ckpt is None:
        asked = f" (--weights {weights} asked for weights, but {model} holds none)" if weights in ("copy", "reference") \
            else ""
        log(f"weights: none: a weight-free artifact, for inspecting, reporting and AOT checks, not for running{asked}")
    files = ckpt.files() if ckpt else []
    total = sum(f.stat().st_size for f in files)
    mode = "none" if ckpt is None else weights if weights != "auto" else ("copy" if total <= COPY_LIMIT else "reference")

    try:
        with ArtifactWriter(output, log) as w:
            w.set_config(cfg.to_dict())
            w.set_graph(print_graph(graph))
            if rank_graphs:
                w.set_parallel(parallel_plan(par, rank_graphs), [print_graph(rg) for rg in rank_graphs])
                log(f"sharded for {world_size} ranks ({par.spec()})")
            w.set_mtp(print_graph(mtp_g) if mtp_g is not None else None, mtp_note)
            both = kernel_view(graph, mtp_g)  # every call site of either graph gets its kernel and configs
            kernels = emit(both, tgt)
            buckets = [parse_bucket(b) for b in buckets] if buckets else default_buckets()
            ctx = int(context or cfg.max_position_embeddings)
            choose_configs(both, kernels, tgt, open_for_lookup(tuning_cache) if tuning_cache is not False else None,
                           buckets, ctx)
            w.add_kernel_modules(kernels.modules.values())
            if tgt != "cpu" and aot and kernels.sites:
                from .aot.build import Options, compile_ahead
                aot_entry = compile_ahead(both, kernels, w.root, buckets, ctx,
                                          Options(tgt, workers=workers, allow_fallback=allow_fallback, log=log))
                n_bad = sum(1 for x in aot_entry["launches"] if x["spill_bytes"])
                log(f"aot {tgt}: {len(aot_entry['launches'])} launches over {len(buckets)} shape buckets compiled "
                    f"({aot_entry['compiled']} compiled now, the rest cached) in {aot_entry['seconds']:.1f}s"
                    + (f"; {n_bad} spill" if n_bad else ""))
                w.set_aot(aot_entry)
            summarize_ops(kernels.ops, kernels.sites)
            log(f"kernels: {len(kernels.modules)} Triton module(s) for {len(kernels.ops)} op kinds, "
                f"{len(kernels.sites)} call sites"
                + (f"; on PyTorch references: {', '.join(kernels.fallback)}" if kernels.fallback else ""))
            w.set_kernels(kernels.table(), [b.key for b in buckets], ctx)
            if model.is_dir() and (model / "tokenizer.json").is_file():  # for `v4c run --prompt`
                w.add_tokenizer(model / "tokenizer.json")
            if mode == "copy":
                w.copy_weights(files, model / "model.safetensors.index.json" if model.is_dir() else None)
                log(f"weights: copied {total / 2**20:.1f} MiB")
            elif mode == "reference":
                w.reference_weights(model, ckpt)  # exactly these files, in this layout, are loaded
                log(f"weights: referenced {len(files)} file(s) in place ({total / 2**30:.1f} GiB)")
            else:
                w.no_weights()
            w.set_meta(target=tgt, dtype=dtype, toolchain=_toolchain(), passes=pm.applied(), kv_cache=kv,
                       indexer_cache=ix)
            w.commit()  # sealed with its digest, then put in place
    finally:
        if ckpt is not None:
            ckpt.close()
    log(f"artifact: {output}{' (weight-free)' if ckpt is None else ''} ({time.perf_counter() - t0:.2f}s)")
    return output


__all__ = ["compile", "CheckpointError"]
