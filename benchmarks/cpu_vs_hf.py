"""v4c's torch backend against Hugging Face's DeepseekV4ForCausalLM on the same CPU and checkpoint.

A mid-size random checkpoint (hidden 1024, 8 layers in V4-Flash's pattern: 2 sliding, then
CSA/HCA alternating; 64 experts top-6, 3 hash layers; 16 heads of 128; window 128; 16 indexer
heads of 128, top-256) is written at run time; v4c compiles it and both engines load it.
Every measurement runs in a fresh child process (so peak resident memory is that engine's own),
and the two engines alternate: v4c, HF, v4c, HF for each measurement.

    python benchmarks/cpu_vs_hf.py [--dtype f32|bf16] [--json out.json] [--quick]

Measured: prefill tokens/s (T = 512, 4096), decode tokens/s (batch 1 and 8, 128 steps after a
2,048-token prompt), peak RSS of each, their ratios; then v4c alone at contexts 4K/16K/64K
(prefill time, decode time per token) next to `v4c inspect`'s FLOPs per decoded token and its
indexer-scan term; and the machine's copy bandwidth and matmul rate.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def bench_config(quick: bool) -> dict:
    from v4c.model.presets import tiny_config_dict
    cfg = dict(vocab_size=16384, hidden_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
               num_attention_heads=16, head_dim=128, q_lora_rank=512, partial_rotary_factor=0.5, o_groups=4,
               o_lora_rank=256, n_routed_experts=64, num_experts_per_tok=6, index_n_heads=16, index_head_dim=128,
               index_topk=256, sliding_window=128, compress_rates={CSA: 4, HCA: 128},
               layer_types=[SWA, SWA, CSA, HCA, CSA, HCA, CSA, HCA], mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 5,
               max_position_embeddings=131072,
               rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192,
                                "beta_fast": 32, "beta_slow": 1})
    if quick:  # the same shape of model, small enough for a smoke run
        cfg.update(vocab_size=2048, hidden_size=256, num_attention_heads=4, head_dim=64, q_lora_rank=128,
                   o_lora_rank=64, n_routed_experts=16, moe_intermediate_size=64, index_n_heads=4,
                   index_head_dim=64, index_topk=32, sliding_window=32, compress_rates={CSA: 4, HCA: 32})
    return tiny_config_dict(**cfg)


# ---- the child process: one engine, one measurement ------------------------------------------

def _worker(a) -> dict:
    import torch
    torch.manual_seed(0)
    vocab = json.loads((Path(a.ckpt) / "config.json").read_text())["vocab_size"]
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if a.engine == "v4c":
        import v4c
        model = v4c.load(a.art)

        def session(batch, ctx):
            s = model.new_session(batch, max_context=ctx)
            return lambda ids: s.forward(ids)
    else:
        from transformers import DeepseekV4ForCausalLM, DynamicCache
        hf = DeepseekV4ForCausalLM.from_pretrained(a.ckpt, dtype=dtype, attn_implementation="eager").eval()

        def session(batch, ctx):
            cache = DynamicCache(config=hf.config)
            return lambda ids: hf(ids, past_key_values=cache, use_cache=True).logits

    def ids(b, t):
        return torch.randint(0, vocab, (b, t))

    out = {"engine": a.engine, "task": a.task, "T": a.T, "batch": a.batch}
    with torch.inference_mode():
        session(1, 64)(ids(1, 16))  # warm-up: first touch of every weight page, lazy inits
        if a.task == "prefill":
            times = []
            for _ in range(a.repeat):
                fwd = session(1, a.T + 1)
                x = ids(1, a.T)
                t0 = time.perf_counter()
                fwd(x)
                times.append(time.perf_counter() - t0)
            out["seconds"] = min(times)
            out["tokens_per_s"] = a.T / out["seconds"]
        else:
            fwd = session(a.batch, a.T + a.steps + 1)
            t0 = time.perf_counter()
            fwd(ids(a.batch, a.T))
            out["prefill_seconds"] = time.perf_counter() - t0
            step = ids(a.batch, 1)
            fwd(step)  # the first step after a prefill (lazy per-shape work) is not timed
            rss0, faults0 = _rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            for _ in range(a.steps):
                fwd(step)
            dt = time.perf_counter() - t0
            # memory the decode loop newly touches: page faults and resident growth over its steps
            out["page_faults_per_step"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / a.steps
            out["rss_growth_mib"] = _rss_mib() - rss0
            out["seconds_per_step"] = dt / a.steps
            out["tokens_per_s"] = a.batch * a.steps / dt
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


def _status_mib(field: str) -> float | None:
    """A field of /proc/self/status in MiB (None where there is no such file)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _rss_mib() -> float:
    """This process's resident set now (VmRSS)."""
    v = _status_mib("VmRSS")
    return float("nan") if v is None else v


