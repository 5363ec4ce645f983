"""Where a decode step's time goes on the cpu backend: time per op (and per implementation bound),
and A/B of ops' implementations inside the same process.

    python benchmarks/decode_ops.py [--config 478m|FILE.json] [--dtype f32|bf16] [--batch 1 8]
                                    [--prompt 2048] [--steps 16] [--ab old|moe_ffn=decode] [--json out.json]
                                    [--experts plain|mxfp4]

The model of ``--config`` (bench_configs.py) is written, compiled and loaded once per dtype (in
``--workdir``, shared with cpu_vs_hf.py's layout). For each batch size a session is prefilled with
``--prompt`` random tokens; then ``--steps`` decode steps run with every node's call timed (the op's
time includes its share of dispatch: a plain Python call per node; per node the median over the
steps, so a step in which another process took the core does not count), and as many untimed steps
give the step time itself. ``--ab OP=IMPL[,...]`` also runs steps with the nodes of each OP rebound
to IMPL (the cpu backend's implementation of that name, its checker still asked), alternating with
the steps as bound, and reports the best and median of each: a ratio that a machine busy with other
work disturbs less than two separate runs would. ``--ab old`` names the implementations bound
before the C products of issue 22 (the PyTorch MoE and products, the reference output projection).
``--experts mxfp4`` measures the checkpoint ``cpu_vs_llamacpp.py`` runs instead: routed experts MXFP4 as
released, every other matrix unquantised (``--ab moe_ffn=per-expert``: the PyTorch path quantised experts
took before the C kernels of native/quant.c).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from bench_configs import artifact, describe, load_config


# what the decode steps ran before the C products (``--ab old``)
OLD = dict(moe_ffn="decode", o_proj="reference", linear="reference", q_proj="native", kv_proj="native",
           linear_rms_norm="torch", moe_router="torch", compressor="decode", indexer="decode")


def rebound(model, pairs: dict) -> list:
    """The model's decode plan with the nodes of each op in ``pairs`` bound to the implementation named."""
    from v4c.backends import calls, get_backend
    ex = model.executor
    cpu = get_backend("cpu")
    impls = {op: cpu.impl(op, name) for op, name in pairs.items()}
    plan = list(ex.plans["decode"])
    for i, call in enumerate(calls(ex.graph, "cpu", "decode", ex.params)):
        impl = impls.get(call.op)
        if impl is not None:
            why = impl.declines(call)
            if why is not None:
                raise SystemExit(f"--ab {call.op}={impl.name}: it declines node %{call.node.outputs[0]}: {why}")
            plan[i] = (impl.make(call, ex.context), *plan[i][1:])
    return plan


def timed_plan(plan: list, acc: list) -> list:
    """``plan`` with every call timed into ``acc[node]`` (a list per node)."""
    def wrap(fn, times):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            r = fn(*a, **kw)
            times.append(time.perf_counter() - t0)
            return r
        return timed
    return [(wrap(p[0], times), *p[1:]) for p, times in zip(plan, acc)]


def _per_op(plan: list, impls: list, acc: list) -> list:
    """Per (op, implementation): the sum over its nodes of each node's median time."""
    per_op, nodes = defaultdict(float), defaultdict(int)
    for p, name, node_times in zip(plan, impls, acc):
        per_op[(p[5], name)] += statistics.median(node_times)
        nodes[(p[5], name)] += 1
    return [{"op": op, "implementation": name, "seconds_per_step": t, "nodes": nodes[(op, name)]}
            for (op, name), t in sorted(per_op.items(), key=lambda kv: -kv[1])]


def measure(model, batch: int, prompt: int, steps: int, ab: dict | None) -> dict:
    import torch
    ex = model.executor
    vocab = model.config.vocab_size
    bound = ex.plans["decode"]
    impls = [c.impl.name for c in ex.choices["decode"]]
    plans, names = {"bound": bound}, {"bound": impls}
    alt = ",".join(f"{op}={name}" for op, name in (ab or {}).items())
    if ab:
        plans[alt] = rebound(model, ab)
        names[alt] = [ab.get(p[5], n) for p, n in zip(bound, impls)]
    s = model.new_session(batch, max_context=prompt + 3 * steps * len(plans) + 8)
    step = torch.randint(0, vocab, (batch, 1))
    acc = {name: [[] for _ in bound] for name in plans}
    timed = {name: timed_plan(plan, acc[name]) for name, plan in plans.items()}
    times = {name: [] for name in plans}
    with torch.inference_mode():
        s.forward(torch.randint(0, vocab, (batch, prompt)))
        for plan in plans.values():  # warm-up: the first step of each plan (lazy per-shape work)
            ex.plans["decode"] = plan
            s.forward(step)
        for _ in range(steps):  # alternating: drift of the machine hits every plan alike
            for name in plans:
                ex.plans["decode"] = timed[name]
                s.forward(step)
            for name, plan in plans.items():
                ex.plans["decode"] = plan
                t0 = time.perf_counter()
                s.forward(step)
                times[name].append(time.perf_counter() - t0)
        ex.plans["decode"] = bound
    out = {"batch": batch, "prompt": prompt, "steps": steps, "threads": torch.get_num_threads(),
           "ops": {name: _per_op(plans[name], names[name], acc[name]) for name in plans},
           "step_seconds": {name: {"best": min(v), "median": statistics.median(v)} for name, v in times.items()}}
    if ab:
        out["ab_ratio_best"] = out["step_seconds"][alt]["best"] / out["step_seconds"]["bound"]["best"]
        out["ab_ratio_median"] = out["step_seconds"][alt]["median"] / out["step_seconds"]["bound"]["median"]
    return out


