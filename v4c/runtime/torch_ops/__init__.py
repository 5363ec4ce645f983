"""Fast PyTorch implementations of the ops that dominate a CPU run (the ``torch`` backend).

Each has its op's signature and result; the references in ``v4c/graph/ops`` stay the
definition (backend ``reference`` runs them unchanged) and the tests hold each one here to its
reference on random inputs.
"""
from __future__ import annotations

from . import attention, compressor, linear_norm, mhc, moe, projections, rope, router

IMPLS = {
    "attention": attention.attend,
    "sparse_attention": attention.sparse_attention,
    "indexer_topk": attention.indexer_topk,
    "indexer": attention.indexer,
    "hc_pre": mhc.hc_pre,
    "hc_post_pre": mhc.hc_post_pre,
    "hc_head": mhc.hc_head,
    "compressor": compressor.compressor,
    "moe_ffn": moe.moe_ffn,
    "moe_router": router.moe_router,
    "linear_rms_norm": linear_norm.linear_rms_norm,
    "q_proj": projections.q_proj,
    "kv_proj": projections.kv_proj,
    "rope": rope.rope,
}
