"""Compile-time choice of each kernel call site's meta-parameters, per shape bucket.

For every call site (``graph/sites.py``) and shape bucket (``artifact/shapes.py``) this lists the
candidates in the order they should be tried: a tuning record (exact, same-arch, older-toolchain,
arch-family), then the cost model's best few, then the template's default. Without AOT (CPU targets)
the first candidate is taken; for GPU targets ``v4c/aot`` compiles them in that order and keeps the
best that compiles, fits and does not spill.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from ..artifact.shapes import Bucket
from ..codegen.emit import Emitted, render, template
from ..graph.ir import Graph, Node
from ..graph.registry import Concrete, get_op
from ..graph.sites import call_sites
from ..io.atomic import atomic_write_text
from .buckets import bucket_for
from .costmodel import rank
from .problems import Shapes, hardware_for, signature, toolchain
from .space import candidates
from .store import TuningStore
from ..settings import cache_dir

COST_MODEL_PICKS = 8  # cost-model candidates listed per site and bucket (AOT tries them in order)


@functools.lru_cache(maxsize=None)
def source_hash(family: str, target: str) -> str:
    return hashlib.sha256(render(family, target).encode()).hexdigest()


@functools.lru_cache(maxsize=None)
def _model_code_hash() -> str:
    """The code that turns shapes into cost-model picks: the tuning spaces and the cost model."""
    from . import costmodel, devices, space
    h = hashlib.sha256()
    for mod in (costmodel, devices, space):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


class _PicksCache:
    """The cost model's picks per (template source, kernel, shapes, device), one JSON file each under
    ``$V4C_CACHE_DIR/aot/picks``: walking a tuning space is most of a warm compile's time. The key pins
    every input, so entries never go stale; an unreadable entry is recomputed. The files hold metas
    (numbers), never code."""

    def __init__(self):
        self.root = cache_dir() / "aot" / "picks"

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps([_model_code_hash(), *parts], sort_keys=True, default=repr).encode()).hexdigest()

    def get(self, key: str):
        try:
            v = json.loads((self.root / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(v, dict) and isinstance(v.get("metas"), list) and all(isinstance(m, dict) for m in v["metas"])
        return v if ok else None

    def put(self, key: str, value: dict) -> None:
        try:
            atomic_write_text(self.root / f"{key}.json", json.dumps(value, sort_keys=True))
        except OSError:  # a read-only cache only costs time
            pass


def _cost_model_picks(graph: Graph, site: dict, node: Node, bucket: Bucket, context: int, target: str, spec,
                      dtypes: str) -> tuple[list[dict], str | None]:
    """The cost model's best COST_MODEL_PICKS metas for a site at a bucket, and a note if it could not judge."""
    fam, key = site["module"], site["kernel"]
    shapes = site_shapes(graph, node, bucket, context)
    compute = "fp8" if site["launcher"] == "QUANTIZED" else dtypes
    cache = _PicksCache()
    ck = cache.key(source_hash(fam, target), key, shapes, repr(spec), compute, context, COST_MODEL_PICKS)
    hit = cache.get(ck)
    if hit is not None:
        return hit["metas"], hit.get("note")
    try:
        cands = candidates(template(fam), key, shapes, spec)
    except Exception as e:  # noqa: BLE001 - a template that cannot judge these shapes keeps its default
        cands, note = [], f"cost model skipped: {e!r}"[:200]
    else:
        note = None
    metas = []
    if cands:
        ins, outs = concrete(graph, node, bucket, context)
        cost = get_op(node.op).cost(ins, outs, node.attr, context)
        metas = [meta for meta, _ in rank(cands, cost, shapes, spec, compute)[:COST_MODEL_PICKS]]
    cache.put(ck, {"metas": metas, "note": note})
    return metas, note


def concrete(graph: Graph, node: Node, bucket: Bucket, context: int):
    bind = {"B": bucket.batch, "T": bucket.tokens, "L": context}
    types = graph.value_types()
    ins = [Concrete(types[v].concrete(bind), types[v].dtype) for v in node.inputs]
    outs = [Concrete(types[v].concrete(bind), types[v].dtype) for v in node.outputs]
    return ins, outs


