"""Ahead-of-time compilation of an artifact's kernel launches for a GPU target, and the config choice
it decides.

For every kernel call site and shape bucket, the candidates ``autotune/choose.py`` listed are tried in
order, a few per round: each candidate's launches are recorded (``capture.py``) at the bucket's shapes
and the artifact's context, compiled with Triton's own compiler (``launches.py``; distinct launches
once, in parallel worker processes, results cached across compiles), and judged: every launch must
compile and fit the target's shared memory, and should not spill. Among the candidates of a round that
pass, the cost model ranks again with the compiler's registers and shared memory; a tuning record that
passes is kept as it is. A site and bucket that no candidate passes fails the compile, naming the
kernel, the config and the compiler's message (or, with ``allow_fallback``, runs on the op's reference);
when every candidate only spills, the least spilling one is kept and the report says so.

The chosen launches' binaries are copied into the artifact (``aot/<key>/``) for a GPU with the same
target and Triton build to load without compiling.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..artifact.shapes import Bucket
from ..artifact.writer import put_aot_binary
from ..autotune.choose import concrete, site_shapes
from ..autotune.costmodel import predict
from ..autotune.devices import device_for_target
from ..codegen.emit import Emitted
from ..errors import V4CError
from ..graph.ir import Graph
from ..graph.registry import get_op
from ..graph.sites import call_sites
from .pool import WorkerPool, default_workers
from .results import ResultCache
from .targets import shared_memory_limit

PER_ROUND = 2  # candidates compiled per site and bucket in one round


class AOTError(V4CError):
    """A kernel launch that does not compile or fit for the target."""


@dataclass
class Options:
    target: str
    workers: int | None = None
    allow_fallback: bool = False
    cache: ResultCache | None = None
    log: Callable[[str], None] = lambda s: None


def _task(graph: Graph, node, site: dict, bucket: Bucket, context: int, meta: dict) -> dict:
    ins, _ = concrete(graph, node, bucket, context)
    return {"launcher": [site["launcher"], node.op], "inputs": [{"dtype": c.dtype, "shape": list(c.shape)} for c in ins],
            "attrs": node.attr, "meta": meta}


def _module_ref(emitted: Emitted, family: str, root: Path) -> dict:
    entry = emitted.module_entry(family)
    return {"path": str(root / entry["file"]), "sha256": entry["sha256"],
            "name": f"v4c_kernels_{family}_{entry['sha256'][:12]}"}


def _verdict(results: list[dict], smem_limit: int) -> tuple[str, str | None]:
    """("pass" | "spills" | "fails", reason) for one candidate's launch results."""
    for r in results:
        if not r.get("ok"):
            return "fails", f"{r['kernel']}: {r.get('error', 'did not compile')}"
        if r["shared_bytes"] > smem_limit:
            return "fails", f"{r['kernel']}: needs {r['shared_bytes']} B of shared memory (> {smem_limit})"
    spills = [r for r in results if r.get("spill_bytes")]
    if spills:
        return "spills", ", ".join(f"{r['kernel']} spills {r['spill_bytes']} B" for r in spills)
    return "pass", None


