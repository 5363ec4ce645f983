"""GPU check: every Triton kernel of a V4-Flash artifact against its PyTorch reference, timed.

For each fused op kind, one node of a weight-free V4-Flash graph (bf16 activations, fp8 KV
rows, MXFP4 indexer keys) gets random inputs at each shape set (decode batch 1 and 64,
prefill 4096; contexts 8K and 128K); the kernel's output is checked against the reference,
then both are timed with CUDA events (median of repeated runs after warm-up, L2 flushed
between runs). Achieved GB/s and TFLOP/s use the op's own cost model (`v4c inspect`'s
numbers) and are reported against this device's copy bandwidth and bf16 matmul rate,
measured in the same run.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_<device>_<date>.json
    python benchmarks/gpu_check.py --smoke          # tiny model on the CPU interpreter: checks the script

Budget: well under 8 minutes on an H100/H200 (it stops adding shape sets at --budget-s).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time

import torch


def make_inputs(graph, node, bind, context, device, gen):
    """Random but well-formed inputs for one node: positions at the end of the context, a ring
    holding the last window, caches of valid rows, routing tables in range; integer inputs that
    another op computes (top-k indices, expert permutations) come from running that op's reference."""
    from v4c.graph import get_op
    producer = {o: p for p in graph.nodes for o in p.outputs}
    derived = {}
    for v in node.inputs:
        p = producer.get(v)
        if p is not None and graph.value_types()[v].dtype == "i64" and p.op not in ("window_append",):
            outs = get_op(p.op).ref(*_random_inputs(graph, p, bind, context, device, gen), **p.attr)
            derived.update(zip(p.outputs, outs if isinstance(outs, tuple) else (outs,)))
    own = _random_inputs(graph, node, bind, context, device, gen)
    return [derived.get(v, x) for v, x in zip(node.inputs, own)]


def _random_inputs(graph, node, bind, context, device, gen):
    from v4c.graph import DTYPES
    from v4c.graph.storage import encode
    types = graph.value_types()
    states = dict(graph.states)
    b, t = bind["B"], bind["T"]
    pos = torch.arange(context - t, context, device=device).repeat(b, 1)
    out = []
    for v in node.inputs:
        ty = types[v]
        shape = ty.concrete(bind)
        if v == "pos":
            x = pos
        elif v == "ids":
            x = torch.randint(0, 1000, shape, device=device, generator=gen)
        elif v.endswith("win_pos"):
            w = shape[1]
            last = torch.arange(context - t - w, context - t, device=device)
            x = torch.full(shape, -1, dtype=torch.int64, device=device)
            x[:, last[last >= 0] % w] = last[last >= 0]
        elif ty.dtype in ("i64", "i32"):
            x = torch.randint(0, 6, shape, device=device, generator=gen)  # expert ids / indices in range
        elif ty.dtype == "u8":  # an encoded cache: encode random rows of the logical width
            fmt = node.attr.get("kv_format") or node.attr.get("key_format") or node.attr.get("store")
            d = 512 if fmt == "fp8_ds" else 128
            rows = torch.randn(*shape[:-1], d, device=device, generator=gen)
            x = encode(rows, fmt, 64)
        else:
            x = torch.randn(shape, device=device, generator=gen).to(DTYPES[ty.dtype])
            if v in states or "." in v and v.rsplit(".", 1)[0] in states:
                x = x * 0.5
            elif x.dim() >= 2 and v.startswith("model."):
                x = x * shape[-1] ** -0.5
        out.append(x)
    return out


def time_fn(fn, reps, flush):
    import torch.cuda as cuda
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        s, e = cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return statistics.median(times), (max(times) - min(times)) / statistics.median(times)


