"""GPU check: every Triton kernel of a V4-Flash artifact against its PyTorch reference, timed.

V4-Flash's config is compiled weight-free for this GPU's architecture, as `v4c compile` does (bf16
activations, fp8 KV rows, MXFP4 indexer keys; the release's FP8/MXFP4 weights, and all-bf16 weights),
so every call site runs the config its artifact chose and compiled for each shape bucket (decode batch
1, 16, 64, 256; prefill 512 and 4096 tokens; contexts 8K and 128K). Each site gets random well-formed
inputs (the tuner's); the kernel's output is checked against the reference, then both are timed with
CUDA events (median of repeated runs after warm-up, L2 flushed between runs). Achieved GB/s and TFLOP/s use the op's own cost model (`v4c inspect`'s
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


def _compile(variant: str, smoke: bool, target: str, tmp):
    """A weight-free compile of V4-Flash (the release's FP8/MXFP4 weights, or all-bf16 weights) for this GPU:
    its per-site, per-bucket configs chosen and compiled ahead of time, as `v4c compile` makes them."""
    import v4c
    from v4c.model.presets import FLASH_HUB_CONFIG, tiny_config_dict
    if smoke:
        cfg = tiny_config_dict()
    else:
        cfg = dict(FLASH_HUB_CONFIG)
        if variant == "bf16":
            cfg.pop("quantization_config", None)
            cfg.pop("expert_dtype", None)
    d = tmp / variant
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    return v4c.compile(d, tmp / f"{variant}.v4c", target=target, dtype="f32" if smoke else "bf16",
                       buckets=["B=1,T=1", "B=1,T=16"] if smoke else None,
                       log=lambda s: print(s, file=sys.stderr, flush=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny model, CPU interpreter, no timing")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--budget-s", type=float, default=420)
    ap.add_argument("--variants", default="release,bf16", help="weights: release (FP8/MXFP4), bf16")
    a = ap.parse_args()
    if a.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device (use --smoke to check the script on the CPU)")
    import tempfile
    from pathlib import Path

    from v4c.artifact.shapes import parse_bucket
    from v4c.autotune.inputs import node_inputs
    from v4c.graph import get_op
    from v4c.graph.registry import Concrete
    from v4c.graph.sites import call_sites
    from v4c.graph.text import parse_graph
    from v4c.backends.triton import install_binaries, load_kernels

    device = torch.device("cpu" if a.smoke else "cuda")
    target = "cpu" if a.smoke else "sm%d%d" % torch.cuda.get_device_capability()
    ceilings = (None, None) if a.smoke else device_ceilings(device)
    flush = None if a.smoke else torch.empty(1 << 27, dtype=torch.uint8, device=device)
    contexts = (64,) if a.smoke else (8192, 131072)
    results, t_start = [], time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="v4c-gpucheck-"))
    for variant in a.variants.split(","):
        art = _compile(variant, a.smoke, target, tmp)
        man = json.loads((art / "manifest.json").read_text())
        graph = parse_graph((art / "graph.v4c").read_text())
        if not a.smoke:
            install_binaries(art, man.get("aot"), target)
        impls = load_kernels(art, man["kernels"], device.type)
        sites = {sid: ns[0] for sid, ns in call_sites(graph).items() if sid in man["kernels"]["sites"]}
        types = graph.value_types()
        for bkey in man["kernels"]["buckets"]:
            bucket = parse_bucket(bkey)
            for ctx in contexts:
                if time.perf_counter() - t_start > a.budget_s:
                    break
                if bucket.batch * ctx > 64 * 131072:  # caches past ~10 GB per node: not needed to check a kernel
                    continue
                bind = {"B": bucket.batch, "T": bucket.tokens, "L": ctx}
                for sid, node in sites.items():
                    site = man["kernels"]["sites"][sid]
                    rec = {"variant": variant, "op": node.op, "site": sid, "kernel": site.get("kernel"),
                           "bucket": bkey, "context": ctx, "config": site.get("configs", {}).get(bkey)}
                    try:
                        args = node_inputs(graph, node, bind, ctx, device)
                        clone = lambda xs: [x.clone() if isinstance(x, torch.Tensor) else x for x in xs]  # noqa: E731
                        ref_args = clone(args)
                        want = get_op(node.op).ref(*ref_args, **node.attr)
                        got = impls[sid](*clone(args), **node.attr)
                        want = want if isinstance(want, tuple) else (want,)
                        got = got if isinstance(got, tuple) else (got,)
                        errs = [((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-6)).item()
                                for g, w in zip(got, want) if w.is_floating_point()]
                        rec["max_rel_err"] = max(errs) if errs else 0.0
                        conc = lambda v: Concrete(types[v].concrete(bind), types[v].dtype)  # noqa: E731
                        cost = get_op(node.op).cost([conc(v) for v in node.inputs], [conc(v) for v in node.outputs],
                                                    node.attr, ctx)
                        rec["flops"], rec["bytes"] = cost.flops, cost.bytes
                        if not a.smoke:
                            tk, spread = time_fn(lambda: impls[sid](*args, **node.attr), a.reps, flush)
                            tr, _ = time_fn(lambda: get_op(node.op).ref(*ref_args, **node.attr), max(3, a.reps // 4),
                                            flush)
                            rec.update(kernel_s=tk, spread=spread, reference_s=tr, speedup=tr / tk,
                                       gbs=cost.bytes / tk / 1e9, tflops=cost.flops / tk / 1e12,
                                       bandwidth_frac=cost.bytes / tk / 1e9 / ceilings[0],
                                       compute_frac=cost.flops / tk / 1e12 / ceilings[1])
                    except Exception as e:  # a failing kernel is a result, not the end of the check
                        rec["error"] = f"{type(e).__name__}: {e}"[:300]
                    results.append(rec)
                    print(json.dumps(rec), flush=True)
    report = {"device": "cpu-interpreter" if a.smoke else torch.cuda.get_device_name(), "target": target,
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