def site_shapes(graph: Graph, node: Node, bucket: Bucket, context: int) -> Shapes:
    """The dict the templates' constraints and the cost model read, at ``bucket``."""
    ins, outs = concrete(graph, node, bucket, context)
    d = Shapes(inputs=[c.shape for c in ins], outputs=[c.shape for c in outs], attrs=node.attr,
               dtype=graph.value_types()[node.inputs[0]].dtype)
    if len(ins) > 1 and len(ins[1].shape) == 2:  # GEMM-like: weight [N, K] as the second input
        d.update(M=max(1, ins[0].numel // max(1, ins[0].shape[-1])), N=ins[1].shape[0], K=ins[1].shape[1])
    return d


def graph_dtypes(graph: Graph) -> tuple[str, str]:
    meta = dict(graph.meta)
    return meta.get("dtype", "f32"), f"kv={meta.get('kv_cache', 'plain')},idx={meta.get('indexer_cache', 'plain')}"


def site_candidates(graph: Graph, site: dict, node: Node, bucket: Bucket, context: int, target: str,
                    store: TuningStore | None, hw=None, spec=None, tc=None) -> list[dict]:
    """``[{"meta", "config_source", ...}]`` in the order to try them, without duplicates."""
    fam, key = site["module"], site["kernel"]
    mod = template(fam)
    dtypes, quant = graph_dtypes(graph)
    if hw is None:
        hw, spec = hardware_for(target)
        tc = toolchain()
    out: list[dict] = []

    def add(meta, source, **extra):
        meta = {**mod.DEFAULT_META[key], **meta}
        if all(c["meta"] != meta for c in out):
            out.append({"meta": meta, "config_source": source, **extra})

    tokens_bucket = bucket_for(bucket.rows, context)
    if store is not None:
        found = store.lookup(key, source_hash(fam, target), signature(node), tokens_bucket, dtypes, quant, hw, tc,
                             shapes=site_shapes(graph, node, bucket, context))  # never a config the kernel refuses
        if found:  # a record timed under the interpreter is never presented as a measured config
            tier = "interpreter" if found.record.method.get("kind") == "interpreter" else found.tier
            add(dict(found.record.config), tier, bucket=found.bucket)
    if target != "cpu":
        metas, note = _cost_model_picks(graph, site, node, bucket, context, target, spec, dtypes)
        for meta in metas:
            add(meta, "cost-model")
        if note:
            add({}, "default", note=note)
    add({}, "default")
    return out


def choose_configs(graph: Graph, emitted: Emitted, target: str, store: TuningStore | None, buckets: list[Bucket],
                   context: int) -> None:
    """Fill every kernel site's ``candidates`` (bucket key -> ordered list) and provisional ``configs``
    (bucket key -> the first candidate), in place. Sites on the reference get neither."""
    hw, spec = hardware_for(target)
    tc = toolchain()
    nodes = {sid: ns[0] for sid, ns in call_sites(graph, {s["op"] for s in emitted.sites.values()}).items()}
    for sid, site in emitted.sites.items():
        if site["module"] is None:
            continue
        site["candidates"], site["configs"] = {}, {}
        for b in buckets:
            cands = site_candidates(graph, site, nodes[sid], b, context, target, store, hw, spec, tc)
            site["candidates"][b.key] = cands
            site["configs"][b.key] = dict(cands[0])


def summarize_ops(ops: dict, sites: dict) -> None:
    """Per op kind in ``ops`` (the manifest's ``kernels.ops``), the config its first call site uses at its
    first bucket (``meta``, ``config_source``), and for calls on quantised weights the same under
    ``quantized`` (or the reference and why): the short view ``v4c inspect`` prints. The per-site tables
    (``sites``) are what runs."""
    for site in sites.values():
        entry = ops[site["op"]]
        quantized = site.get("launcher") == "QUANTIZED" or site.get("module") is None
        if not quantized and "meta" in entry:
            continue
        if quantized and (entry.get("quantized") or {}).get("module") is not None:
            continue
        if site.get("module") is None:
            entry.setdefault("quantized", {"module": None, "config_source": "reference", "reason": site["reason"]})
            continue
        first = next(iter(site["configs"].values()))
        summary = {"meta": first.get("meta"), "config_source": first["config_source"]}
        if quantized:
            entry["quantized"] = {"module": site["module"], "kernel": site["kernel"], **summary}
        else:
            entry.update(summary)
