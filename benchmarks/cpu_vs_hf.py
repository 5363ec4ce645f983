"""v4c's cpu backend against Hugging Face's DeepseekV4ForCausalLM on the same CPU and checkpoint.

A random checkpoint of the chosen configuration (``--config``: a preset of bench_configs.py or a
JSON file of config fields; by default the 478M-parameter model: hidden 1024, 8 layers in
V4-Flash's pattern, 64 experts top-6, 16 heads of 128, window 128) is written at run time, once per
dtype; v4c compiles it and both engines load it. Every measurement runs in a fresh child process
(so peak resident memory is that engine's own), and the two engines alternate: v4c, HF, v4c, HF for
each measurement. Both dtypes, fp32 and bf16, are measured by default, one after the other.

    python benchmarks/cpu_vs_hf.py [--config 478m|h512-e32|h64x16-w64|FILE.json] [--dtype f32|bf16]
                                   [--json out.json] [--quick]

Measured, per dtype: prefill tokens/s (T = 512, 4096; the last token's logits, ``--prefill-logits``), decode tokens/s (batch 1 and 8, 128 steps
after a 2,048-token prompt), peak RSS of each, their ratios; the weight-streaming floor of a batch-1
decode step (the weight bytes one token reads, over the best copy bandwidth measured in the same run:
at its start, before every decode child and in each decode child after its steps; and the kept step
against its own process's sample alone);
then v4c alone at contexts 4K/16K/64K (prefill time, decode time per token) next to `v4c inspect`'s
FLOPs per decoded token and its indexer-scan term; and the machine's copy bandwidth and matmul rate.
The JSON holds one section per dtype under ``runs``, each shaped as a single-dtype result.
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

from bench_configs import artifact, describe, load_config

# ---- the child process: one engine, one measurement ------------------------------------------

def _worker(a) -> dict:
    import torch
    torch.manual_seed(0)
    vocab = json.loads((Path(a.ckpt) / "config.json").read_text())["vocab_size"]
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    if a.engine == "v4c":
        import v4c
        model = v4c.load(a.art)

        def session(batch, ctx, logits="all"):
            s = model.new_session(batch, max_context=ctx)
            return lambda ids: s.forward(ids, logits=logits)
    else:
        from transformers import DeepseekV4ForCausalLM, DynamicCache
        hf = DeepseekV4ForCausalLM.from_pretrained(a.ckpt, dtype=dtype, attn_implementation="eager").eval()

        def session(batch, ctx, logits="all"):
            cache = DynamicCache(config=hf.config)
            keep = 1 if logits == "last" else 0  # (1: the last token's logits, as its generate() asks)
            return lambda ids: hf(ids, past_key_values=cache, use_cache=True, logits_to_keep=keep).logits

    def ids(b, t):
        return torch.randint(0, vocab, (b, t))

    out = {"engine": a.engine, "task": a.task, "T": a.T, "batch": a.batch}
    with torch.inference_mode():
        session(1, 64)(ids(1, 16))  # warm-up: first touch of every weight page, lazy inits
        context_f32 = a.engine == "hf" and a.task == "decode" and a.hf_context_f32 and dtype != torch.float32
        if context_f32:
            out["context_prefill"] = "f32, cache cast to the run's dtypes"
            ref_len = 2 * max(hf.config.compress_rates.values()) + 8
            ref = DynamicCache(config=hf.config)  # what a prefill in the run's dtype leaves in the cache
            hf(ids(1, ref_len), past_key_values=ref, use_cache=True)
        if a.task == "prefill":
            times = []
            out["logits"] = a.prefill_logits
            for _ in range(a.repeat):
                fwd = session(1, a.T + 1, a.prefill_logits)
                x = ids(1, a.T)
                t0 = time.perf_counter()
                fwd(x)
                times.append(time.perf_counter() - t0)
            out["seconds"] = min(times)
            out["tokens_per_s"] = a.T / out["seconds"]
        else:
            fwd = session(a.batch, a.T + a.steps + 1)
            t0 = time.perf_counter()
            if context_f32:
                cache = DynamicCache(config=hf.config)
                with _params_in_f32(hf):
                    hf(ids(a.batch, a.T), past_key_values=cache, use_cache=True)
                _cast_cache_like(cache, ref)

                def fwd(x):
                    return hf(x, past_key_values=cache, use_cache=True).logits
            else:
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
            # the memory's rate right after the steps, in this process (its buffers after the peak is read)
            out["peak_rss_mib"] = _peak_rss_mib()
            out["copy_gb_per_s_after"] = copy_gb_per_s()
    out.setdefault("peak_rss_mib", _peak_rss_mib())
    return out


class _params_in_f32:
    """Within this block every parameter of ``model`` is fp32 while its own module runs (forward hooks on
    each module that holds parameters directly), so only one module's widened copy exists at a time."""

    def __init__(self, model):
        import torch
        self.mods = [m for m in model.modules() if any(p.is_floating_point() for p in m.parameters(recurse=False))]
        self.torch = torch

    def _widen(self, m, *_):
        m._v4c_saved = {n: p.data for n, p in m.named_parameters(recurse=False)}
        for p in m.parameters(recurse=False):
            p.data = p.data.float()

    def _restore(self, m, *_):
        for n, p in m.named_parameters(recurse=False):
            p.data = m._v4c_saved[n]
        del m._v4c_saved

    def __enter__(self):
        self.handles = [h for m in self.mods for h in (m.register_forward_pre_hook(self._widen),
                                                        m.register_forward_hook(self._restore))]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _cast_cache_like(cache, ref) -> None:
    """Cast each floating tensor of ``cache``'s layers (attributes and dict entries) to the dtype of the same
    slot in ``ref``, a cache the model filled in the run's own dtype."""
    import torch

    def cast(t, r):
        return t.to(r.dtype) if torch.is_tensor(t) and t.is_floating_point() and torch.is_tensor(r) else t

    for layer, ref_layer in zip(cache.layers, ref.layers):
        for name, val in list(vars(layer).items()):
            rv = getattr(ref_layer, name, None)
            if isinstance(val, dict):
                for k in val:
                    val[k] = cast(val[k], rv.get(k) if isinstance(rv, dict) else None)
            else:
                setattr(layer, name, cast(val, rv))
        if getattr(layer, "values", None) is not None and getattr(ref_layer, "values", 1) is getattr(ref_layer, "keys", 2):
            layer.values = layer.keys  # V4's shared K=V layers keep one tensor for both


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

