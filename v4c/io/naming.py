"""Checkpoint tensor names -> graph param names, for the three namings found in the wild.

* Hugging Face's in-memory names (``model.layers.N.self_attn.q_a_proj.weight``,
  stacked ``mlp.experts.gate_up_proj``): the graph's own names.
* The official release's names (``layers.N.attn.wq_a.weight``, ``embed.weight``,
  per-expert ``ffn.experts.E.w1.weight``), which transformers also writes back
  out (with a ``model.`` prefix) from ``save_pretrained``.

Renaming is a fixed list of (pattern, replacement) rules applied in order to a name
without its ``model.`` prefix; rules never fire on names already in graph form.
Per-expert matrices are stacked into the graph's ``[E, ...]`` tensors at load time.

The MTP block (``mtp.0.*``, spec A.10) belongs to a graph of its own (``v4c/model/mtp.py``):
``graph_name`` ignores it and ``mtp_graph_name`` maps it, its block's tensors by the same rules as a
layer's (``mtp.0.attn.wq_a.weight`` -> ``mtp.0.self_attn.q_a_proj.weight``), in the release's naming or
already in the graph's (with or without a ``model.`` prefix).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, ExpectedTensor, check_tensors

IGNORED_PREFIXES = ("mtp.", "model.mtp.")  # the MTP block: not part of the main graph
MTP_PREFIXES = ("mtp.0.", "model.mtp.0.")  # the one MTP block the MTP graph reads (later ones: not V4's)

_RULES = [(re.compile(p), r) for p, r in (
    # an official block scale ``X.scale`` is transformers' ``X.weight_scale_inv`` (the mHC ``hc_*_scale``
    # params have no dot before ``scale``, and the HF ``attn_hc.scale`` does not follow a linear's name)
    (r"^(.*\.(?:wq_a|wq_b|wkv|wgate|wo_a|wo_b|w1|w2|w3|weights_proj|gate|head|embed|e_proj|h_proj))\.scale$",
     r"\1.weight_scale_inv"),
    (r"^(head|embed)\.scale$", r"\1.weight_scale_inv"),
    (r"\.attn\.", ".self_attn."),                                       # official module names
    (r"\.ffn\.", ".mlp."),
    (r"\.indexer\.compressor\.", ".compressor.indexer."),
    (r"^embed\.weight(_scale_inv)?$", r"embed_tokens.weight\1"),
    (r"^head\.weight(_scale_inv)?$", r"lm_head.weight\1"),
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
_EXPERT = re.compile(r"^((?:model\.layers\.\d+|mtp\.\d+)\.mlp\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|down_proj|up_proj)"
                     r"\.(weight|weight_scale_inv)$")
_EXPERT_ROLE = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}  # per-expert HF names
_STACKED = {"experts.gate_up_proj": ("gate_up", ""), "experts.down_proj": ("down", ""),
            "experts.gate_up_proj_scale_inv": ("gate_up", "_scale_inv"),
            "experts.down_proj_scale_inv": ("down", "_scale_inv")}


def graph_name(name: str) -> str | None:
    """The graph param a checkpoint tensor name denotes (None for ignored tensors)."""
    if name.startswith(IGNORED_PREFIXES):
        return None
    bare = name[len("model."):] if name.startswith("model.") else name
    for pat, rep in _RULES:
        bare = pat.sub(rep, bare)
    return bare if bare.startswith("lm_head.") else f"model.{bare}"


# the MTP block's own leaves that a layer's rules would mistake (its final norm is no attention norm)
_MTP_LEAVES = {"norm.weight": "norm.weight", "hc_head_fn": "hc_head.hc_fn", "hc_head_base": "hc_head.hc_base",
               "hc_head_scale": "hc_head.hc_scale"}


def mtp_graph_name(name: str) -> str | None:
    """The MTP graph param a checkpoint tensor name denotes (None for tensors not of the block ``mtp.0``)."""
    if not name.startswith(MTP_PREFIXES):
        return None
    leaf = name.split("mtp.0.", 1)[1]
    if leaf in _MTP_LEAVES or leaf in _MTP_LEAVES.values():
        return f"mtp.0.{_MTP_LEAVES.get(leaf, leaf)}"
    # the block's tensors are a layer's: rename as layer 0's, then put the block's prefix back
    return "mtp.0." + graph_name(f"layers.0.{leaf}")[len("model.layers.0."):]


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


def _expected_kind(dtype: str) -> str:
    """What checkpoint dtypes a graph param of ``dtype`` accepts: quantised data and scales exactly their own."""
    return {"f8e4m3": "F8_E4M3", "mxfp4": "I8", "e8m0": "F8_E8M0", "i64": "int", "i32": "int"}.get(dtype, "float")


def _namer(part: str):
    if part not in ("main", "mtp"):
        raise ValueError(f"part must be 'main' or 'mtp', got {part!r}")
    return graph_name if part == "main" else mtp_graph_name


def has_mtp(ckpt: Checkpoint) -> bool:
    """Whether the checkpoint holds tensors of the MTP block (complete or not)."""
    return any(n.startswith(MTP_PREFIXES) for n in ckpt.names())


def _by_graph_name(ckpt: Checkpoint, part: str = "main"):
    """(graph name -> checkpoint name, stacked expert prefix -> {(expert, w1|w2|w3, suffix): checkpoint name}),
    for the main graph's params or the MTP graph's own (``part``)."""
    namer = _namer(part)
    direct: dict[str, str] = {}
    experts: dict[str, dict] = defaultdict(dict)
    for n in ckpt.names():
        g = namer(n)
        if g is None:
            continue
        m = _EXPERT.match(g)
        if m:
            role = _EXPERT_ROLE.get(m.group(3), m.group(3))
            experts[m.group(1)][(int(m.group(2)), role, m.group(4))] = n
        else:
            direct.setdefault(g, n)
    return direct, experts


def checkpoint_dtypes(ckpt: Checkpoint, part: str = "main") -> dict[str, str]:
    """Graph param name -> safetensors dtype of the checkpoint tensor(s) it is read from (the main graph's
    params, or the MTP graph's own: ``part``); stacked expert params take the dtype of their per-expert tensors."""
    direct, experts = _by_graph_name(ckpt, part)
    out = {g: ckpt.info(n).dtype for g, n in direct.items()}
    for prefix, have in experts.items():
        for (_, role, suffix), n in sorted(have.items()):
            stacked = f"{prefix}.{'down_proj' if role == 'w2' else 'gate_up_proj'}"
            out.setdefault(stacked + ("_scale_inv" if suffix == "weight_scale_inv" else ""), ckpt.info(n).dtype)
    return out


def _missing_scale_name(name: str, direct: dict[str, str], namer=graph_name) -> str | None:
    """A missing scale is reported in its weight's naming: ``X.scale`` beside an official ``X.weight``,
    else ``X.weight_scale_inv``."""
    weight = name[:-len("_scale_inv")] if name.endswith("_scale_inv") else None
    wk = direct.get(weight) if weight else None
    if wk is None or not wk.endswith(".weight"):
        return None
    return wk[:-len(".weight")] + ".scale" if namer(wk) != wk else wk + "_scale_inv"


class _View:
    """The tensors of a checkpoint that one graph reads: the MTP graph checks the block's tensors and the
    main graph's it shares (embedding, LM head) without calling every other tensor unexpected."""

    def __init__(self, ckpt: Checkpoint, keep):
        self.path, self._ckpt = ckpt.path, ckpt
        self._names = [n for n in ckpt.names() if keep(n)]

    def names(self) -> list[str]:
        return list(self._names)

    def __contains__(self, name) -> bool:
        return name in self._ckpt

    def info(self, name):
        return self._ckpt.info(name)


def plan_sources(ckpt: Checkpoint, params: dict, part: str = "main") -> dict[str, Source]:
    """Match every graph param (name -> TensorType) with checkpoint tensors, checking names, shapes
    and dtypes; raises WeightMismatchError listing every problem in the checkpoint's own names.

    A quantised weight's data must have its exact dtype and stored shape, and so must its scale
    (``X.scale`` / ``X.weight_scale_inv``, a param of its own), so a missing or mis-shaped scale is
    reported by name like any other tensor. ``part="mtp"``: the params of the MTP graph, whose own
    are the block's tensors (``mtp.0.*``) and whose others are the main graph's (embedding, LM head);
    the checkpoint's other tensors are not its business."""
    from ..graph.weight_formats import FORMATS

    namer = _namer(part)
    main_direct = _by_graph_name(ckpt)[0] if part == "mtp" else {}
    direct, experts = _by_graph_name(ckpt, part)
    direct = {**main_direct, **direct}
    expected: dict[str, ExpectedTensor] = {}
    sources: dict[str, Source] = {}
    for name, t in params.items():
        kind = _expected_kind(t.dtype)
        shape = FORMATS[t.dtype].storage_shape(t.shape) if t.dtype in FORMATS else tuple(t.shape)
        prefix = name.rsplit(".", 1)[0]  # model.layers.N.mlp.experts for the stacked expert params
        leaf = "experts." + name.rsplit(".", 1)[-1]
        if name in direct or leaf not in _STACKED or not experts[prefix]:
            ck = direct.get(name) or _missing_scale_name(name, direct, namer) or name
            expected[ck] = ExpectedTensor(tuple(shape), kind)
            sources[name] = Source("tensor", (ck,))
            continue
        have = experts[prefix]
        how, suffix = _STACKED[leaf]
        sample = next(iter(have.values()))
        base = sample[: sample.rindex(".experts.") + len(".experts.")]
        official = ".w1." in sample or ".w2." in sample or ".w3." in sample
        role_name = {"w1": "w1", "w2": "w2", "w3": "w3"} if official else \
            {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
        ck_suffix = "weight" + suffix
        if suffix and official and sample.endswith(".scale"):
            ck_suffix = "scale"  # the official spelling of a block scale
        key = "weight_scale_inv" if suffix else "weight"

        def ck_name(i, role):
            return have.get((i, role, key), f"{base}{i}.{role_name[role]}.{ck_suffix}")

        e, rows, cols = shape
        if how == "gate_up":  # [E, 2I, D] from w1 [I, D] and w3 [I, D]
            pairs = []
            for i in range(e):
                w1, w3 = ck_name(i, "w1"), ck_name(i, "w3")
                expected[w1] = expected[w3] = ExpectedTensor((rows // 2, cols), kind)
                pairs.append((w1, w3))
            sources[name] = Source("gate_up", tuple(pairs))
        else:  # [E, D, I] from w2 [D, I]
            names = tuple(ck_name(i, "w2") for i in range(e))
            for n in names:
                expected[n] = ExpectedTensor((rows, cols), kind)
            sources[name] = Source("down", names)
    if part == "main":
        check_tensors(ckpt, expected, ignore_prefixes=IGNORED_PREFIXES)
    else:  # only the block's own tensors can be unexpected
        check_tensors(_View(ckpt, lambda n: n.startswith(MTP_PREFIXES) or n in expected), expected, ignore_prefixes=())
    return sources
