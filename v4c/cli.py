"""The ``v4c`` command line: compile, run, inspect, demo."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .errors import V4CError
from .settings import configure_triton


def _compile(a) -> int:
    from .compiler import compile as compile_model
    compile_model(a.model, a.output, target=a.target, dtype=a.dtype, weights=a.weights, overwrite=a.force,
                  fuse=not a.no_fuse, kv_cache=a.kv_cache, indexer_cache=a.indexer_cache,
                  world_size=a.world_size, parallel=a.parallel, print_after=set(a.print_after or ()),
                  print_after_all=a.print_after_all, aot=not a.no_aot, allow_fallback=a.allow_fallback,
                  context=a.context, workers=a.jobs, buckets=a.buckets.split(";") if a.buckets else None,
                  mtp=a.mtp, log=lambda s: print(s, file=sys.stderr))
    print(a.output)
    return 0


def _tokenizer(artifact: Path):
    from .artifact import open_artifact
    text = open_artifact(artifact, verify=False).tokenizer()  # checked against its hash
    if text is None:
        raise V4CError(f"{artifact}: --prompt needs a tokenizer.json in the checkpoint directory at compile time; "
                       f"use --prompt-ids instead")
    from tokenizers import Tokenizer
    return Tokenizer.from_str(text)


def _run(a) -> int:
    import torch

    from .runtime.loader import load
    rank = 0
    if a.speculative is not None and (a.world_size != 1 or "WORLD_SIZE" in os.environ):
        raise ValueError("--speculative runs in one process: sharded artifacts do not hold the MTP block")
    if a.world_size != 1 or "WORLD_SIZE" in os.environ:  # multi-GPU: torchrun's ranks, or start them
        from .runtime.distributed import launch, load_distributed
        if "WORLD_SIZE" not in os.environ:
            return launch(a.world_size, _run_argv(a))
        model = load_distributed(a.artifact, device=a.device, backend=a.backend)
        rank = model.rank
    else:
        model = load(a.artifact, device=a.device, backend=a.backend)
    tok = None
    if a.prompt is not None:
        tok = _tokenizer(Path(a.artifact))
        ids = tok.encode(a.prompt).ids
    else:
        try:
            ids = [int(x) for x in a.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise ValueError(f"--prompt-ids must be integers separated by spaces, got {a.prompt_ids!r}") from None
    if not ids:
        raise ValueError("the prompt is empty")

    def show(t):
        if rank != 0:  # every rank has the same tokens; one prints them
            return
        text = tok.decode([int(t[0])]) if tok else str(int(t[0]))
        print(text, end=("" if tok else " "), flush=True)

    spec = {} if a.speculative is None else {"speculative": a.speculative, "draft_tokens": a.draft_tokens}
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids]), a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                         seed=a.seed, on_token=show, **spec)
    if rank == 0:
        print()
    if spec:  # the acceptance, on stderr: stdout holds the tokens alone
        secs = time.perf_counter() - t0
        print(f"{out.stats.summary()}; {a.max_new_tokens} tokens in {secs:.2f}s "
              f"({a.max_new_tokens / secs:.1f} tokens/s, prefill included)", file=sys.stderr)
    if hasattr(model, "close"):
        model.close()
    return 0


def _run_argv(a) -> list[str]:
    """``v4c run`` arguments that each rank started by ``--world-size`` gets."""
    argv = ["run", a.artifact, "--max-new-tokens", str(a.max_new_tokens), "--temperature", str(a.temperature),
            "--top-p", str(a.top_p), "--world-size", str(a.world_size)]
    argv += ["--prompt", a.prompt] if a.prompt is not None else ["--prompt-ids", a.prompt_ids]
    for flag, v in (("--seed", a.seed), ("--device", a.device), ("--backend", a.backend)):
        if v is not None:
            argv += [flag, str(v)]
    return argv


def _byte_count(text: str) -> int:
    """A byte count: an integer, optionally with a K, M, G or T suffix (powers of 1024)."""
    import argparse
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = 1
    if t[-1:] in "KMGT" and t[-1:]:
        scale, t = 1024 ** ("KMGT".index(t[-1]) + 1), t[:-1]
    try:
        n = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count (e.g. 1073741824, 512M, 2G)") from None
    if not 0 <= n < 2**63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte count >= 0")
    return int(n)


def _serve(a) -> int:
    from .serve.app import serve
    if a.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {a.max_batch}")
    if a.max_context is not None and a.max_context < 2:
        raise ValueError(f"--max-context must be >= 2, got {a.max_context}")
    if a.step_tokens < a.max_batch:
        raise ValueError(f"--step-tokens must be at least --max-batch ({a.max_batch}): every running row takes "
                         f"one token of each step, got {a.step_tokens}")
    if a.world_size is not None and a.world_size < 1:
        raise ValueError(f"--world-size must be >= 1, got {a.world_size}")
    if a.speculative is not None and not 1 <= a.draft_tokens <= 3:
        raise ValueError(f"--draft-tokens must be from 1 to 3, got {a.draft_tokens}")
    if not 0 <= a.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {a.port}")
    if "WORLD_SIZE" not in os.environ:  # a sharded artifact: start its ranks; rank 0 takes the requests
        from .artifact import open_artifact
        world = a.world_size or open_artifact(a.artifact, verify=False).world_size
        if world != 1 and a.speculative is not None:
            raise ValueError(f"--speculative is not supported for a sharded artifact yet ({world} ranks); serve it "
                             f"without --speculative")
        if world != 1:
            from .runtime.distributed import launch
            # every rank gets this command line (rank 0 serves, the others follow it)
            return launch(world, [*a.argv, *(() if a.world_size else ("--world-size", str(world)))])
    return serve(a.artifact, host=a.host, port=a.port, max_batch=a.max_batch, max_context=a.max_context,
                 max_queue=a.max_queue, api_key=a.api_key or os.environ.get("V4C_API_KEY") or None,
                 backend=a.backend, device=a.device, reasoning=a.reasoning == "on",
                 served_model_name=a.served_model_name, log_level=a.log_level, step_tokens=a.step_tokens,
                 prefix_cache_bytes=a.prefix_cache_bytes, context_cache_dir=a.context_cache_dir,
                 context_cache_bytes=a.context_cache_bytes, speculative=a.speculative, draft_tokens=a.draft_tokens)


def _inspect(a) -> int:
    from .inspect import format_report, inspect_artifact
    r = inspect_artifact(a.artifact, context=a.context, batch=a.batch, backend=a.backend,
                         **({"gpu_sizes": tuple(a.gpu_memory)} if a.gpu_memory else {}))
    if a.graph:
        from .artifact import open_artifact
        print(open_artifact(a.artifact, verify=False).graph_text(), end="")  # checked against its hash
        return 0
    print(json.dumps(r, indent=1) if a.json else format_report(r))
    return 0


def _report(a) -> int:
    from .report import write_report
    files = write_report(a.model, a.output, target=a.target, batch=a.batch, context=a.context, dtype=a.dtype,
                         plan=a.plan, log=lambda s: print(s, file=sys.stderr))
    print("\n".join(str(f) for f in files.values()))
    return 0


def _plan(a) -> int:
    from .plan import make_plan
    from .plan.output import format_plan
    r = make_plan(a.model, gpu=a.gpu, gpus=a.gpus, input_len=a.input_len, output_len=a.output_len,
                  concurrency=a.concurrency, sweep=a.sweep, profile=a.profile, parallel=a.parallel,
                  speculative=a.speculative, draft_tokens=a.draft_tokens, accept_length=a.accept_length,
                  price_per_gpu_hour=a.price_per_gpu_hour, disagg=a.disagg, prefill_gpus=a.prefill_gpus,
                  max_gpus=a.max_gpus, chunk_tokens=a.chunk_tokens, max_running=a.max_running,
                  cuda_graphs=not a.no_cuda_graphs)
    print(json.dumps(r, indent=1) if a.json else format_plan(r))
    return 0


def _tune(a) -> int:
    from .autotune.store import TuningStore
    from .autotune.tune import plan, tune
    store = TuningStore(a.cache)
    buckets = a.buckets.split(";") if a.buckets else None
    if a.dry_run:
        rows = plan(a.artifact, a.strategy, a.budget, store, buckets)
        gpu = _artifact_target(a.artifact) != "cpu"
        unit = "est. GPU s" if gpu else "est. s"
        print(f"{'call site':<30}{'kernel':<22}{'bucket':<12}{'candidates':>11}{'to try':>8}  {'cached':<14}{unit:>10}")
        for r in rows:
            print(f"{r.site:<30}{r.kernel:<22}{r.bucket:<12}{r.candidates:>11}{r.to_try:>8}  {r.covered or '-':<14}"
                  f"{r.est_seconds:>10.1f}")
        todo = [r for r in rows if r.covered != "exact"]
        print(f"{len(rows)} call sites x buckets, {len(rows) - len(todo)} already tuned here; "
              f"about {sum(r.est_seconds for r in todo) / 60:.1f} {'GPU ' if gpu else ''}minutes for the rest "
              f"({a.strategy})" + ("" if gpu else "; no GPU target: the tuner runs under Triton's interpreter, "
                                   "for testing the mechanism only"))
        return 0
    chosen = tune(a.artifact, a.strategy, a.budget, store, seed=a.seed, force=a.force, buckets=buckets,
                  log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"tuned {len(chosen)} call site x bucket configs; records in {store.path}")
    return 0


def _artifact_target(path) -> str:
    from .artifact import open_artifact
    return open_artifact(path, verify=False).target


def _cache(a) -> int:
    from .autotune import sharing
    from .autotune.store import TuningStore
    store = TuningStore(a.cache)

    def safe(x) -> str:  # received text may hold terminal escapes or lone surrogates
        return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(x))

    def report(r):
        print(f"{r.added} added, {r.updated} updated, {r.kept} kept, {len(r.rejected)} rejected, "
              f"{len(r.conflicts)} conflicts" + ("" if r.ok else f" (not done: {safe(r.error)})"))
        for idx, why in r.rejected[:20]:
            print(f"  rejected {safe(idx)}: {safe(why)}")
        for c in r.conflicts[:20]:
            print(f"  conflict: {safe(c)}")
        return 0 if r.ok else 1

    if a.cache_cmd == "export":
        n = sharing.export_bundle(store, a.output)
        print(f"{n} records -> {a.output}")
        return 0
    if a.cache_cmd == "import":
        return report(sharing.import_bundle(store, a.bundle))
    if a.cache_cmd == "merge":
        return report(sharing.merge_stores(store, *a.sources))  # paths: opened read-only
    if a.cache_cmd in ("push", "pull"):
        import warnings
        with warnings.catch_warnings():  # the report below says it once, without a Python warning's source line
            warnings.simplefilter("ignore", sharing.SharingWarning)
            r = sharing.push(store, a.redis) if a.cache_cmd == "push" else sharing.pull(store, a.redis)
        if a.cache_cmd == "push":
            print(r)
            return 0 if r.ok else 1
        return report(r)
    if a.cache_cmd == "coverage":
        from collections import Counter

        from .inspect import inspect_artifact
        r = inspect_artifact(a.artifact)
        total: Counter = Counter()
        for s in r["sites"]:
            if s["module"] is None:
                print(f"{s['site']:<30}reference ({s.get('reason', '')})")
                continue
            by = Counter(c["config_source"] for c in s["configs"])
            total.update(by)
            flag = "  <- runs on defaults" if by.get("default") else ""
            flag += "  <- interpreter timings only" if by.get("interpreter") else ""
            print(f"{s['site']:<30}" + ", ".join(f"{n} {src}" for src, n in sorted(by.items())) + flag)
        measured = sum(n for src, n in total.items() if src not in ("default", "cost-model", "reference", "interpreter"))
        print(f"{sum(total.values())} site x bucket configs: {total['default']} on defaults, {total['cost-model']} on "
              f"the cost model, {total['interpreter']} from interpreter runs (not measurements), {measured} from "
              f"measured tuning records")
        return 0
    print(f"{len(store)} records in {store.path}")
    return 0


PRESETS = ("tiny", "v4-flash", "v4-pro")
RANDOM_WEIGHTS_LIMIT = 4 << 30  # bytes of random fp32 weights `v4c init --weights random` writes at most


def _opt(a) -> int:
    from .graph import parse_graph, print_graph, verify
    from .passes import PassManager
    from .passes.named import parse_pipeline
    passes = parse_pipeline(a.passes) if a.passes.strip() else []
    text = sys.stdin.read() if a.graph == "-" else Path(a.graph).read_text()
    graph = verify(parse_graph(text))
    pm = PassManager(passes, out=lambda s: print(s, file=sys.stderr))  # verifies after every pass
    out = print_graph(pm.run(graph))
    if a.notes:
        for r in pm.records:
            for n in r.notes:
                print(f"{r.name}: {n}", file=sys.stderr)
    if a.output:
        Path(a.output).write_text(out)
    else:
        sys.stdout.write(out)
    return 0


def _init(a) -> int:
    import json as _json

    from .model import presets
    from .model.build import build_graph
    from .model.config import V4Config
    config = {"tiny": presets.tiny_config_dict(), "v4-flash": presets.FLASH_HUB_CONFIG,
              "v4-pro": presets.PRO_HUB_CONFIG}[a.preset]
    d = Path(a.directory)
    if d.exists() and not d.is_dir():
        raise V4CError(f"{d} exists and is not a directory")
    ours = {"config.json", "model.safetensors"}
    others = sorted(p.name for p in d.iterdir() if p.name not in ours) if d.is_dir() else []
    if d.is_dir() and (others or not a.force) and any(d.iterdir()):
        raise V4CError(f"{d} is not empty" + (f" (it holds {', '.join(others[:5])})" if others else
                                               "; --force replaces its config.json and model.safetensors"))
    if a.weights == "random":
        graph = build_graph(V4Config.from_dict(config), "f32")
        size = sum(t.numel() for _, t in graph.params) * 4
        if size > RANDOM_WEIGHTS_LIMIT:
            raise V4CError(f"{a.preset} with random fp32 weights would be {size / 1e9:.0f} GB; use --preset tiny, "
                           f"or leave out --weights to write the config only (compiles weight-free, to inspect)")
        from .model.random_weights import write_random_checkpoint
        write_random_checkpoint(config, d, seed=a.seed)
        print(f"{d}: {a.preset} config and random weights ({size / 2**20:.1f} MiB, seed {a.seed})")
    else:
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(_json.dumps(config, indent=1) + "\n")
        print(f"{d}: {a.preset} config only (compiles to a weight-free artifact: inspect, report, AOT checks)")
    print(f"next: v4c compile {d} -o {d.name}.v4c" + ("" if a.weights == "random" else " --target sm90 --dtype bf16"))
    return 0


def _demo(a) -> int:
    from .demo import run_demo
    run_demo(prompt_len=a.prompt_len, new_tokens=a.new_tokens, seed=a.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="v4c", description="Compile and run DeepSeek-V4-class models.")
    p.add_argument("--version", action="version", version=f"v4c {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compile", help="checkpoint (or config-only) directory -> artifact")
    c.add_argument("model", help="checkpoint directory (config.json + *.safetensors), or a config-only directory")
    c.add_argument("-o", "--output", required=True, help="the artifact directory to write")
    c.add_argument("--target", default="auto", help="auto, cpu, sm80, sm86, sm89, sm90, sm100, sm120")
    c.add_argument("--dtype", default="f32", choices=["f32", "bf16", "f16"], help="activation dtype")
    c.add_argument("--weights", default="auto", choices=["auto", "copy", "reference", "none"],
                   help="copy the safetensors into the artifact, reference them in place (hash-pinned), or none "
                        "(auto: copy up to 2 GiB)")
    c.add_argument("--force", action="store_true", help="replace an existing artifact")
    c.add_argument("--no-fuse", action="store_true", help="keep the unfused graph (for comparison)")
    c.add_argument("--kv-cache", default="auto", choices=["auto", "fp32", "bf16", "fp8"],
                   help="window/compressed KV rows (auto: fp8 for real V4 layouts, else the activation dtype)")
    c.add_argument("--indexer-cache", default="auto", choices=["auto", "fp32", "bf16", "fp8", "fp4"],
                   help="indexer keys (auto: fp4 for real V4 layouts, else the activation dtype)")
    c.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) to shard the model over")
    c.add_argument("--parallel", default=None, metavar="ep=N,attn=dp|tp",
                   help="experts split over N ranks (N = world size, or 1); attention data- or tensor-parallel "
                        "(default ep=WORLD,attn=dp)")
    c.add_argument("--print-after", action="append", metavar="PASS", help="print the IR after PASS (repeatable)")
    c.add_argument("--print-after-all", action="store_true", help="print the IR after every pass")
    c.add_argument("--no-aot", action="store_true",
                   help="GPU targets: skip compiling every kernel launch ahead of time (for inspecting only; "
                        "configs are then unchecked)")
    c.add_argument("--allow-fallback", action="store_true",
                   help="GPU targets: a kernel launch that does not compile or fit runs on its op's PyTorch "
                        "reference (reported) instead of failing the compile")
    c.add_argument("--context", type=int, default=None,
                   help="context length the kernels are compiled for (default: the model's maximum)")
    c.add_argument("--buckets", default=None, metavar="'B=1,T=1;B=1,T=4096'",
                   help="shape buckets to choose and compile configs for, ';'-separated (default: decode batch "
                        "1, 16, 64, 256 and 512- and 4096-token prefill)")
    c.add_argument("--mtp", default="auto", choices=["auto", "on", "off"],
                   help="the MTP block (speculative decoding) as a graph of its own: auto when the checkpoint holds "
                        "a complete one, on always (weight-free: the release layout), off never")
    c.add_argument("-j", "--jobs", type=int, default=None,
                   help="parallel compiler processes for the ahead-of-time compile (default: one per CPU)")
    c.set_defaults(fn=_compile)
    r = sub.add_parser("run", help="generate tokens from an artifact")
    r.add_argument("artifact", help="a compiled artifact directory (with weights)")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt-ids", help='the prompt as token ids, e.g. "1 2 3"')
    g.add_argument("--prompt", help="the prompt as text (needs the checkpoint's tokenizer.json)")
    r.add_argument("--max-new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    r.add_argument("--temperature", type=float, default=0.0, help="0 for greedy (default), else sampling")
    r.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: off)")
    r.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible samples")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is a GPU)")
    r.add_argument("--backend", default=None, choices=["cpu", "triton", "reference", "torch"],
                   help="cpu: fast PyTorch ops and C helpers (default on CPU; 'torch' is its former name); "
                        "triton: the artifact's kernels (default on CUDA; interpreted on CPU); reference: the "
                        "ops' definitions")
    r.add_argument("--world-size", type=int, default=1,
                   help="run a sharded artifact on N ranks (starts torchrun; under torchrun, join its ranks)")
    r.add_argument("--speculative", default=None, choices=["mtp"],
                   help="speculative decoding: the artifact's MTP block drafts, one forward verifies (greedy output "
                        "unchanged); prints the accepted drafts per step on stderr")
    r.add_argument("--draft-tokens", type=int, default=2, help="tokens drafted per step with --speculative (1..3)")
    r.set_defaults(fn=_run)
    sv = sub.add_parser("serve", help="serve an artifact over HTTP with OpenAI's API (completions, chat)")
    sv.add_argument("artifact", help="a compiled artifact directory (with weights)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sv.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    sv.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per step (default 8)")
    sv.add_argument("--max-context", type=int, default=None,
                    help="tokens per sequence, prompt and generated (default: the model's, up to 16384)")
    sv.add_argument("--max-queue", type=int, default=64,
                    help="requests waiting for a row before new ones get 429 (default 64)")
    sv.add_argument("--step-tokens", type=int, default=256,
                    help="tokens per scheduler step: one per decode row, the rest for prefill chunks (default 256)")
    sv.add_argument("--api-key", default=None,
                    help="require 'Authorization: Bearer KEY' on every route but /health (default: $V4C_API_KEY)")
    sv.add_argument("--backend", default=None, choices=["cpu", "triton", "reference", "torch"],
                    help="as for `v4c run` (default: triton on CUDA, cpu on CPU)")
    sv.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if there is a GPU)")
    sv.add_argument("--reasoning", default="off", choices=["on", "off"],
                    help="chat's default mode: thinking (on) or not (off); a request picks its own with "
                         "chat_template_kwargs: {\"thinking\": true}")
    sv.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                                                               "artifact directory's name)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                    help="uvicorn's log level (default info)")
    sv.add_argument("--world-size", type=int, default=None,
                    help="ranks for a sharded artifact (default: the ranks it was compiled for); rank 0 takes "
                         "the requests")
    sv.add_argument("--prefix-cache-bytes", type=_byte_count, default=None, metavar="N",
                    help="memory for cached prompt prefixes, resumed instead of computed (e.g. 2G; 0: none; "
                         "default 1G)")
    sv.add_argument("--context-cache-dir", default=None, metavar="DIR",
                    help="also keep cached prefixes on disk here (safetensors files; kept across restarts)")
    sv.add_argument("--context-cache-bytes", type=_byte_count, default=None, metavar="N",
                    help="the disk tier's budget (e.g. 50G; default 16G)")
    sv.add_argument("--speculative", default=None, choices=["mtp"],
                    help="speculative decoding: the artifact's MTP block drafts, one forward verifies each "
                         "decoding row's drafts (greedy output unchanged; not for sharded artifacts yet)")
    sv.add_argument("--draft-tokens", type=int, default=2,
                    help="tokens drafted per row and step with --speculative (1..3, default 2)")
    sv.set_defaults(fn=_serve)
    i = sub.add_parser("inspect", help="describe an artifact")
    i.add_argument("artifact", help="a compiled artifact directory")
    i.add_argument("--json", action="store_true", help="everything as JSON (for tools)")
    i.add_argument("--graph", action="store_true", help="print the IR text")
    i.add_argument("--context", type=int, default=None, help="context length for the costs (default: the model's max)")
    i.add_argument("--batch", type=int, default=1, help="sequences per decode step for the costs")
    i.add_argument("--backend", default=None, choices=["cpu", "triton", "reference", "torch"],
                   help="whose implementations to list (default: what `v4c run` would use here)")
    i.add_argument("--gpu-memory", type=float, nargs="+", default=None, metavar="GB",
                   help="card sizes for weights.per_gpu (default: 80 141 192)")
    i.set_defaults(fn=_inspect)
    rp = sub.add_parser("report", help="plots and an HTML page: KV cache and decode FLOPs against context, kernels")
    rp.add_argument("model", help="an artifact, a checkpoint/config directory (compiled weight-free), or a "
                                  "`v4c plan --sweep --json` file")
    rp.add_argument("-o", "--output", required=True, help="directory for the PNGs, report.html and series.json")
    rp.add_argument("--target", default=None, help="device for the kernel table's roofline: sm80 ... sm120, a product "
                    "(h200-sxm) or cpu (default: the artifact's target; sm90 for a model directory)")
    rp.add_argument("--batch", type=int, default=1, help="sequences per decode step in the kernel table")
    rp.add_argument("--context", type=int, default=None, help="context of the kernel table (default: the model's max)")
    rp.add_argument("--dtype", default="bf16", choices=["f32", "bf16", "f16"],
                    help="activation dtype when compiling a model directory")
    rp.add_argument("--plan", default=None, metavar="PLAN.json|GPU:N[:IN/OUT]",
                    help="add the Pareto view of a `v4c plan --sweep --json` output, or sweep the model on N GPUs "
                         "now (b200:4, b200:4:8192/1024); MODEL may also be such a JSON file alone")
    rp.set_defaults(fn=_report)
    pl = sub.add_parser("plan", help="a serving recipe and its cost on a GPU type, predicted from the compiled model")
    pl.add_argument("model", help="an artifact, or a checkpoint/config directory (built weight-free)")
    pl.add_argument("--gpu", required=True, help="h100, h200, h20, b200, b300, gb200 or gb300")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs serving (the decode pool with --disagg)")
    pl.add_argument("--input-len", type=int, required=True, help="prompt tokens per request")
    pl.add_argument("--output-len", type=int, required=True, help="output tokens per request")
    pc = pl.add_mutually_exclusive_group()
    pc.add_argument("--concurrency", type=int, default=None,
                    help="requests in flight (default: the profile's choice)")
    pc.add_argument("--sweep", action="store_true",
                    help="every profile over concurrency: tokens/s per user against tokens/s per GPU (Pareto)")
    pl.add_argument("--profile", default="balanced", choices=["low-latency", "balanced", "max-throughput"],
                    help="what the plan optimises (default balanced)")
    pl.add_argument("--parallel", default=None, metavar="ep=N,attn=dp|tp", help="take this layout instead of choosing")
    pl.add_argument("--speculative", default=None, choices=["mtp", "none"],
                    help="MTP speculative decoding on or off (default: the profile chooses)")
    pl.add_argument("--draft-tokens", type=int, default=None,
                    help="MTP draft tokens per step (SGLang's --speculative-num-steps; verify = this + 1 tokens)")
    pl.add_argument("--accept-length", type=float, default=None,
                    help="tokens accepted per verify step, the bonus token included (default: from ~2.5 at 3)")
    pl.add_argument("--price-per-gpu-hour", type=float, default=None, help="$ per GPU-hour, for the cost per token")
    pl.add_argument("--disagg", action="store_true", help="prefill on separate GPUs (PD disaggregation)")
    pl.add_argument("--prefill-gpus", type=int, default=None,
                    help="with --disagg: prefill GPUs (default: the count that serves best)")
    pl.add_argument("--max-gpus", type=int, default=None,
                    help="with --disagg: prefill + decode GPUs at most (an NVL72 rack: 72; default 5 x --gpus)")
    pl.add_argument("--chunk-tokens", type=int, default=4096, help="prefill chunk size (default 4096)")
    pl.add_argument("--max-running", type=int, default=None,
                    help="requests the engine admits at once, all ranks (SGLang's --max-running-requests; "
                         "its default for V4 is 256); the rest of --concurrency waits (default: no cap)")
    pl.add_argument("--no-cuda-graphs", action="store_true", help="decode launches eagerly (higher launch cost)")
    pl.add_argument("--json", action="store_true", help="everything as JSON (for tools and v4c report --plan)")
    pl.set_defaults(fn=_plan)
    t = sub.add_parser("tune", help="measure kernel configs for an artifact and keep them in the tuning cache")
    t.add_argument("artifact", help="a compiled artifact directory (its manifest gets the tuned configs)")
    t.add_argument("--strategy", default="tpe", choices=["exhaustive", "random", "tpe"],
                   help="search strategy over each kernel's candidates (default tpe)")
    t.add_argument("--budget", type=int, default=None, help="candidates measured per kernel")
    t.add_argument("--dry-run", action="store_true", help="print the plan and the estimated GPU time")
    t.add_argument("--seed", type=int, default=0, help="seed of the random and TPE searches")
    t.add_argument("--force", action="store_true", help="re-measure kernels already tuned here")
    t.add_argument("--cache", default=None, help="tuning store (default: $V4C_CACHE_DIR/tuning.sqlite)")
    t.add_argument("--buckets", default=None, metavar="'B=1,T=1;B=1,T=4096'",
                   help="shape buckets to tune, ';'-separated (default: the artifact's; one decode bucket on a CPU)")
    t.set_defaults(fn=_tune)
    cc = sub.add_parser("cache", help="the tuning cache: export, import, merge, push, pull, coverage",
                        description="The local tuning store and how to share it. push: local store -> Redis "
                                    "server; pull: Redis server -> local store.")
    store_help = "tuning store (default: $V4C_CACHE_DIR/tuning.sqlite)"
    cc.add_argument("--cache", default=None, help=store_help)
    csub = cc.add_subparsers(dest="cache_cmd")
    ce = csub.add_parser("export", help="write the local records as a reviewable JSON bundle")
    ce.add_argument("-o", "--output", required=True, help="the bundle file to write")
    ci = csub.add_parser("import", help="validate a bundle and merge it into the local store")
    ci.add_argument("bundle", help="a bundle written by `v4c cache export`")
    cm = csub.add_parser("merge", help="merge other stores into the local one (the best measurement per key wins)")
    cm.add_argument("sources", nargs="+", help="other tuning.sqlite files")
    cp = csub.add_parser("push", help="send the local records to a team Redis server (local -> server)")
    cp.add_argument("--redis", required=True, metavar="URL", help="redis://host:port/db")
    cp = csub.add_parser("pull", help="fetch a team Redis server's records into the local store (server -> local)")
    cp.add_argument("--redis", required=True, metavar="URL", help="redis://host:port/db")
    cv = csub.add_parser("coverage", help="where each kernel config of an artifact came from (defaults flagged)")
    cv.add_argument("artifact", help="a compiled artifact directory")
    for p_ in (ce, ci, cm, csub.choices["push"], cp, cv):  # --cache also after the subcommand
        p_.add_argument("--cache", default=argparse.SUPPRESS, help=store_help)
    cc.set_defaults(fn=_cache)
    from .onnx.cli import add_onnx_commands
    add_onnx_commands(sub)
    n = sub.add_parser("init", help="write a model directory to compile: a preset's config, optionally with "
                                    "random weights")
    n.add_argument("directory", help="the directory to write (new or empty)")
    n.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="tiny (a small random test model), v4-flash or v4-pro (the released configs)")
    n.add_argument("--weights", default="none", choices=["none", "random"],
                   help="none: config.json only; random: also a model.safetensors of random weights (tiny only)")
    n.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    n.add_argument("--force", action="store_true", help="replace the config.json / model.safetensors already there")
    n.set_defaults(fn=_init)
    o = sub.add_parser("opt", help="run named passes on IR text and print the result (as mlir-opt does)")
    o.add_argument("graph", help="a graph's IR text file (e.g. an artifact's graph.v4c), or - for standard input")
    o.add_argument("-p", "--passes", default="",
                   help="comma-separated pass names, options in braces: fuse-moe,fuse-attention, "
                        "quantize-kv-cache{kv=fp8_ds indexer=mxfp4}, shard{world=2 rank=0 parallel=attn=tp}")
    o.add_argument("-o", "--output", help="write the IR here instead of standard output")
    o.add_argument("--notes", action="store_true", help="print each pass's notes (why something was not fused)")
    o.set_defaults(fn=_opt)
    d = sub.add_parser("demo", help="tiny random model: compile, load, generate")
    d.add_argument("--prompt-len", type=int, default=12, help="random prompt tokens (default 12)")
    d.add_argument("--new-tokens", type=int, default=16, help="tokens to generate (default 16)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights and prompt")
    d.set_defaults(fn=_demo)
    return p


def _terminate_cleanly(cmd: str) -> None:
    """On SIGTERM (kill, a scheduler's timeout) a compile removes its partial directory and the process
    exits at once with 128+15; only SIGKILL leaves a partial, for the next compile to the same place to
    remove. The handler does not raise into the running code: an exception raised inside an extension
    module's import or callback aborts the process before any cleanup."""
    import signal
    import threading
    from .artifact.output import remove_live_partials

    def on_term(signum, frame):
        remove_live_partials()
        print(f"v4c {cmd}: terminated", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)


def _plain_warnings(cmd: str) -> None:
    """Warnings reach a CLI user as one line each, like errors, not with Python's source line."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"v4c {cmd}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given, for the ranks a command starts
    configure_triton()  # a command's own process: Triton's interpreter where there is no GPU
    _terminate_cleanly(args.cmd)
    _plain_warnings(args.cmd)
    try:
        return args.fn(args)
    except (V4CError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"v4c {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"v4c {args.cmd}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