def report(dtype: str, r: dict) -> None:
    print(f"{dtype} batch {r['batch']} after {r['prompt']} tokens, {r['threads']} threads:")
    for name, v in r["step_seconds"].items():
        total = sum(o["seconds_per_step"] for o in r["ops"][name])
        print(f"  {name}: step {v['best'] * 1e3:.2f} ms best, {v['median'] * 1e3:.2f} median; per op (sum of "
              f"the nodes' medians) {total * 1e3:.2f} ms")
        for o in r["ops"][name]:
            print(f"    {o['op']:18s} {o['implementation']:14s} x{o['nodes']:<3d} {o['seconds_per_step'] * 1e3:7.3f} ms "
                  f"{100 * o['seconds_per_step'] / total:5.1f} %")
    if "ab_ratio_best" in r:
        print(f"  the other plan's step over the bound one's: {r['ab_ratio_best']:.2f}x best, "
              f"{r['ab_ratio_median']:.2f}x median")


def release_artifact(cfg: dict, work: Path, dtype: str) -> Path:
    """``artifact`` for the checkpoint with MXFP4 routed experts (``cpu_vs_llamacpp.write_release_checkpoint``)."""
    import shutil

    import v4c
    from cpu_vs_llamacpp import write_release_checkpoint
    ckpt, art = work / f"{dtype}-mxfp4" / "ckpt", work / f"{dtype}-mxfp4" / "art"
    stamp = ckpt / "bench_config.json"
    if not stamp.exists() or json.loads(stamp.read_text()) != cfg:
        shutil.rmtree(ckpt, ignore_errors=True)
        write_release_checkpoint(cfg, ckpt, dtype)
        stamp.write_text(json.dumps(cfg))
        shutil.rmtree(art, ignore_errors=True)
    if not art.exists():
        v4c.compile(ckpt, art, target="cpu", dtype=dtype, weights="reference")
    return art


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="478m", help=f"a preset or a JSON file of config fields. {describe()}")
    ap.add_argument("--dtype", choices=["f32", "bf16", "f16"], default=None, help="one dtype (default: f32, then bf16)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt", type=int, default=2048, help="tokens prefilled before the decode steps")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ab", default=None, metavar="OP=IMPL[,OP=IMPL...]",
                    help="also run steps with OP's nodes bound to implementation IMPL (several: comma-separated)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: as v4c sets them)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--experts", choices=["plain", "mxfp4"], default="plain",
                    help="routed experts unquantised (the preset's checkpoint) or MXFP4 as released")
    a = ap.parse_args()
    ab = None
    if a.ab == "old":
        ab = OLD
    elif a.ab:
        pairs = [p.split("=", 1) for p in a.ab.split(",")]
        if any(len(p) != 2 for p in pairs):
            raise SystemExit(f"--ab must be OP=IMPL[,OP=IMPL...], got {a.ab!r}")
        ab = dict(pairs)
    import v4c
    name, cfg = load_config(a.config)
    work = (a.workdir or Path(tempfile.mkdtemp(prefix="v4c-ops-"))) / name
    result = {"config": name, "experts": a.experts,
              "command": " ".join(["python", "benchmarks/decode_ops.py", *sys.argv[1:]]), "runs": {}}
    for dtype in [a.dtype] if a.dtype else ["f32", "bf16"]:
        model = v4c.load((release_artifact if a.experts == "mxfp4" else artifact)(cfg, work, dtype))
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        result["runs"][dtype] = []
        for batch in a.batch:
            r = measure(model, batch, a.prompt, a.steps, ab)
            result["runs"][dtype].append(r)
            report(dtype, r)
        del model
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
