"""``v4c tune``: measure kernel candidates for an artifact's ops, keep every measurement in the
tuning store, and write the winners into the artifact's kernel table.

On CUDA each candidate is checked against the op's reference before its time counts, then
timed with CUDA events (median of repeats after warm-up, L2 flushed). Without a GPU the same
loop runs under Triton's interpreter on a small space, so the whole mechanism is exercised;
those timings mean nothing and are recorded as such (method "interpreter").
On a GPU, candidates run in a child process (``worker.py``): a config that kills the
process is recorded and the search goes on. Every kernel's record is stored as soon as it is
done, so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import datetime as _dt
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..artifact import open_artifact, update_kernels
from ..artifact.shapes import Bucket, default_buckets, parse_bucket
from ..backends.triton import load_modules
from ..codegen.emit import template
from ..graph.ir import Node
from ..graph.registry import get_op
from ..graph.sites import call_sites
from ..settings import check_triton_mode
from ..collective import agree
from .buckets import bucket_for
from .choose import graph_dtypes, concrete, site_shapes, source_hash, summarize_ops
from .costmodel import predict
from .inputs import node_inputs
from .problems import hardware_for, signature, toolchain
from .records import TuningRecord
from .search import search
from .space import candidates
from .store import TuningStore
from .worker import Worker

CPU_CONTEXT = 64  # interpreter runs use a short context: they exercise the loop, not the speed
CPU_BUCKETS = ("B=1,T=1",)  # and one shape: the interpreter would take hours over the GPU buckets
GPU_CONTEXT = 131072  # measured at this context at most: 1M-token caches of 256 rows do not fit a GPU


@dataclass(frozen=True)
class Unit:
    """One thing to tune: a kernel call site of the artifact at one shape bucket."""
    site: str
    op: str
    kernel: str     # the template's META key: the op, or its quantised launcher's ("fp8_q_proj")
    family: str
    launcher: str   # "KERNELS" or "QUANTIZED"
    node: Node
    bucket: Bucket
    context: int

    def bind(self) -> dict:
        return {"B": self.bucket.batch, "T": self.bucket.tokens, "L": self.context}

    @property
    def store_bucket(self) -> str:
        return bucket_for(self.bucket.rows, self.context)

    @property
    def signature(self) -> str:
        return signature(self.node)


@dataclass
class PlanRow:
    site: str
    op: str
    kernel: str
    bucket: str
    candidates: int
    to_try: int
    covered: str | None
    est_seconds: float


def _setup(path):
    man = open_artifact(Path(path))
    return man, man.graph()


def units(man, graph, buckets=None) -> list[Unit]:
    """Every kernel site of the artifact at each bucket to tune: ``buckets`` (keys), else the artifact's
    (GPU targets) or ``CPU_BUCKETS``."""
    target = man.target
    kern = man.kernels()
    nodes = {sid: ns[0] for sid, ns in call_sites(graph).items()}
    keys = buckets or (CPU_BUCKETS if target == "cpu" else kern.get("buckets") or [b.key for b in default_buckets()])
    ctx = CPU_CONTEXT if target == "cpu" else min(int(kern.get("context") or GPU_CONTEXT), GPU_CONTEXT)
    out = []
    for sid, s in sorted(kern.get("sites", {}).items()):
        if s.get("module") and sid in nodes:
            out += [Unit(sid, s["op"], s["kernel"], s["module"], s["launcher"], nodes[sid], parse_bucket(k), ctx)
                    for k in keys]
    return out


def unit_candidates(graph, u: Unit, spec) -> list[dict]:
    mod = template(u.family)
    try:
        cands = candidates(mod, u.kernel, site_shapes(graph, u.node, u.bucket, u.context), spec)
    except Exception:  # noqa: BLE001 - a template that cannot judge these shapes is tried at its default
        cands = []
    return cands or [dict(mod.DEFAULT_META[u.kernel])]


def plan(path, strategy: str = "tpe", budget: int | None = None, store: TuningStore | None = None,
         buckets=None) -> list[PlanRow]:
    """Sites x buckets x candidates, what the store already covers, estimated seconds."""
    man, graph = _setup(path)
    target = man.target
    hw, spec = hardware_for(target)
    rows = []
    for u in units(man, graph, buckets):
        cands = unit_candidates(graph, u, spec)
        n = len(cands) if strategy == "exhaustive" else min(len(cands), budget or _default_budget(len(cands), target))
        found = store.lookup(u.kernel, source_hash(u.family, target), u.signature, u.store_bucket, *graph_dtypes(graph),
                             hw, toolchain()) if store is not None else None
        ins, outs = concrete(graph, u.node, u.bucket, u.context)
        shapes = site_shapes(graph, u.node, u.bucket, u.context)
        guess = predict(get_op(u.op).cost(ins, outs, u.node.attr, u.context), template(u.family).DEFAULT_META[u.kernel],
                        shapes, spec, graph_dtypes(graph)[0])
        # per candidate: compile (~1 s), warm-up and repeats of the kernel
        rows.append(PlanRow(u.site, u.op, u.kernel, u.bucket.key, len(cands), n,
                            _tier_name(found) if found else None, n * (1.0 + 60 * guess)))
    return rows


def _tier_name(found) -> str:
    """A record measured under the interpreter is never presented as a measured config."""
    return "interpreter" if found.record.method.get("kind") == "interpreter" else found.tier


def _default_budget(n: int, target: str) -> int:
    return min(n, 4) if target == "cpu" else max(8, min(64, n // 4))


def _as_cuda_graph(fn):
    """``fn`` captured into a CUDA graph (decode shapes are launch-bound: time them as the runtime
    runs them), or None when it cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay
    except Exception:
        return None


