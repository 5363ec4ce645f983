"""``v4c tune``: measure kernel candidates for an artifact's ops, keep every measurement in the
tuning store, and write the winners into the artifact's manifest.

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
import importlib
import json
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..artifact.manifest import MANIFEST, verify_artifact
from ..graph.registry import get_op
from ..graph.text import parse_graph
from ..runtime.kernels import load_modules
from .agree import agree
from .choose import source_hash
from .costmodel import predict
from .inputs import node_inputs
from .problems import hardware_for, problems, toolchain
from .records import TuningRecord
from .search import search
from .space import candidates
from .store import TuningStore
from .worker import Worker

CPU_CONTEXT = 64  # interpreter runs use a short context: they exercise the loop, not the speed


@dataclass
class PlanRow:
    op: str
    signature: str
    bucket: str
    candidates: int
    to_try: int
    covered: str | None
    est_seconds: float


def _setup(path):
    man = verify_artifact(Path(path))
    graph = parse_graph((man.root / man.data["graph"]).read_text())
    return man, graph


def plan(path, strategy: str = "tpe", budget: int | None = None, store: TuningStore | None = None) -> list[PlanRow]:
    """Kernels x buckets x candidates, what the store already covers, estimated GPU time."""
    man, graph = _setup(path)
    target = man.data["target"]
    hw, spec = hardware_for(target)
    ops = man.data["kernels"]["ops"]
    rows = []
    ctx = CPU_CONTEXT if target == "cpu" else None
    for p in problems(graph, set(ops), context=ctx or 131072):
        fam = ops[p.op]["module"]
        mod = importlib.import_module(f"v4c.codegen.templates.{fam}")
        try:
            cands = candidates(mod, p.op, p.shapes(graph), spec)
        except Exception:
            cands = [mod.DEFAULT_META[p.op]]
        n = len(cands) if strategy == "exhaustive" else min(len(cands), budget or _default_budget(len(cands), target))
        found = store.lookup(p.op, source_hash(fam, target), p.signature, p.bucket, p.dtypes, p.quant, hw,
                             toolchain()) if store is not None else None
        guess = predict(p.cost(graph), mod.DEFAULT_META[p.op], p.shapes(graph), spec, p.dtypes)
        # per candidate: compile (~1 s), warm-up and repeats of the kernel
        rows.append(PlanRow(p.op, p.signature, p.bucket, len(cands), n, found.tier if found else None,
                            n * (1.0 + 60 * guess)))
    return rows


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


def measure_candidate(launcher, args, want, meta: dict, attrs: dict, on_gpu: bool) -> dict:
    """Run one candidate: its output must match the reference before its time counts."""
    out = {"seconds": None, "status": "ok", "detail": ""}
    try:
        got = launcher(*[a.clone() for a in args], meta=meta, **attrs)
        if not _close(got, want):
            out.update(status="wrong_result", detail="differs from the op's reference")
        elif on_gpu:
            fresh = [a.clone() for a in args]
            decode = args[0].dim() >= 2 and args[0].shape[1] == 1  # [B, T=1, ...]: a decode step
            out["seconds"], out["spread"] = _measure_cuda(lambda: launcher(*fresh, meta=meta, **attrs), graph=decode)
        else:  # the interpreter: one run, timed only to exercise the loop
            t0 = time.perf_counter()
            launcher(*[a.clone() for a in args], meta=meta, **attrs)
            out["seconds"] = time.perf_counter() - t0
    except Exception as e:  # recorded, not fatal
        kind = "out_of_resources" if "OutOfResources" in type(e).__name__ else "compile_error"
        out.update(status=kind, detail=f"{type(e).__name__}: {e}"[:500])
    return out


def tune(path, strategy: str = "tpe", budget: int | None = None, store: TuningStore | None = None,
         seed: int = 0, log: Callable[[str], None] = print, force: bool = False, isolate: bool | None = None) -> dict:
    """Tune every kernel op of the artifact at ``path``; returns op -> (meta, tier).
    Under torch.distributed only rank 0 measures; every rank returns rank 0's choices.
    ``isolate`` (default: on with a GPU) measures candidates in a child process."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return {op: tuple(v) for op, v in agree({}).items()}
    man, graph = _setup(path)
    target = man.data["target"]
    on_gpu = torch.cuda.is_available() and target != "cpu"
    if target != "cpu" and not on_gpu:
        raise ValueError(f"{path} targets {target}: tuning it needs that GPU (compile with --target cpu to "
                         f"exercise the tuner under the interpreter)")
    device = "cuda" if on_gpu else "cpu"
    if not on_gpu:
        os.environ["TRITON_INTERPRET"] = "1"
    store = TuningStore() if store is None else store
    hw, spec = hardware_for(target)
    tc = toolchain()
    ops = man.data["kernels"]["ops"]
    ctx = 131072 if on_gpu else CPU_CONTEXT
    chosen = {}
    runnable = load_modules(man.root, man.data["kernels"], device)  # exactly the artifact's kernel code
    todo = problems(graph, set(ops), context=ctx)
    for i, p in enumerate(todo, 1):
        fam = ops[p.op]["module"]
        sh = source_hash(fam, target)
        if not force:
            hit = store.lookup(p.op, sh, p.signature, p.bucket, p.dtypes, p.quant, hw, tc)
            if hit and hit.tier == "exact":
                log(f"[{i}/{len(todo)}] {p.op}: already tuned here ({p.bucket})")
                chosen.setdefault(p.op, (dict(hit.record.config), "exact"))
                continue
        mod = importlib.import_module(f"v4c.codegen.templates.{fam}")
        try:
            cands = candidates(mod, p.op, p.shapes(graph), spec)
        except Exception:
            cands = []
        cands = cands or [dict(mod.DEFAULT_META[p.op])]
        bind = {"B": p.batch, "T": p.tokens, "L": p.context}
        args = node_inputs(graph, p.node, bind, p.context, device)
        want = get_op(p.op).ref(*[a.clone() for a in args], **p.node.attr)
        timings, best = [], [None]
        worker = Worker(man.root, p.op, p.signature, p.context, p.tokens) if (
            on_gpu if isolate is None else isolate) else None

        def objective(meta):
            launcher = runnable[fam].KERNELS[p.op]
            entry = {"config": dict(meta)}
            entry.update(worker.measure(meta) if worker is not None else
                         measure_candidate(launcher, args, want, meta, p.node.attr, on_gpu))
            timings.append({k: v for k, v in entry.items() if k != "spread"})
            if entry["seconds"] is not None and (best[0] is None or entry["seconds"] < best[0][0]):
                best[0] = (entry["seconds"], meta, entry.get("spread", 0.0))
                log(f"[{i}/{len(todo)}] {p.op} {p.bucket}: best so far {entry['seconds'] * 1e3:.3f} ms {meta}")
            return entry["seconds"]

        n = budget or _default_budget(len(cands), target)
        try:
            search(strategy if len(cands) > n else "exhaustive", cands, objective, budget=n, seed=seed)
        finally:
            if worker is not None:
                worker.close()
        if best[0] is None:
            why = next((t["detail"] for t in timings if t["detail"]), "")
            log(f"[{i}/{len(todo)}] {p.op}: no candidate ran correctly ({why[:160]}); keeping the default")
            continue
        secs, meta, spread = best[0]
        method = ({"kind": "cuda_events", "reps": 20, "warmup": 5, "l2_flush": True, "cuda_graph": p.tokens == 1}
                  if on_gpu else {"kind": "interpreter", "meaningless": True})
        rec = TuningRecord(kernel=p.op, source_hash=sh, signature=p.signature, bucket=p.bucket, dtypes=p.dtypes,
                           quant=p.quant, hardware=hw, toolchain={k: tc[k] for k in ("triton", "torch", "cuda")},
                           config=dict(meta), best_seconds=secs, timings=timings, method=method, spread=spread,
                           measured_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           host=socket.gethostname(), schema=1)
        store.put(rec)  # stored as soon as the kernel is done: an interrupt keeps it
        chosen.setdefault(p.op, (dict(meta), "exact"))
    _write_manifest(man, chosen)
    agree({op: list(v) for op, v in chosen.items()})  # the other ranks wait for these
    return chosen


def _write_manifest(man, chosen: dict) -> None:
    """Record the tuned configs in the artifact (the manifest is rewritten atomically)."""
    data = json.loads(json.dumps(man.data))
    for op, (meta, tier) in chosen.items():
        data["kernels"]["ops"][op].update(meta=meta, config_source=tier)
    tmp = man.root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, man.root / MANIFEST)
