"""Checkpoint tensor names -> graph param names, for the three namings found in the wild.

* Hugging Face's in-memory names (``model.layers.N.self_attn.q_a_proj.weight``,
  stacked ``mlp.experts.gate_up_proj``): the graph's own names.
* The official release's names (``layers.N.attn.wq_a.weight``, ``embed.weight``,
  per-expert ``ffn.experts.E.w1.weight``), which transformers also writes back
  out (with a ``model.`` prefix) from ``save_pretrained``.

Renaming is a fixed list of (pattern, replacement) rules applied in order to a name
without its ``model.`` prefix; rules never fire on names already in graph form.
Per-expert matrices are stacked into the graph's ``[E, ...]`` tensors at load time.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, ExpectedTensor, check_tensors

IGNORED_PREFIXES = ("mtp.", "model.mtp.")  # the MTP block: not part of the serving graph

_RULES = [(re.compile(p), r) for p, r in (
    (r"\.attn\.", ".self_attn."),                                       # official module names
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight$", "embed_tokens.weight"),
    (r"^head\.weight$", "lm_head.weight"),
    (r"^hc_head_(fn|base|scale)$", r"hc_head.hc_\1"),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.ffn_norm\.", ".post_attention_layernorm."),
    (r"\.hc_(attn|ffn)_(fn|base|scale)$", r".\1_hc.\2"),
    (r"\.attn_sink$", ".sinks"),
    (r"\.indexer\.weights_proj\.", ".compressor.indexer.scorer.weights_proj."),
    (r"\.indexer\.wq_b\.", ".compressor.indexer.q_b_proj."),
    (r"\.norm\.", ".kv_norm."),                                          # attention/compressor norms
    (r"\.ape$", ".position_bias"),
    (r"\.wq_a\.", ".q_a_proj."),
    (r"\.self_attn\.wq_b\.", ".self_attn.q_b_proj."),
    (r"\.wkv\.", ".kv_proj."),
    (r"\.wgate\.", ".gate_proj."),
    (r"\.wo_a\.", ".o_a_proj."),
    (r"\.wo_b\.", ".o_b_proj."),
    (r"\.q_norm\.", ".q_a_norm."),
    (r"\.gate\.bias$", ".gate.e_score_correction_bias"),
    (r"\.shared_experts\.w1\.", ".shared_experts.gate_proj."),
    (r"\.shared_experts\.w2\.", ".shared_experts.down_proj."),
    (r"\.shared_experts\.w3\.", ".shared_experts.up_proj."),
)]
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(w1|w2|w3)\.weight$")


def graph_name(name: str) -> str | None:
    """The graph param a checkpoint tensor name denotes (None for ignored tensors)."""
    if name.startswith(IGNORED_PREFIXES):
        return None
    bare = name[len("model."):] if name.startswith("model.") else name
    for pat, rep in _RULES:
        bare = pat.sub(rep, bare)
    return bare if bare == "lm_head.weight" else f"model.{bare}"


@dataclass(frozen=True)
class Source:
    """How one graph param is read: one tensor, or per-expert tensors stacked."""

    kind: str  # "tensor" | "gate_up" (w1 then w3 per expert) | "down" (w2 per expert)
    names: tuple  # checkpoint names; for gate_up: ((w1, w3), ...) per expert

    def load(self, ckpt: Checkpoint) -> torch.Tensor:
        if self.kind == "tensor":
            return ckpt.tensor(self.names[0])
        if self.kind == "gate_up":  # HF layout: gate rows first, then up rows
            return torch.stack([torch.cat([ckpt.tensor(a), ckpt.tensor(b)]) for a, b in self.names])
        return torch.stack([ckpt.tensor(n) for n in self.names])


def plan_sources(ckpt: Checkpoint, params: dict) -> dict[str, Source]:
    """Match every graph param (name -> TensorType) with checkpoint tensors, checking names, shapes
    and dtypes; raises WeightMismatchError listing every problem in the checkpoint's own names."""
    direct: dict[str, str] = {}
    experts: dict[str, dict] = defaultdict(dict)
    for n in ckpt.names():
        g = graph_name(n)
        if g is None:
            continue
        m = _EXPERT.match(g)
        if m:
            experts[m.group(1)][(int(m.group(2)), m.group(3))] = n
        else:
            direct.setdefault(g, n)
    expected: dict[str, ExpectedTensor] = {}
    sources: dict[str, Source] = {}
    for name, t in params.items():
        kind = "int" if t.dtype in ("i64", "i32") else "float"
        prefix = name.rsplit(".", 1)[0]
        if name in direct or not (name.endswith(("experts.gate_up_proj", "experts.down_proj")) and experts[prefix]):
            ck = direct.get(name, name)
            expected[ck] = ExpectedTensor(tuple(t.shape), kind)
            sources[name] = Source("tensor", (ck,))
            continue
        have = experts[prefix]
        sample = next(iter(have.values()))
        base = sample[: sample.rindex(".experts.") + len(".experts.")]
        e, rows, cols = t.shape
        if name.endswith("gate_up_proj"):  # [E, 2I, D] from w1 [I, D] and w3 [I, D]
            pairs = []
            for i in range(e):
                w1 = have.get((i, "w1"), f"{base}{i}.w1.weight")
                w3 = have.get((i, "w3"), f"{base}{i}.w3.weight")
                expected[w1] = expected[w3] = ExpectedTensor((rows // 2, cols), kind)
                pairs.append((w1, w3))
            sources[name] = Source("gate_up", tuple(pairs))
        else:  # [E, D, I] from w2 [D, I]
            names = tuple(have.get((i, "w2"), f"{base}{i}.w2.weight") for i in range(e))
            for n in names:
                expected[n] = ExpectedTensor((rows, cols), kind)
            sources[name] = Source("down", names)
    check_tensors(ckpt, expected, ignore_prefixes=IGNORED_PREFIXES)
    return sources