def _measure_cuda(fn, reps=20, warmup=5, graph=False):
    """Median seconds and relative spread; ``graph``: replay a CUDA-graph capture of ``fn``."""
    if graph:
        fn = _as_cuda_graph(fn) or fn
    flush = torch.empty(1 << 27, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    med = statistics.median(times)
    return med, (max(times) - min(times)) / med


def _close(got, want) -> bool:
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        if w.is_floating_point():
            tol = 1e-4 if w.dtype == torch.float32 else 3e-2
            if ((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)) > tol:
                return False
        elif w.dtype == torch.int64 and w.dim() == 3:  # index sets (top-k): compare as sets
            if not torch.equal(g.sort(-1).values, w.sort(-1).values):
                return False
    return True


def _clone(a):
    return a.clone() if isinstance(a, torch.Tensor) else a  # quantised weights are read only


def measure_candidate(launcher, args, want, meta: dict, attrs: dict, on_gpu: bool) -> dict:
    """Run one candidate: its output must match the reference before its time counts."""
    out = {"seconds": None, "status": "ok", "detail": ""}
    try:
        got = launcher(*[_clone(a) for a in args], meta=meta, **attrs)
        if not _close(got, want):
            out.update(status="wrong_result", detail="differs from the op's reference")
        elif on_gpu:
            fresh = [_clone(a) for a in args]
            decode = args[0].dim() >= 2 and args[0].shape[1] == 1  # [B, T=1, ...]: a decode step
            out["seconds"], out["spread"] = _measure_cuda(lambda: launcher(*fresh, meta=meta, **attrs), graph=decode)
        else:  # the interpreter: one run, timed only to exercise the loop
            t0 = time.perf_counter()
            launcher(*[_clone(a) for a in args], meta=meta, **attrs)
            out["seconds"] = time.perf_counter() - t0
    except Exception as e:  # recorded, not fatal
        kind = "out_of_resources" if "OutOfResources" in type(e).__name__ else "compile_error"
        out.update(status=kind, detail=f"{type(e).__name__}: {e}"[:500])
    return out


def site_launcher(modules: dict, u: Unit):
    fn = getattr(modules[u.family], u.launcher)[u.op]
    return fn[0] if u.launcher == "QUANTIZED" else fn


def tune(path, strategy: str = "tpe", budget: int | None = None, store: TuningStore | None = None,
         seed: int = 0, log: Callable[[str], None] = print, force: bool = False, isolate: bool | None = None,
         buckets=None) -> dict:
    """Tune every kernel call site of the artifact at ``path`` at each shape bucket (``units``); returns
    (site, bucket) -> (meta, tier). Under torch.distributed only rank 0 measures; every rank returns rank
    0's choices. ``isolate`` (default: on with a GPU) measures candidates in a child process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {tuple(k.split("|")): tuple(v) for k, v in agree({}).items()}
    man, graph = _setup(path)
    target = man.target
    on_gpu = torch.cuda.is_available() and target != "cpu"
    if target != "cpu" and not on_gpu:
        raise ValueError(f"{path} targets {target}: tuning it needs that GPU (compile with --target cpu to "
                         f"exercise the tuner under the interpreter)")
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        try:
            check_triton_mode("cpu")
        except RuntimeError as e:
            raise ValueError(f"tuning on the CPU: {e}") from None
        log("no GPU: candidates run under Triton's interpreter; their timings mean nothing (records are marked "
            "'interpreter' and never presented as measured configs): this tests the mechanism only")
    store = TuningStore() if store is None else store
    hw, spec = hardware_for(target)
    tc = toolchain()
    dtypes, quant = graph_dtypes(graph)
    chosen = {}
    runnable = load_modules(man.root, man.kernels(), device)  # exactly the artifact's kernel code
    todo = units(man, graph, buckets)
    for i, u in enumerate(todo, 1):
        sh = source_hash(u.family, target)
        tag = f"[{i}/{len(todo)}] {u.op} {u.site} {u.bucket.key}"
        if not force:
            hit = store.lookup(u.kernel, sh, u.signature, u.store_bucket, dtypes, quant, hw, tc)
            if hit and hit.tier == "exact" and hit.bucket == u.store_bucket:
                log(f"{tag}: already tuned here")
                chosen[(u.site, u.bucket.key)] = (dict(hit.record.config), _tier_name(hit))
                continue
        cands = unit_candidates(graph, u, spec)
        args = node_inputs(graph, u.node, u.bind(), u.context, device)
        want = get_op(u.op).ref(*[_clone(a) for a in args], **u.node.attr)
        timings, best = [], [None]
        worker = Worker(man.root, u.site, u.bucket.key, u.context) if (on_gpu if isolate is None else isolate) \
            else None
        launcher = site_launcher(runnable, u)

        def objective(meta):
            entry = {"config": dict(meta)}
            entry.update(worker.measure(meta) if worker is not None else
                         measure_candidate(launcher, args, want, meta, u.node.attr, on_gpu))
            timings.append({k: v for k, v in entry.items() if k != "spread"})
            if entry["seconds"] is not None and (best[0] is None or entry["seconds"] < best[0][0]):
                best[0] = (entry["seconds"], meta, entry.get("spread", 0.0))
                log(f"{tag}: best so far {entry['seconds'] * 1e3:.3f} ms {meta}")
            return entry["seconds"]

        n = budget or _default_budget(len(cands), target)
        try:
            search(strategy if len(cands) > n else "exhaustive", cands, objective, budget=n, seed=seed)
        finally:
            if worker is not None:
                worker.close()
        if best[0] is None:
            why = next((t["detail"] for t in timings if t["detail"]), "")
            log(f"{tag}: no candidate ran correctly ({why[:160]}); keeping the compiled config")
            continue
        secs, meta, spread = best[0]
        method = ({"kind": "cuda_events", "reps": 20, "warmup": 5, "l2_flush": True,
                   "cuda_graph": u.bucket.tokens == 1} if on_gpu else {"kind": "interpreter", "meaningless": True})
        rec = TuningRecord(kernel=u.kernel, source_hash=sh, signature=u.signature, bucket=u.store_bucket,
                           dtypes=dtypes, quant=quant, hardware=hw,
                           toolchain={k: tc[k] for k in ("triton", "torch", "cuda")}, config=dict(meta),
                           best_seconds=secs, timings=timings, method=method, spread=spread,
                           measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           host=socket.gethostname(), schema=1)
        store.put(rec)  # stored as soon as the kernel is done: an interrupt keeps it
        chosen[(u.site, u.bucket.key)] = (dict(meta), "exact" if on_gpu else "interpreter")
    _write_manifest(man, chosen)
    agree({"|".join(k): list(v) for k, v in chosen.items()})  # the other ranks wait for these
    return chosen


def _write_manifest(man, chosen: dict) -> None:
    """Record the tuned configs in the artifact's per-site tables. The artifact's writer rewrites the
    manifest under its lock, atomically and sealed with a new digest, merging into the kernel table as
    it is now (concurrent tunes of one artifact keep each other's configs), and refuses an artifact
    recompiled since ``man`` was read."""
    def edit(kernels):
        sites = kernels.get("sites", {})
        for (sid, bkey), (meta, tier) in chosen.items():
            sites[sid].setdefault("configs", {})[bkey] = {"meta": meta, "config_source": tier}
        for op in kernels.get("ops", {}).values():
            for k in ("meta", "config_source", "quantized"):
                op.pop(k, None)
        summarize_ops(kernels["ops"], sites)
    update_kernels(man, edit)
