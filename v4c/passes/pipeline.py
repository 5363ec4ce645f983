"""The default compile pipeline: the passes in the order they run."""
from __future__ import annotations

from .base import Pass
from .fuse_attention import FuseAttention
from .fuse_mhc import FuseMHC
from .fuse_moe import FuseMoE
from .fuse_projections import FuseProjections
from .quantize_kv import QuantizeKVCache

FUSION_PASSES = (FuseMoE, FuseAttention, FuseProjections, FuseMHC)  # attention before projections: it owns its RoPE


# user-facing names of the cache formats -> the storage formats of v4c.graph.storage
KV_CACHE = {"fp32": "f32", "bf16": "bf16", "fp8": "fp8_ds"}
INDEXER_CACHE = {"fp32": "f32", "bf16": "bf16", "fp8": "fp8", "fp4": "mxfp4"}


def production_formats(cfg) -> bool:
    """Real V4 layouts (512-d rows, 64 RoPE dims, 128-d indexer keys) get the production cache by default."""
    return cfg.head_dim == 512 and cfg.rope_head_dim == 64 and cfg.index_head_dim == 128


def resolve_cache_formats(cfg, dtype: str, kv_cache: str = "auto", indexer_cache: str = "auto") -> tuple[str, str]:
    """``auto``: fp8 + fp4 for real-size V4 layouts, the activation dtype otherwise."""
    plain = {"f32": "fp32", "bf16": "bf16", "f16": "bf16"}[dtype]
    kv = kv_cache if kv_cache != "auto" else ("fp8" if production_formats(cfg) else plain)
    ix = indexer_cache if indexer_cache != "auto" else ("fp4" if production_formats(cfg) else plain)
    if kv not in KV_CACHE:
        raise ValueError(f"--kv-cache must be auto, {', '.join(KV_CACHE)}; got {kv_cache!r}")
    if ix not in INDEXER_CACHE:
        raise ValueError(f"--indexer-cache must be auto, {', '.join(INDEXER_CACHE)}; got {indexer_cache!r}")
    return kv, ix


def default_pipeline(fuse: bool = True, kv_cache: str | None = None, indexer_cache: str | None = None) -> list[Pass]:
    """Fusions (unless ``fuse`` is off), then the cache formats when either differs from the graph's dtype."""
    passes: list[Pass] = [p() for p in FUSION_PASSES] if fuse else []
    if kv_cache or indexer_cache:
        passes.append(QuantizeKVCache(KV_CACHE[kv_cache or "fp32"], INDEXER_CACHE[indexer_cache or "fp32"]))
    return passes


def all_pass_names() -> list[str]:
    return [p.name for p in FUSION_PASSES] + [QuantizeKVCache.name]
