"""The default compile pipeline: the passes in the order they run."""
from __future__ import annotations

from .base import Pass
from .fuse_attention import FuseAttention
from .fuse_mhc import FuseMHC
from .fuse_moe import FuseMoE
from .fuse_projections import FuseProjections

FUSION_PASSES = (FuseMoE, FuseAttention, FuseProjections, FuseMHC)  # attention before projections: it owns its RoPE


def default_pipeline(fuse: bool = True) -> list[Pass]:
    return [p() for p in FUSION_PASSES] if fuse else []


def all_pass_names() -> list[str]:
    return [p.name for p in FUSION_PASSES]
