"""An independent reference for the MTP block (spec A.10), built from transformers' own DeepSeek-V4 modules.

transformers does not instantiate the MTP block, but the block is one V4 decoder layer between an input
combination and a head of its own, so the reference is assembled here from the spec and HF's modules:

    x      = e_proj(enorm(Emb[next_ids])) broadcast over the streams + h_proj(hnorm(streams))
    x      = DeepseekV4DecoderLayer(x)          (a sliding-window layer, routed MoE, no hash table)
    logits = lm_head(norm(DeepseekV4HyperHead(x)))

run over a whole sequence at once (no cache) with HF's sliding-window causal mask. ``mtp_tensors``
gives its weights under the graph's names (``mtp.0.<leaf>``; ``official_names.py`` has the release's).
Imported by tests and by ``benchmarks/mtp_fit.py`` (which trains it); it is not a test file.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_sliding_window_causal_mask
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (DeepseekV4DecoderLayer, DeepseekV4HyperHead,
                                                                  DeepseekV4RMSNorm, DeepseekV4RotaryEmbedding)

from hf_reference import _normal, make_config

_SWA = "sliding_attention"


def block_config(config: dict):
    """The HF config of the MTP block's one layer: the model's dims, a sliding-window layer, routed MoE."""
    d = copy.deepcopy(config)
    d.update(num_hidden_layers=1, layer_types=[_SWA], mlp_layer_types=["moe"])
    d.pop("compress_ratios", None)
    return make_config(d)


class MTPReference(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        cfg = self.config = block_config(config)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.enorm, self.hnorm, self.norm = (DeepseekV4RMSNorm(D, eps=eps) for _ in range(3))
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.layer = DeepseekV4DecoderLayer(cfg, 0)
        self.hc_head = DeepseekV4HyperHead(cfg)
        self.rotary = DeepseekV4RotaryEmbedding(cfg)

    def forward(self, streams: torch.Tensor, next_ids: torch.Tensor, embed: torch.Tensor, lm_head: torch.Tensor):
        """Logits [B, T, V] and the block's streams [B, T, n, D] for entries 0..T-1 (entry p: the main
        model's streams at p and the token at p + 1)."""
        e = self.e_proj(self.enorm(F.embedding(next_ids, embed)))
        x = self.h_proj(self.hnorm(streams)) + e.unsqueeze(2)
        pos = torch.arange(next_ids.shape[1])[None].expand(next_ids.shape[0], -1)
        mask = create_sliding_window_causal_mask(config=self.config, inputs_embeds=e, attention_mask=None,
                                                 cache=None, position_ids=pos)
        pe = {k: self.rotary(e, position_ids=pos, layer_type=k) for k in ("main", "compress")}
        x = self.layer(x, position_embeddings=pe, position_ids=pos, attention_mask=mask, input_ids=next_ids,
                       cache=None)
        return F.linear(self.norm(self.hc_head(x)), lm_head), x


def make_mtp_reference(config: dict, seed: int = 0) -> MTPReference:
    """fp32 eval-mode reference with deterministic random weights (no parameter left at HF's neutral init)."""
    ref = MTPReference(config).float().eval()
    gen = torch.Generator().manual_seed(seed)
    E = ref.config.n_routed_experts
    with torch.no_grad():
        for name, t in ref.state_dict(keep_vars=True).items():
            leaf = name.rsplit(".", 1)[-1]
            if name.startswith("rotary."):
                continue
            shape = tuple(t.shape)
            if leaf in ("base", "hc_base"):
                new = _normal(gen, shape, 0.5)
            elif leaf in ("scale", "hc_scale"):
                new = 0.5 + torch.rand(shape, generator=gen)
            elif leaf == "sinks":
                new = _normal(gen, shape, 1.0)
            elif leaf == "e_score_correction_bias":
                new = _normal(gen, shape, 0.1)
            elif name.endswith("norm.weight"):
                new = _normal(gen, shape, 0.1, mean=1.0)
            else:  # projections, experts, mHC fn: unit-variance outputs
                new = _normal(gen, shape, shape[-1] ** -0.5)
            t.copy_(new)
        assert ref.layer.mlp.gate.weight.shape[0] == E
    return ref


_TOP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "norm.weight": "norm.weight",
        "e_proj.weight": "e_proj.weight", "h_proj.weight": "h_proj.weight", "hc_head.hc_fn": "hc_head.hc_fn",
        "hc_head.hc_base": "hc_head.hc_base", "hc_head.hc_scale": "hc_head.hc_scale"}


def mtp_tensors(ref: MTPReference) -> dict[str, torch.Tensor]:
    """The reference's weights under the MTP graph's names (``mtp.0.<leaf>``)."""
    out = {}
    for name, t in ref.state_dict().items():
        if name.startswith("rotary."):
            continue
        leaf = _TOP.get(name) or name[len("layer."):]
        out[f"mtp.0.{leaf}"] = t.detach().clone()
    return out

