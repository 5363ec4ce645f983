"""The numbers behind ``v4c report``, as plain JSON-ready dicts.

Every series comes from the code ``v4c inspect`` uses (``cache_footprint``, ``decode_step_kernels``
and, for the split by term, ``decode_step_terms`` over the same kernels), so a plotted point is
the number ``v4c inspect --json --context N`` prints for that context.
"""
from __future__ import annotations


from ..artifact import open_artifact
from ..autotune.devices import device_for_target, normalize_dtype
from ..graph.analysis import cache_footprint, decode_step_kernels
from ..graph.terms import TERMS, flops_by_term
from ..inspect import inspect_artifact
from ..model.baselines import KEY_BYTES, ROW_BYTES, v32_bytes_per_token
from ..model.config import V4Config

CONTEXTS = tuple(2 ** k for k in range(12, 21))  # 4K ... 1M
TERM_LABELS = {"weights": "weights", "window": "window", "sparse_core": "sparse core (CSA)",
               "indexer_scan": "indexer scan (CSA)", "compressed_dense": "compressed dense (HCA)"}
# V3.2's cache in the storage of the model's own rows, so the comparison is layout against layout
_BASELINE_FORMAT = {"fp8": "fp8", "bf16": "bf16", "fp32": "fp32"}


def context_label(n: int) -> str:
    return f"{n >> 20}M" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10}K" if n % 1024 == 0 else str(n)


def roofline_seconds(flops: int, nbytes: int, peak_tflops: float, hbm_gbs: float) -> float:
    """The time a kernel needs at least: its FLOPs at peak or its bytes at full bandwidth, whichever is longer."""
    return max(flops / (peak_tflops * 1e12) if peak_tflops > 0 else 0.0, nbytes / (hbm_gbs * 1e9))


def kernel_table(inspected: dict, target: str) -> dict:
    """Per-kernel FLOPs, bytes and launches of one decode step (from ``inspect_artifact``) with
    the roofline time of each on ``target``'s device-table row."""
    dev = device_for_target(target)
    compute = normalize_dtype(inspected["dtype"])
    peak = dev.peak_tflops(compute)
    rows = []
    for k in inspected["kernels"]:
        t = roofline_seconds(k["flops"], k["bytes"], peak, dev.hbm_gbs)
        bound = "compute" if peak > 0 and k["flops"] / (peak * 1e12) >= k["bytes"] / (dev.hbm_gbs * 1e9) else "memory"
        rows.append({"name": k["name"], "op": k["op"], "flops": k["flops"], "bytes": k["bytes"],
                     "launches": k["launches"], "roofline_s": t, "bound": bound})
    return {"target": target, "device": dev.name, "compute_dtype": compute, "peak_tflops": peak,
            "hbm_gbs": dev.hbm_gbs, "context": inspected["context"], "batch": inspected["batch"], "rows": rows,
            "launches": sum(r["launches"] for r in rows), "roofline_s": sum(r["roofline_s"] for r in rows)}


def build_series(artifact, *, target: str | None = None, batch: int = 1, context: int | None = None,
                 contexts=CONTEXTS, source: str | None = None) -> dict:
    """Everything the report plots and tabulates for ``artifact``. The kernel table is for
    ``target`` (default: the artifact's) at ``context`` (default: the model's maximum) and ``batch``."""
    if batch < 1:
        raise ValueError(f"--batch must be >= 1, got {batch}")
    inspected = inspect_artifact(artifact, context=context, batch=batch)  # verifies the artifact once
    man = open_artifact(artifact, verify=False)  # verified just above; each file is checked as it is read
    cfg = V4Config.from_dict(man.config())
    graph = man.graph()
    # the curves stop at the model's own maximum context: nothing is plotted the model cannot hold
    contexts = [c for c in contexts if c <= cfg.max_position_embeddings] or [cfg.max_position_embeddings]
    layers = cfg.num_hidden_layers
    base_fmt = _BASELINE_FORMAT.get(inspected["kv_cache_format"], "fp8")
    base_per_token = v32_bytes_per_token(base_fmt, layers)
    caches = [cache_footprint(graph, c) for c in contexts]
    by_term = [flops_by_term(graph, c) for c in contexts]
    flops_total = [sum(k.flops for k in decode_step_kernels(graph, c, 1)) for c in contexts]
    return {
        "source": source or str(man.root),
        "model": {"layers": layers, "layer_kinds": inspected["layers"], "hidden_size": cfg.hidden_size,
                  "params": inspected["params"], "max_context": cfg.max_position_embeddings},
        "dtype": inspected["dtype"],
        "kv_cache_format": inspected["kv_cache_format"],
        "indexer_cache_format": inspected["indexer_cache_format"],
        "contexts": list(contexts),
        "kv_bytes": {
            "model": [c.total_bytes for c in caches],
            "model_fixed": [c.fixed_bytes for c in caches],
            "model_bytes_per_token": caches[-1].bytes_per_token,
            "baseline": [base_per_token * c for c in contexts],
            "baseline_bytes_per_token": base_per_token,
            "baseline_desc": f"V3.2-style MLA cache, {layers} layers x (latent 512 + RoPE 64 row, "
                             f"{ROW_BYTES[base_fmt]} B, + 128-d indexer key, {KEY_BYTES[base_fmt]} B) in {base_fmt}",
        },
        "decode_flops": {"batch": 1, "terms": {t: [b[t] for b in by_term] for t in TERMS}, "total": flops_total},
        "kernels": kernel_table(inspected, target or inspected["target"]),
    }