def copy_gb_per_s() -> float:
    """Bytes read and written per second by the best of five copies of 128 MiB (beyond the caches)."""
    import torch
    a = torch.randn(32 * 2 ** 20)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best / 1e9


def machine() -> dict:
    import torch
    out = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "copy_gb_per_s": copy_gb_per_s()}
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

def active_weight_bytes(graph, topk: int, batch: int = 1) -> int:
    """Weight bytes a decode step of ``batch`` tokens reads at least: every weight once, but of the
    embedding only the tokens' rows and of each stacked routed-expert tensor [E, ...] only the
    ``topk`` experts per token (at most E)."""
    total = 0
    for name, t in graph.params:
        n = t.nbytes()
        if name == "model.embed_tokens.weight":
            n = n // t.shape[0] * batch
        elif ".mlp.experts." in name and t.rank == 3:
            n = n // t.shape[0] * min(t.shape[0], topk * batch)
        total += n
    return total


def measure_dtype(dtype: str, cfg: dict, work: Path, quick: bool, context: bool, mach: dict,
                  rounds: int = 2, hf_context_f32: bool = False, on_row=lambda result: None,
                  prefill_logits: str = "last") -> dict:
    """One dtype's rows; ``on_row(result so far)`` after each, so that a stopped run keeps what it measured."""
    from v4c.graph.terms import flops_by_term
    from v4c.graph.text import parse_graph
    from v4c.inspect import inspect_artifact

    print(f"the {dtype} checkpoint and artifact: {work / dtype}", file=sys.stderr)
    art = artifact(cfg, work, dtype)
    ckpt = work / dtype / "ckpt"
    info = inspect_artifact(art, context=2048)
    graph = parse_graph((art / "graph.v4c").read_text())
    common = (["--ckpt", str(ckpt), "--art", str(art), "--dtype", dtype, "--prefill-logits", prefill_logits]
              + ["--hf-context-f32"] * hf_context_f32)
    prefill_lengths = [64, 256] if quick else [512, 4096]
    decode_prompt, steps = (256, 16) if quick else (2048, 128)

    result = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/cpu_vs_hf.py", *sys.argv[1:]]),
              "machine": mach, "dtype": dtype, "quick": quick, "rounds": rounds,
              "model": {"params": info["params"], "config": {k: info["config"][k] for k in (
                  "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "n_routed_experts",
                  "num_experts_per_tok", "sliding_window", "index_n_heads", "index_head_dim", "index_topk",
                  "moe_intermediate_size", "vocab_size")},
                  "schedule": info["schedule"]},
              "hf_context_f32": hf_context_f32, "prefill_logits": prefill_logits, "prefill": [], "decode": [], "context": []}

    # The floor's bandwidth: the best copy rate of the run. The machine's rate moves by up to 2x within a
    # run (a neighbour's load), and one sample at the start once put a decode step at 0.8x its "floor".
    copies = [mach["copy_gb_per_s"]]

    def pair(**kw):
        rows = {}
        for engine in ("v4c", "hf") * rounds:  # alternating: drift of the machine hits both
            if kw["task"] == "decode":
                copies.append(copy_gb_per_s())  # in this process, between the children: not in their RSS
            r = run_child(common, engine=engine, **kw)
            if kw["task"] == "decode":
                copies.append(r["copy_gb_per_s_after"])
            print(f"  {dtype} {engine:4s} {kw} -> {r['tokens_per_s']:.1f} tok/s, {r['peak_rss_mib']:.0f} MiB",
                  file=sys.stderr)
            if engine not in rows or r["tokens_per_s"] > rows[engine]["tokens_per_s"]:
                rows[engine] = r
        v, h = rows["v4c"], rows["hf"]
        return {**kw, "v4c": v, "hf": h, "speedup": v["tokens_per_s"] / h["tokens_per_s"],
                "rss_ratio": v["peak_rss_mib"] / h["peak_rss_mib"]}

    for t in prefill_lengths:
        result["prefill"].append(pair(task="prefill", T=t, repeat=1 if t > 1024 else 2))
        on_row(result)
    for b in (1, 8):
        result["decode"].append(pair(task="decode", T=decode_prompt, batch=b, steps=steps))
        on_row(result)
    floor_bytes = active_weight_bytes(graph, cfg["num_experts_per_tok"])
    floor_s = floor_bytes / (max(copies) * 1e9)
    result["weight_floor"] = {"active_weight_bytes_per_token": floor_bytes, "copy_gb_per_s": max(copies),
                              "copy_gb_per_s_samples": copies, "seconds_per_token": floor_s,
                              "v4c_decode_b1_over_floor": result["decode"][0]["v4c"]["seconds_per_step"] / floor_s}
    # the same step against the copy rate its own process measured right after it: drift between children aside
    own = result["decode"][0]["v4c"]
    result["weight_floor"]["v4c_decode_b1_over_own_copy_floor"] = \
        own["seconds_per_step"] * own["copy_gb_per_s_after"] * 1e9 / floor_bytes

    if context:
        for ctx in ([512, 1024] if quick else [4096, 16384, 65536]):
            r = run_child(common, engine="v4c", task="decode", T=ctx, batch=1, steps=4 if quick else 16)
            ins = inspect_artifact(art, context=ctx)
            row = {"context": ctx, "prefill_seconds": r["prefill_seconds"], "decode_seconds_per_token":
                   r["seconds_per_step"], "peak_rss_mib": r["peak_rss_mib"],
                   "inspect_flops_per_token": ins["flops_per_token"],
                   "inspect_bytes_per_step": ins["bytes_per_decode_step"]}
            row["inspect_flops_by_term"] = flops_by_term(graph, ctx)
            result["context"].append(row)
            on_row(result)
            print(f"  {dtype} context {ctx}: prefill {r['prefill_seconds']:.1f}s, decode "
                  f"{r['seconds_per_step'] * 1e3:.1f} ms/token", file=sys.stderr)
    return result