def device_ceilings(device):
    n = 1 << 28
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    flush = torch.empty(1 << 26, dtype=torch.uint8, device=device)
    t, _ = time_fn(lambda: b.copy_(a), 10, flush)
    copy_gbs = 2 * n / t / 1e9
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    t, _ = time_fn(lambda: m @ m, 10, flush)
    return copy_gbs, 2 * 8192 ** 3 / t / 1e12


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU interpreter, no timing")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=420)
    a = ap.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --smoke to check the script on the CPU)")
    from v4c.codegen.emit import emit
    from v4c.graph import get_op
    from v4c.graph.registry import Concrete
    from v4c.model.build import build_graph
    from v4c.model.config import V4Config
    from v4c.model.presets import FLASH_HUB_CONFIG, tiny_config_dict
    from v4c.passes import PassManager, default_pipeline
    from v4c.runtime.kernels import load_kernels

    device = torch.device("cpu" if a.smoke else "cuda")
    cfg = V4Config.from_dict(tiny_config_dict() if a.smoke else FLASH_HUB_CONFIG)
    dtype = "f32" if a.smoke else "bf16"
    graph = PassManager(default_pipeline(True, *(("fp32", "fp32") if a.smoke else ("fp8", "fp4")))).run(
        build_graph(cfg, dtype))
    import tempfile
    from pathlib import Path
    emitted = emit(graph, "cpu" if a.smoke else "sm90")
    tmp = Path(tempfile.mkdtemp(prefix="v4c-gpucheck-"))
    for name, src in emitted.modules.values():
        (tmp / name).parent.mkdir(exist_ok=True)
        (tmp / name).write_text(src)
    impls = load_kernels(tmp, emitted.manifest_entry(), device.type)
    shape_sets = [("decode", 1, 1, 8192), ("decode", 64, 1, 8192), ("decode", 1, 1, 131072),
                  ("decode", 64, 1, 131072), ("prefill", 1, 4096, 8192)]
    if a.smoke:
        shape_sets = [("decode", 1, 1, 64), ("prefill", 1, 16, 64)]
    ceilings = (None, None) if a.smoke else device_ceilings(device)
    flush = None if a.smoke else torch.empty(1 << 27, dtype=torch.uint8, device=device)
    first = {}
    for n in graph.nodes:
        if n.op in impls and n.op not in first:
            first[n.op] = n
    results, t_start = [], time.perf_counter()
    gen = torch.Generator(device=device).manual_seed(0)
    for phase, b, t, ctx in shape_sets:
        if time.perf_counter() - t_start > a.budget_s:
            break
        bind = {"B": b, "T": t, "L": ctx}
        for op, node in first.items():
            rec = {"op": op, "node": node.outputs[0], "phase": phase, "batch": b, "tokens": t, "context": ctx}
            try:
                args = make_inputs(graph, node, bind, ctx, device, gen)
                ref_args = [x.clone() for x in args]
                want = get_op(op).ref(*ref_args, **node.attr)
                got = impls[op](*[x.clone() for x in args], **node.attr)
                want = want if isinstance(want, tuple) else (want,)
                got = got if isinstance(got, tuple) else (got,)
                errs = [((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)).item()
                        for g, w in zip(got, want) if w.is_floating_point()]
                rec["max_rel_err"] = max(errs) if errs else 0.0
                types = graph.value_types()
                conc = lambda v: Concrete(types[v].concrete(bind), types[v].dtype)  # noqa: E731
                cost = get_op(op).cost([conc(v) for v in node.inputs], [conc(v) for v in node.outputs], node.attr, ctx)
                rec["flops"], rec["bytes"] = cost.flops, cost.bytes
                if not a.smoke:
                    tk, spread = time_fn(lambda: impls[op](*args, **node.attr), a.reps, flush)
                    tr, _ = time_fn(lambda: get_op(op).ref(*ref_args, **node.attr), max(3, a.reps // 4), flush)
                    rec.update(kernel_s=tk, spread=spread, reference_s=tr, speedup=tr / tk,
                               gbs=cost.bytes / tk / 1e9, tflops=cost.flops / tk / 1e12,
                               bandwidth_frac=cost.bytes / tk / 1e9 / ceilings[0],
                               compute_frac=cost.flops / tk / 1e12 / ceilings[1])
            except Exception as e:  # a failing kernel is a result, not the end of the check
                rec["error"] = f"{type(e).__name__}: {e}"[:300]
            results.append(rec)
            print(json.dumps(rec), flush=True)
    report = {"device": "cpu-interpreter" if a.smoke else torch.cuda.get_device_name(),
              "date": dt.date.today().isoformat(), "torch": torch.__version__,
              "copy_gbs": ceilings[0], "bf16_matmul_tflops": ceilings[1], "results": results,
              "seconds": time.perf_counter() - t_start}
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
    bad = [r for r in results if "error" in r or r.get("max_rel_err", 0) > 5e-2]
    print(f"{len(results)} checks, {len(bad)} failed or inaccurate, {report['seconds']:.0f}s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
