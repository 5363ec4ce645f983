"""What ``v4c inspect`` reports about an artifact (text table or JSON)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .artifact.manifest import verify_artifact
from .graph.analysis import cache_footprint, decode_step_kernels
from .graph.text import parse_graph
from .inspect_ranks import format_ranks, rank_report
from .model.baselines import v32_bytes_per_token
from .model.config import V4Config
from .model.memory import GPU_SIZES_GB, gpu_split, weight_bytes

KIND_SHORT = {"sliding_attention": "sliding", "compressed_sparse_attention": "csa",
              "heavily_compressed_attention": "hca"}


def inspect_artifact(path: str | Path, context: int | None = None, batch: int = 1,
                     gpu_sizes=GPU_SIZES_GB) -> dict:
    """What is in the artifact and what one decode step costs at ``context`` tokens
    (default: the model's maximum context); ``weights.per_gpu``: how weights + the KV cache of
    ``batch`` sequences split across GPUs of each size in ``gpu_sizes`` (GB)."""
    man = verify_artifact(Path(path))
    cfg = V4Config.from_dict(json.loads((man.root / man.data["config"]).read_text()))
    graph = parse_graph((man.root / man.data["graph"]).read_text())
    total = sum(t.numel() for _, t in graph.params if t.dtype != "e8m0")  # quantisation scales are not params
    embed = sum(t.numel() for n, t in graph.params if n == "model.embed_tokens.weight")
    schedule = [KIND_SHORT[k] for k in cfg.layer_types]
    context = context or cfg.max_position_embeddings
    if context < 1:
        raise ValueError(f"--context must be >= 1, got {context}")
    kernels = decode_step_kernels(graph, context, batch)
    kops = man.data.get("kernels", {}).get("ops", {})
    cache = cache_footprint(graph, context)
    v32 = v32_bytes_per_token("fp8")
    return {
        "path": str(man.root),
        "format_version": man.data["format_version"],
        "target": man.data["target"],
        "dtype": man.data["dtype"],
        "toolchain": man.data["toolchain"],
        "weights_mode": man.weights_mode,
        "runnable": man.has_weights,
        "passes": man.data["passes"],
        "kv_cache_format": man.data.get("kv_cache"),
        "indexer_cache_format": man.data.get("indexer_cache"),
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
                     "ratio_to_v32": cache.bytes_per_token / v32},
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
        "parallel": {k: v for k, v in man.data["parallel"].items() if k != "ranks"} if "parallel" in man.data else None,
        "ranks": rank_report(man, context, batch),  # multi-GPU: per-rank weights, KV and collective bytes
    }


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
        f"weights    {r['weights']['total_bytes'] / 1e9:.1f} GB: " + ", ".join(
            f"{k} {v / 1e9:.1f}" for k, v in r["weights"]["by_dtype"].items() if v >= 1e8) + "; GPUs for weights + KV: "
        + ", ".join(f"{g['gpus_with_kv']}x{g['gpu_memory_gb']:g} GB" for g in r["weights"]["per_gpu"]),
        f"graph      {r['nodes']} nodes, {r['states']} state buffers, passes: {', '.join(r['passes']) or 'none'}",
        "ops        " + ", ".join(f"{k} x{v}" for k, v in r["ops"].items()),
        f"cache      kv {r['kv_cache_format']}, indexer {r['indexer_cache_format']}: "
        f"{kv['bytes_per_token']:.1f} B/token ({kv['ratio_to_v32']:.1%} of V3.2's {kv['v32_bytes_per_token']} B/token), "
        f"{kv['total_bytes'] / 2**30:.3f} GiB per sequence at {r['context']} tokens "
        f"({kv['fixed_bytes'] / 2**20:.2f} MiB fixed)",
        f"memory     per sequence, {kv['allocated_tokens']} tokens in 256-token blocks: " + ", ".join(
            f"{k.replace('_', ' ')} {v / 2**20:.2f} MiB" for k, v in kv["by_kind"].items()),
        f"decode     {r['launches_per_decode_step']} launches, {r['flops_per_token'] / 1e9:.3f} GFLOP/token, "
        f"{r['bytes_per_decode_step'] / 1e9:.3f} GB moved per step (batch {r['batch']}, context {r['context']})",
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
    if r.get("ranks"):
        lines += ["", *format_ranks(r)]
    return "\n".join(lines)