def compile_ahead(graph: Graph, emitted: Emitted, root: Path, buckets: list[Bucket], context: int,
                  opts: Options) -> dict:
    """Choose every site's config per bucket by compiling for ``opts.target`` (``emitted.sites[*]
    ["configs"]`` is replaced), copy the chosen binaries into the artifact being written at ``root``, and
    return the ``aot`` record. ``root`` holds the rendered kernel modules already."""
    t0 = time.perf_counter()
    target, log = opts.target, opts.log
    cache = opts.cache or ResultCache()
    smem_limit = shared_memory_limit(target)
    spec = device_for_target(target)
    nodes = {sid: ns[0] for sid, ns in call_sites(graph, {s["op"] for s in emitted.sites.values()}).items()}
    pending = {(sid, b.key): 0 for sid, s in emitted.sites.items() if s["module"] for b in buckets}
    by_key = {b.key: b for b in buckets}
    chosen: dict = {}
    failures: dict = {}
    spilled: dict = {}  # (sid, bucket) -> (spill bytes, candidate, results, reason): the fallback if all spill
    compiled = rounds = 0
    workers = opts.workers or default_workers()
    with WorkerPool(workers, cache.triton) as pool:
        while pending:
            rounds += 1
            trials = []  # (sid, bkey, candidate index, request)
            for (sid, bkey), start in sorted(pending.items()):
                site = emitted.sites[sid]
                for i in range(start, min(start + PER_ROUND, len(site["candidates"][bkey]))):
                    cand = site["candidates"][bkey][i]
                    trials.append((sid, bkey, i, {
                        "cmd": "capture", "target": target, "module": _module_ref(emitted, site["module"], root),
                        "task": _task(graph, nodes[sid], site, by_key[bkey], context, cand["meta"])}))
            replies = pool.map([t[3] for t in trials])
            launch_keys, todo = {}, {}
            for (sid, bkey, i, req), rep in zip(trials, replies):
                if "error" in rep:
                    launch_keys[(sid, bkey, i)] = rep
                    continue
                launch_keys[(sid, bkey, i)] = rep["launches"]
                for j, x in enumerate(rep["launches"]):
                    if x["key"] not in todo and cache.get(x["key"]) is None:
                        todo[x["key"]] = {**req, "cmd": "compile", "index": j}
            if todo:
                log(f"aot {target}: round {rounds}: {len(trials)} candidate configs, {len(todo)} launches to compile "
                    f"on {workers} worker(s)")
                results = pool.map(list(todo.values()), progress=_Progress(log, f"aot {target}: compiled"))
                for key, rep in zip(todo, results):
                    if "error" in rep:
                        raise AOTError(f"AOT worker failed on {todo[key]['task']['launcher'][1]}: {rep['error']}")
                    cache.put(key, rep["result"])
                compiled += len(todo)
            for (sid, bkey), start in sorted(pending.items()):
                site = emitted.sites[sid]
                cands = site["candidates"][bkey]
                stop = min(start + PER_ROUND, len(cands))
                passing = []
                for i in range(start, stop):
                    got = launch_keys[(sid, bkey, i)]
                    if isinstance(got, dict):  # the launcher itself refused the config at these shapes
                        failures.setdefault((sid, bkey), []).append((cands[i], got["error"]))
                        continue
                    res = [dict(cache.get(x["key"]) or {"ok": False, "error": "no result", **x}, key=x["key"])
                           for x in got]
                    verdict, why = _verdict(res, smem_limit)
                    if verdict == "pass":
                        passing.append((i, res))
                    else:
                        failures.setdefault((sid, bkey), []).append((cands[i], why))
                        if verdict == "spills":
                            spill = sum(r.get("spill_bytes", 0) for r in res)
                            if (sid, bkey) not in spilled or spill < spilled[(sid, bkey)][0]:
                                spilled[(sid, bkey)] = (spill, cands[i], res, why)
                if passing:
                    i, res = _best(passing, cands, graph, nodes[sid], by_key[bkey], context, spec, site)
                    chosen[(sid, bkey)] = (cands[i], res, None)
                    del pending[(sid, bkey)]
                elif stop >= len(cands):
                    del pending[(sid, bkey)]
                    if (sid, bkey) in spilled:
                        _, cand, res, why = spilled[(sid, bkey)]
                        chosen[(sid, bkey)] = (cand, res, f"every candidate spills; least: {why}")
                else:
                    pending[(sid, bkey)] = stop
    return _finish(emitted, root, buckets, chosen, failures, opts, cache, compiled, rounds, time.perf_counter() - t0)


class _Progress:
    """``done/total`` at most every few seconds, and at the end."""

    def __init__(self, log, what: str, every: float = 5.0):
        self.log, self.what, self.every, self.last = log, what, every, time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if done == total or now - self.last >= self.every:
            self.last = now
            self.log(f"  {self.what} {done}/{total}")


