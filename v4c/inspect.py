"""What ``v4c inspect`` reports about an artifact (text table or JSON)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .artifact import open_artifact
from .graph.analysis import cache_footprint, decode_step_kernels
from .inspect_impls import format_implementations, implementations
from .inspect_mtp import format_mtp, mtp_report
from .inspect_ranks import format_ranks, rank_report
from .model.baselines import v32_bytes_per_token
from .model.config import V4Config
from .model.memory import GPU_SIZES_GB, gpu_split, weight_bytes
from .runtime.snapshot import snapshot_footprint

# --gpu-memory bounds (GB): 0 or a negative size never fits anything (the GPU count search would not end, or
# end at ~10**330 cards); 1 MB to 100 TB spans every real card with room to spare
GPU_GB_RANGE = (0.001, 100_000)

KIND_SHORT = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
              "heavily_compressed_attention": "hca"}


def inspect_artifact(path: str | Path, context: int | None = None, batch: int = 1,
                     gpu_sizes=GPU_SIZES_GB, backend: str | None = None) -> dict:
    """What is in the artifact and what one decode step costs at ``context`` tokens
    (default: the model's maximum context); ``weights.per_gpu``: how weights + the KV cache of
    ``batch`` sequences split across GPUs of each size in ``gpu_sizes`` (GB); ``implementations``:
    what ``backend`` (default: as ``v4c.load`` picks on this machine) runs each node with."""
    lo, hi = GPU_GB_RANGE
    for gb in gpu_sizes:
        # `not lo <= gb` also refuses NaN; bool is not a size
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not lo <= gb <= hi:
            raise ValueError(f"--gpu-memory must be a card size in GB from {lo:g} to {hi:g}, got {gb!r}")
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    man = open_artifact(Path(path))
    cfg = V4Config.from_dict(man.config())
    graph = man.graph()
    total = sum(t.numel() for _, t in graph.params if t.dtype != "e8m0")  # quantisation scales are not params
    embed = sum(t.numel() for n, t in graph.params if n == "model.embed_tokens.weight")
    schedule = [KIND_SHORT[k] for k in cfg.layer_types]
    if context is None:
        context = cfg.max_position_embeddings
    elif context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    elif context > cfg.max_position_embeddings:
        raise ValueError(f"--context {context} is beyond the model's maximum context of "
                         f"{cfg.max_position_embeddings} tokens (max_position_embeddings)")
    kernels = decode_step_kernels(graph, context, batch)
    ktable = man.kernels()
    kops = ktable.get("ops", {})
    par = man.parallel()
    cache = cache_footprint(graph, context)
    v32 = v32_bytes_per_token("fp8")
    v32_same = v32_bytes_per_token("fp8", cfg.num_hidden_layers)
    return {
        "path": str(man.root),
        "format_version": man.format_version,
        "target": man.target,
        "dtype": man.dtype,
        "toolchain": man.toolchain,
        "weights_mode": man.weights_mode,
        "runnable": man.has_weights,
        "passes": man.passes,
        "kv_cache_format": man.kv_cache,
        "indexer_cache_format": man.indexer_cache,
        "context": context,
        "batch": batch,
        "kernels": [{"name": k.name, "op": k.op, "flops": k.flops, "bytes": k.bytes, "launches": k.launches,
                     "config_source": kops.get(k.op, {}).get("config_source", "reference"),
                     # calls on quantised weights: "default" etc. on the qgemm kernel, "reference", or None
                     "quantized": kops.get(k.op, {}).get("quantized", {}).get("config_source"),
                     "meta": kops.get(k.op, {}).get("meta")}
                    for k in kernels],
        "launches_per_decode_step": sum(k.launches for k in kernels),
        "flops_per_token": sum(k.flops for k in kernels) // batch,
        "bytes_per_decode_step": sum(k.bytes for k in kernels),
        "kv_cache": {"bytes_per_token": cache.bytes_per_token, "total_bytes": cache.total_bytes,
                     "fixed_bytes": cache.fixed_bytes, "v32_bytes_per_token": v32,
                     "by_kind": cache.by_kind, "allocated_tokens": cache.allocated_tokens,
                     # two baselines, named the same way here and in `v4c report`: V3.2 itself (61 layers),
                     # and a V3.2-style cache of this model's depth
                     "ratio_to_v32": cache.bytes_per_token / v32,
                     "v32_same_depth_bytes_per_token": v32_same,
                     "ratio_to_v32_same_depth": cache.bytes_per_token / v32_same},
        # what the prefix cache keeps per 256-token block (its rows, and one boundary's ring slots)
        "context_cache": snapshot_footprint(graph, context),
        "config": cfg.to_dict(),
        "schedule": schedule,
        "layers": dict(Counter(schedule)),
        "mlp_layers": dict(Counter(cfg.mlp_layer_types)),
        "params": total,
        "params_without_embedding": total - embed,
        "param_bytes": sum(t.nbytes() for _, t in graph.params),
        "weights": {**weight_bytes(graph), "context": context, "batch": batch,
                    "per_gpu": gpu_split(weight_bytes(graph)["total_bytes"], batch * cache.total_bytes, gpu_sizes)},
        "nodes": len(graph.nodes),
        "ops": dict(sorted(Counter(graph.ops()).items())),
        "states": len(graph.states),
        "parallel": {k: v for k, v in par.items() if k != "ranks"} if par is not None else None,
        "ranks": rank_report(man, context, batch),  # multi-GPU: per-rank weights, KV and collective bytes
        "sites": _sites(ktable),
        "implementations": implementations(graph, man.root, ktable, backend),
        "aot": _aot(man.aot()),
        "mtp": mtp_report(man, graph, context, batch),  # the MTP block (speculative decoding): its costs and states
    }


def _sites(kernels: dict) -> list[dict]:
    """Every kernel call site with its per-bucket configs and where each came from."""
    out = []
    for sid, s in sorted(kernels.get("sites", {}).items()):
        configs = [{"bucket": b, "config_source": c.get("config_source"), "meta": c.get("meta"),
                    **({"note": c["aot_note"]} if c.get("aot_note") else {}),
                    **({"reason": c["reason"]} if c.get("reason") else {})}
                   for b, c in sorted((s.get("configs") or {}).items())]
        out.append({"site": sid, "op": s["op"], "nodes": s.get("nodes"), "module": s.get("module"),
                    "launcher": s.get("launcher"), "kernel": s.get("kernel"), "configs": configs,
                    **({"reason": s["reason"]} if s.get("reason") else {})})
    return out


def _aot(entry: dict | None) -> list[dict] | None:
    """One row per compiled kernel launch (kernel, call site, bucket, target): what the compiler reported."""
    if not entry:
        return None
    keys = ("kernel", "op", "site", "bucket", "target", "ok", "registers", "spill_bytes", "shared_bytes",
            "num_warps", "num_stages")
    return [{k: x.get(k) for k in keys} for x in entry.get("launches", [])]


def _bytes(n: float) -> str:
    """Decimal units, so that small models do not read as 0.0 GB."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def format_report(r: dict) -> str:
    c, kv = r["config"], r["kv_cache"]
    lines = [
        f"artifact   {r['path']}",
        f"format     v{r['format_version']}   target {r['target']}   dtype {r['dtype']}   "
        f"weights {r['weights_mode']}{'' if r['runnable'] else ' (inspect only)'}",
        f"toolchain  " + "  ".join(f"{k} {v}" for k, v in r["toolchain"].items()),
        f"model      hidden {c['hidden_size']}  layers {c['num_hidden_layers']}  heads {c['num_attention_heads']}x"
        f"{c['head_dim']}  experts {c['n_routed_experts']} top-{c['num_experts_per_tok']}  vocab {c['vocab_size']}",
        f"schedule   " + " ".join(r["schedule"]),
        f"layers     " + "  ".join(f"{k} {v}" for k, v in r["layers"].items())
        + "   mlp " + "  ".join(f"{k} {v}" for k, v in r["mlp_layers"].items()),
        f"params     {r['params'] / 1e9:.3f}B ({r['params_without_embedding'] / 1e9:.3f}B without the embedding), "
        f"{r['param_bytes'] / 2**30:.2f} GiB as compiled",
        f"weights    {_bytes(r['weights']['total_bytes'])}: " + ", ".join(
            f"{k} {_bytes(v)}" for k, v in r["weights"]["by_dtype"].items() if v >= r['weights']['total_bytes'] / 1000)
        + "; GPUs for weights + KV: "
        + ", ".join(f"{g['gpus_with_kv']}x{g['gpu_memory_gb']:g} GB" for g in r["weights"]["per_gpu"]),
        f"graph      {r['nodes']} nodes, {r['states']} state buffers, passes: {', '.join(r['passes']) or 'none'}",
        "ops        " + ", ".join(f"{k} x{v}" for k, v in r["ops"].items()),
        f"cache      kv {r['kv_cache_format']}, indexer {r['indexer_cache_format']}: "
        f"{kv['bytes_per_token']:.1f} B/token ({kv['ratio_to_v32']:.1%} of V3.2's 61 layers, "
        f"{kv['v32_bytes_per_token']:,} B/token; {kv['ratio_to_v32_same_depth']:.1%} of a V3.2-style cache of the same "
        f"{c['num_hidden_layers']} layers), "
        f"{kv['total_bytes'] / 2**30:.3f} GiB per sequence at {r['context']} tokens "
        f"({kv['fixed_bytes'] / 2**20:.2f} MiB fixed)",
        f"memory     per sequence, {kv['allocated_tokens']} tokens in 256-token blocks: " + ", ".join(
            f"{k.replace('_', ' ')} {v / 2**20:.2f} MiB" for k, v in kv["by_kind"].items()),
        f"decode     {r['launches_per_decode_step']} launches, {r['flops_per_token'] / 1e9:.3f} GFLOP/token, "
        f"{r['bytes_per_decode_step'] / 1e9:.3f} GB moved per step (batch {r['batch']}, context {r['context']})",
        *format_mtp(r),
        "",
        f"{'op':<18}{'count':>6}{'launches':>10}{'GFLOP':>12}{'GB':>12}",
    ]
    agg: dict[str, list] = {}
    for k in r["kernels"]:
        a = agg.setdefault(k["op"], [0, 0, 0, 0])
        a[0] += 1
        a[1] += k["launches"]
        a[2] += k["flops"]
        a[3] += k["bytes"]
    for op, (n, la, fl, by) in sorted(agg.items(), key=lambda x: -x[1][2]):
        lines.append(f"{op:<18}{n:>6}{la:>10}{fl / 1e9:>12.4f}{by / 1e9:>12.4f}")
    if r.get("sites"):
        lines += ["", *_format_sites(r["sites"])]
    if r.get("implementations"):
        lines += ["", *format_implementations(r["implementations"])]
    if r.get("aot"):
        lines += ["", *_format_aot(r["aot"])]
    if r.get("ranks"):
        lines += ["", *format_ranks(r)]
    return "\n".join(lines)


def _format_sites(sites: list[dict]) -> list[str]:
    lines = [f"{'call site':<30}{'nodes':>6}  {'kernel':<22}configs by bucket"]
    for s in sites:
        if s["module"] is None:
            lines.append(f"{s['site']:<30}{s['nodes']:>6}  {'reference':<22}{s.get('reason', '')}")
            continue
        by = Counter(c["config_source"] for c in s["configs"])
        lines.append(f"{s['site']:<30}{s['nodes']:>6}  {s['kernel']:<22}"
                     + ", ".join(f"{n} {src}" for src, n in sorted(by.items())))
    return lines


def _format_aot(rows: list[dict]) -> list[str]:
    """Per kernel: the most registers, spill bytes and shared memory over its launches."""
    agg: dict = {}
    for x in rows:
        a = agg.setdefault((x["op"], x["kernel"]), {"n": 0, "ok": 0, "regs": 0, "spill": 0, "smem": 0})
        a["n"] += 1
        a["ok"] += bool(x["ok"])
        a["regs"] = max(a["regs"], x["registers"] or 0)
        a["spill"] = max(a["spill"], x["spill_bytes"] or 0)
        a["smem"] = max(a["smem"], x["shared_bytes"] or 0)
    target = rows[0]["target"] if rows else "?"
    lines = [f"aot ({target}): {len(rows)} launches, {sum(a['ok'] for a in agg.values())} compiled, "
             f"{sum(1 for x in rows if x['spill_bytes'])} spilling",
             f"{'op':<18}{'kernel':<26}{'launches':>9}{'max regs':>9}{'max spill B':>12}{'max smem B':>11}"]
    for (op, kernel), a in sorted(agg.items()):
        lines.append(f"{op:<18}{kernel:<26}{a['n']:>9}{a['regs']:>9}{a['spill']:>12}{a['smem']:>11}")
    return lines