def _peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM: unlike ru_maxrss it does not carry the parent's peak
    across fork + exec)."""
    v = _status_mib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if v is None else v


def run_child(common: list[str], **kw) -> dict:
    args = [sys.executable, __file__, "--worker", *common]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"child {kw} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the machine -------------------------------------------------------------------------------

def machine() -> dict:
    import torch
    a = torch.randn(32 * 2 ** 20)  # 128 MiB, well beyond the caches
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "copy_gb_per_s": 2 * a.numel() * 4 / best / 1e9}
    for name, dt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        x, w = torch.randn(512, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        torch.nn.functional.linear(x, w)
        best = min(_timed(lambda: torch.nn.functional.linear(x, w)) for _ in range(3))
        out[f"matmul_gflop_per_s_{name}"] = 2 * 512 * 2048 * 2048 / best / 1e9
    try:
        out["cpu"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return out


def _timed(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


# ---- the driver -------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="bf16",
                    help="checkpoint and compute dtype of both engines (bf16: the released models' dtype)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a small model and short runs (a smoke test)")
    ap.add_argument("--no-context", action="store_true", help="skip the 4K/16K/64K context sweep")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoint and artifact here")
    # child-process arguments
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("engine", "task", "ckpt", "art"):
        ap.add_argument(f"--{name}", help=argparse.SUPPRESS)
    for name, default in (("T", 0), ("batch", 1), ("steps", 0), ("repeat", 1)):
        ap.add_argument(f"--{name}", type=int, default=default, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(_worker(a)))
        return

    import v4c
    from v4c.graph.terms import flops_by_term
    from v4c.inspect import inspect_artifact
    from v4c.graph.text import parse_graph
    from v4c.model.random_weights import write_random_checkpoint

    work = a.workdir or Path(tempfile.mkdtemp(prefix="v4c-bench-"))
    ckpt, art = work / "ckpt", work / "art"
    if not (ckpt / "model.safetensors").exists():
        print(f"writing a random checkpoint to {ckpt}", file=sys.stderr)
        write_random_checkpoint(bench_config(a.quick), ckpt, seed=0, dtype=a.dtype)
    if not art.exists():
        v4c.compile(ckpt, art, target="cpu", dtype=a.dtype, weights="reference")
    info = inspect_artifact(art, context=2048)
    common = ["--ckpt", str(ckpt), "--art", str(art), "--dtype", a.dtype]
    q = a.quick
    prefill_lengths = [64, 256] if q else [512, 4096]
    decode_prompt, steps = (256, 16) if q else (2048, 128)

    result = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/cpu_vs_hf.py", *sys.argv[1:]]),
              "machine": machine(), "dtype": a.dtype, "quick": q,
              "model": {"params": info["params"], "config": {k: info["config"][k] for k in (
                  "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "n_routed_experts",
                  "num_experts_per_tok", "sliding_window", "index_n_heads", "index_head_dim", "index_topk")},
                  "schedule": info["schedule"]},
              "prefill": [], "decode": [], "context": []}
    print(json.dumps(result["machine"]), file=sys.stderr)

    def pair(**kw):
        rows = {}
        for engine in ("v4c", "hf", "v4c", "hf"):  # alternating: drift of the machine hits both
            r = run_child(common, engine=engine, **kw)
            print(f"  {engine:4s} {kw} -> {r['tokens_per_s']:.1f} tok/s, {r['peak_rss_mib']:.0f} MiB", file=sys.stderr)
            if engine not in rows or r["tokens_per_s"] > rows[engine]["tokens_per_s"]:
                rows[engine] = r
        v, h = rows["v4c"], rows["hf"]
        return {**kw, "v4c": v, "hf": h, "speedup": v["tokens_per_s"] / h["tokens_per_s"],
                "rss_ratio": v["peak_rss_mib"] / h["peak_rss_mib"]}

    for t in prefill_lengths:
        result["prefill"].append(pair(task="prefill", T=t, repeat=1 if t > 1024 else 2))
    for b in (1, 8):
        result["decode"].append(pair(task="decode", T=decode_prompt, batch=b, steps=steps))

    if not a.no_context:
        graph = parse_graph((art / "graph.v4c").read_text())
        for ctx in ([512, 1024] if q else [4096, 16384, 65536]):
            r = run_child(common, engine="v4c", task="decode", T=ctx, batch=1, steps=4 if q else 16)
            ins = inspect_artifact(art, context=ctx)
            row = {"context": ctx, "prefill_seconds": r["prefill_seconds"], "decode_seconds_per_token":
                   r["seconds_per_step"], "peak_rss_mib": r["peak_rss_mib"],
                   "inspect_flops_per_token": ins["flops_per_token"],
                   "inspect_bytes_per_step": ins["bytes_per_decode_step"]}
            row["inspect_flops_by_term"] = flops_by_term(graph, ctx)
            result["context"].append(row)
            print(f"  context {ctx}: prefill {r['prefill_seconds']:.1f}s, decode {r['seconds_per_step'] * 1e3:.1f} ms/token",
                  file=sys.stderr)

    print()
    print(f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
          f"copy {result['machine']['copy_gb_per_s']:.1f} GB/s, matmul f32 "
          f"{result['machine']['matmul_gflop_per_s_f32']:.0f} / bf16 {result['machine']['matmul_gflop_per_s_bf16']:.0f}"
          f" GFLOP/s; model {info['params'] / 1e6:.0f}M params, {a.dtype}")
    for r in result["prefill"]:
        print(f"prefill T={r['T']:5d}: v4c {r['v4c']['tokens_per_s']:8.1f} tok/s  HF {r['hf']['tokens_per_s']:8.1f} tok/s"
              f"  ratio {r['speedup']:5.2f}x   peak RSS {r['v4c']['peak_rss_mib']:.0f} / {r['hf']['peak_rss_mib']:.0f} MiB")
    for r in result["decode"]:
        print(f"decode B={r['batch']}:     v4c {r['v4c']['tokens_per_s']:8.1f} tok/s  HF {r['hf']['tokens_per_s']:8.1f} tok/s"
              f"  ratio {r['speedup']:5.2f}x   peak RSS {r['v4c']['peak_rss_mib']:.0f} / {r['hf']['peak_rss_mib']:.0f} MiB"
              f"   page faults/step {r['v4c']['page_faults_per_step']:.1f} / {r['hf']['page_faults_per_step']:.1f}")
    for r in result["context"]:
        scan = r["inspect_flops_by_term"]["indexer_scan"]
        print(f"context {r['context']:6d}: prefill {r['prefill_seconds']:7.2f} s, decode "
              f"{r['decode_seconds_per_token'] * 1e3:7.2f} ms/token; inspect {r['inspect_flops_per_token'] / 1e9:.3f} "
              f"GFLOP/token (indexer scan {scan / 1e9:.3f})")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