def summary(res: dict) -> None:
    m = res["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, copy {m['copy_gb_per_s']:.1f} GB/s, matmul f32 "
          f"{m['matmul_gflop_per_s_f32']:.0f} / bf16 {m['matmul_gflop_per_s_bf16']:.0f} GFLOP/s")
    for dtype, result in res["runs"].items():
        print(f"{res['config']} {dtype}: {result['model']['params'] / 1e6:.0f}M params")
        for r in result["prefill"]:
            print(f"  prefill T={r['T']:5d}: v4c {r['v4c']['tokens_per_s']:8.1f} tok/s  HF "
                  f"{r['hf']['tokens_per_s']:8.1f} tok/s  ratio {r['speedup']:5.2f}x   peak RSS "
                  f"{r['v4c']['peak_rss_mib']:.0f} / {r['hf']['peak_rss_mib']:.0f} MiB")
        for r in result["decode"]:
            print(f"  decode B={r['batch']}:     v4c {r['v4c']['tokens_per_s']:8.1f} tok/s  HF "
                  f"{r['hf']['tokens_per_s']:8.1f} tok/s  ratio {r['speedup']:5.2f}x   peak RSS "
                  f"{r['v4c']['peak_rss_mib']:.0f} / {r['hf']['peak_rss_mib']:.0f} MiB   page faults/step "
                  f"{r['v4c']['page_faults_per_step']:.1f} / {r['hf']['page_faults_per_step']:.1f}")
        f = result["weight_floor"]
        print(f"  weight-streaming floor, batch 1: {f['active_weight_bytes_per_token'] / 2 ** 20:.1f} MiB/token at "
              f"{f['copy_gb_per_s']:.1f} GB/s (the best of {len(f['copy_gb_per_s_samples'])} copy samples, lowest "
              f"{min(f['copy_gb_per_s_samples']):.1f}) = {f['seconds_per_token'] * 1e3:.2f} ms/token; v4c decode is "
              f"{f['v4c_decode_b1_over_floor']:.2f}x the floor ({f['v4c_decode_b1_over_own_copy_floor']:.2f}x at the copy "
              f"rate its process measured after its steps)")
        for r in result["context"]:
            scan = r["inspect_flops_by_term"]["indexer_scan"]
            print(f"  context {r['context']:6d}: prefill {r['prefill_seconds']:7.2f} s, decode "
                  f"{r['decode_seconds_per_token'] * 1e3:7.2f} ms/token; inspect "
                  f"{r['inspect_flops_per_token'] / 1e9:.3f} GFLOP/token (indexer scan {scan / 1e9:.3f})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=None,
                    help=f"a preset or a JSON file of config fields (default 478m; quick with --quick). {describe()}")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default=None,
                    help="measure one dtype only (default: f32, then bf16; bf16 is the released models' dtype)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="short runs (and, without --config, a small model)")
    ap.add_argument("--no-context", action="store_true", help="skip the 4K/16K/64K context sweep")
    ap.add_argument("--rounds", type=int, default=2,
                    help="runs of each engine per measurement, alternating, the best kept (default 2)")
    ap.add_argument("--prefill-logits", choices=["last", "all"], default="last",
                    help="the prefill rows' logits: the last token's (default: what a prefill needs to go on, and "
                         "what transformers' generate() and llama-bench compute) or every token's")
    ap.add_argument("--hf-context-f32", action="store_true",
                    help="transformers' decode rows in bf16: prefill the prompt with fp32 parameters and cast the "
                         "cache to bf16's dtypes before the timed bf16 steps (on CPUs without bf16 arithmetic its bf16 "
                         "prefill of 8 x 2,048 tokens takes tens of minutes; the steps timed are unchanged)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoints and artifacts here")
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

    if a.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {a.rounds}")
    name, cfg = load_config(a.config or ("quick" if a.quick else "478m"))
    work = a.workdir or Path(tempfile.mkdtemp(prefix="v4c-bench-"))
    mach = machine()
    print(json.dumps(mach), file=sys.stderr)
    dtypes = [a.dtype] if a.dtype else ["f32", "bf16"]
    res = {"date": str(date.today()), "command": " ".join(["python", "benchmarks/cpu_vs_hf.py", *sys.argv[1:]]),
           "machine": mach, "config": name, "config_fields": cfg, "quick": a.quick, "dtypes": dtypes, "runs": {}}

    def save(complete: bool) -> None:
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({**res, "complete": complete}, indent=1) + "\n")

    for dtype in dtypes:
        def on_row(result, dtype=dtype):
            res["runs"][dtype] = result
            save(complete=False)  # a stopped run keeps its finished rows ("complete": false)
        res["runs"][dtype] = measure_dtype(dtype, cfg, work / name, a.quick, not a.no_context, mach, a.rounds,
                                           a.hf_context_f32, on_row, a.prefill_logits)
    save(complete=True)
    print()
    summary(res)
    if a.json:
        print(f"wrote {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
