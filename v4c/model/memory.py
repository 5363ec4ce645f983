"""How much memory the weights take as compiled, and how they split across GPUs of a given size."""
from __future__ import annotations

from collections import Counter

from ..graph.ir import Graph

GPU_SIZES_GB = (80, 141, 192)  # H100/H800, H200, B200 (decimal GB, as the cards are sold)
USABLE = 0.90  # of a card's memory, for weights + KV: the rest goes to activations, workspace and the CUDA context


def weight_bytes(graph: Graph) -> dict:
    """``total_bytes`` and ``by_dtype`` of the graph's params as stored (quantised data and scales counted apart)."""
    by = Counter()
    for _, t in graph.params:
        by[t.dtype] += t.nbytes()
    return {"total_bytes": sum(by.values()), "by_dtype": dict(sorted(by.items()))}


def gpu_split(weights: int, kv: int, sizes_gb=GPU_SIZES_GB) -> list[dict]:
    """Per card size: the fewest GPUs (a power of two, as tensor/expert parallelism splits) whose usable memory
    holds the weights, and holds weights + ``kv``; with the weight bytes each GPU then carries."""
    out = []
    for gb in sizes_gb:
        usable = gb * 1e9 * USABLE

        def fewest(total):
            n = 1
            while total / n > usable:
                n *= 2
            return n

        n_w, n_all = fewest(weights), fewest(weights + kv)
        out.append({"gpu_memory_gb": gb, "gpus_for_weights": n_w, "gpus_with_kv": n_all,
                    "weight_bytes_per_gpu": -(-weights // n_all), "kv_bytes_per_gpu": -(-kv // n_all)})
    return out