def _best(passing, cands, graph, node, bucket, context, spec, site):
    """The passing candidate to keep: a tuning record as it is, else the cost model's pick with the
    compiler's registers and shared memory."""
    for i, res in passing:
        if cands[i]["config_source"] not in ("cost-model", "default", "interpreter"):
            return i, res
    if len(passing) == 1:
        return passing[0]
    ins, outs = concrete(graph, node, bucket, context)
    cost = get_op(node.op).cost(ins, outs, node.attr, context)
    shapes = site_shapes(graph, node, bucket, context)
    dtype = "fp8" if site["launcher"] == "QUANTIZED" else shapes["dtype"]

    def seconds(item):
        i, res = item
        measured = {"registers": max(r["registers"] for r in res), "shared_bytes": max(r["shared_bytes"] for r in res)}
        s = predict(cost, cands[i]["meta"], shapes, spec, dtype, measured)
        return (s if math.isfinite(s) else math.inf, i)

    return min(passing, key=seconds)


def _finish(emitted, root, buckets, chosen, failures, opts, cache, compiled, rounds, seconds) -> dict:
    target = opts.target
    launches, missing = [], []
    binaries: dict = {}
    for sid, site in sorted(emitted.sites.items()):
        if not site["module"]:
            continue
        for b in buckets:
            got = chosen.get((sid, b.key))
            if got is None:
                tried = failures.get((sid, b.key), [])
                missing.append((sid, site, b.key, tried))
                continue
            cand, res, note = got
            site["configs"][b.key] = {k: v for k, v in cand.items()}
            if note:
                site["configs"][b.key]["aot_note"] = note
            for r in res:
                launches.append({"kernel": r["kernel"], "op": site["op"], "site": sid, "bucket": b.key,
                                 "target": target, "ok": bool(r.get("ok")), "registers": r.get("registers"),
                                 "spill_bytes": r.get("spill_bytes"), "shared_bytes": r.get("shared_bytes"),
                                 "num_warps": r.get("num_warps"), "num_stages": r.get("num_stages"),
                                 "key": r["key"]})
                if r["key"] not in binaries and r.get("files"):
                    binaries[r["key"]] = _copy_binary(root, r["key"], r["files"])
    if missing:
        lines = []
        for sid, site, bkey, tried in missing:
            last = tried[-1] if tried else ({"meta": {}}, "no candidate")
            lines.append(f"{site['op']} ({sid}) at {bkey}: {len(tried)} config(s) tried; last "
                         f"{last[0]['meta']}: {last[1]}")
        if not opts.allow_fallback:
            raise AOTError(f"{len(missing)} kernel call(s) do not compile or fit for {target} "
                           f"(--allow-fallback runs them on their PyTorch references):\n  " + "\n  ".join(lines))
        for (sid, site, bkey, tried), line in zip(missing, lines):
            site["configs"][bkey] = {"config_source": "reference", "reason": line}
            opts.log(f"aot {target}: on the reference: {line}")
    triton_version, tkey = _toolchain()
    rejected = [{"site": sid, "bucket": bkey, "meta": cand["meta"], "config_source": cand["config_source"],
                 "reason": why} for (sid, bkey), tried in sorted(failures.items()) for cand, why in tried]
    return {"target": target, "triton": triton_version, "triton_key": tkey, "launches": launches,
            "binaries": binaries, "rejected": rejected, "compiled": compiled, "rounds": rounds,
            "seconds": round(seconds, 2), "fallback": len(missing)}


def _copy_binary(root: Path, key: str, files: list[str]) -> dict:
    """The launch's cache entry (kernel metadata JSON and cubin) copied into the artifact being written at
    ``root``, where the artifact's layout puts it; returns its entry of the ``aot`` record's binaries."""
    return put_aot_binary(root, key, files)


def _toolchain() -> tuple[str, str]:
    import hashlib

    import triton
    from triton.runtime.cache import triton_key
    return triton.__version__, hashlib.sha256(triton_key().encode()).hexdigest()
