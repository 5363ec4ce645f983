"""`v4c plan`'s text form (``--json`` prints the plan's dict as it is)."""
from __future__ import annotations


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "-" if x is None else format(x, fmt)


def format_plan(r: dict) -> str:
    m, w, spec, b = r["memory_per_gpu"], r["workload"], r["speculative"], r["bounds"]
    lay = r["layout"]
    pool = f"{r['gpus']} x {r['gpu']['name']}, "
    if lay["replicas"] > 1:
        pool += f"{lay['replicas']} instances of {lay['world_size']} GPU{'s' if lay['world_size'] > 1 else ''}"
        pool += f" ({lay['parallel']})" if lay["parallel"] else ""
    else:
        pool += lay["parallel"] or "one GPU"
    if r["disaggregated"]:
        pool += f"; prefill on {r['prefill']['gpus']} more GPUs ({r['prefill']['layout']})"
    mtp = (f"MTP {spec['draft_tokens']} draft tokens, {spec['accept_length']:.2f} accepted per step"
           if spec["method"] else "no speculative decoding")
    lines = [
        f"model      {r['model']}: {r['config']['layers']} layers, {r['config']['experts']} experts "
        f"top-{r['config']['experts_per_token']}",
        f"profile    {r['profile']}: {pool}; {mtp}",
        f"formats    KV rows {r['kv_cache_format']}, indexer keys {r['indexer_cache_format']} ({r['formats_from']})",
        f"workload   {w['input_len']} tokens in, {w['output_len']} out, prefill chunks of {w['chunk_tokens']}; "
        f"concurrency {r['concurrency']} (at most {r['max_concurrency']} fit"
        + (f"; the engine admits {w['max_running']} at once)" if w.get("max_running") else ")"),
        f"memory     per GPU: weights {_gb(m['weight_bytes'])}, KV {_gb(m['kv_bytes'])} "
        f"({m['sequences_on_gpu']} sequences), MTP {_gb(m['mtp_bytes'])}, activations {_gb(m['activation_bytes'])}: "
        f"{_gb(m['total_bytes'])} of {_gb(m['usable_bytes'])} usable",
        "",
        f"{'metric':<34}{'value':>12}  bounded by",
        f"{'TTFT (ms)':<34}{r['ttft_ms']:>12.1f}  {b['ttft_ms']}",
        f"{'time per output token (ms)':<34}{r['tpot_ms']:>12.2f}  {b['tpot_ms']}",
        f"{'tokens/s per user':<34}{r['tokens_per_s_per_user']:>12.1f}  {b['tokens_per_s_per_user']}",
        f"{'tokens/s per GPU (input + output)':<34}{r['tokens_per_s_per_gpu']:>12,.0f}  {b['tokens_per_s_per_gpu']}",
        f"{'$ per million output tokens':<34}{_num(r['cost_per_million_output_tokens'], '.3f'):>12}  "
        + (b["cost_per_million_output_tokens"] if r["cost_per_million_output_tokens"] is not None
           else "(give --price-per-gpu-hour)"),
        "",
        "time per output token by term (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in r["tpot_terms_ms"].items()),
        f"efficiency: {r['efficiency']['source']}; launches {'in CUDA graphs' if r['cuda_graphs'] else 'eager'} "
        f"({r['efficiency']['launch_s'] * 1e6:.0f} us each)",
    ]
    if r.get("sweep"):
        lines += ["", f"{'profile':<16}{'conc':>6}{'layout':>16}{'MTP':>5}{'tok/s/user':>12}{'tok/s/GPU':>12}"
                      f"{'TTFT ms':>10}{'TPOT ms':>9}  pareto"]
        for p in r["sweep"]:
            lay = (f"{p['replicas']} x " if p.get("replicas", 1) > 1 else "") + (p["parallel"] or "1 GPU")
            lines.append(f"{p['profile']:<16}{p['concurrency']:>6}{lay:>16}{p['draft_tokens']:>5}"
                         f"{p['tokens_per_s_per_user']:>12.1f}{p['tokens_per_s_per_gpu']:>12,.0f}{p['ttft_ms']:>10.0f}"
                         f"{p['tpot_ms']:>9.2f}  {'*' if p['pareto'] else ''}")
    return "\n".join(lines)
