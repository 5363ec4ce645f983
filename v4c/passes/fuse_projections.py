"""Projection fusions: GEMMs with their RMSNorm / RoPE epilogues, and the grouped output projection."""
from __future__ import annotations

from .base import RewritePass
from .pattern import Rule


def _rope(a: dict) -> dict:
    return {k: a[k] for k in ("rope_dim", "theta", "yarn")}


def _forward_rope(m):
    return "the RoPE is an inverse rotation" if m.attr("d" if "d" in m.values else "c").get("inverse") else None


Q_PROJ = Rule("q-proj", """
    %a = linear(%x, %w)
    %b = reshape(%a)
    %c = rms_norm(%b)
    %d = rope(%c, %pos)
""", outputs=["d"], when=_forward_rope,
    build=lambda m, new: [("q_proj", [m["x"], m["w"], m["pos"]], [m["d"]],
                           {"shape": m.attr("b")["shape"], "eps": m.attr("c")["eps"], **_rope(m.attr("d"))})])

KV_PROJ = Rule("kv-proj", """
    %a = linear(%x, %w)
    %b = rms_norm(%a, %nw)
    %c = rope(%b, %pos)
""", outputs=["c"], when=_forward_rope,
    build=lambda m, new: [("kv_proj", [m["x"], m["w"], m["nw"], m["pos"]], [m["c"]],
                           {"eps": m.attr("b")["eps"], **_rope(m.attr("c"))})])

LINEAR_RMS = Rule("linear-rms-norm", """
    %a = linear(%x, %w)
    %b = rms_norm(%a, %nw)
""", outputs=["b"],
    build=lambda m, new: [("linear_rms_norm", [m["x"], m["w"], m["nw"]], [m["b"]], {"eps": m.attr("b")["eps"]})])

O_PROJ = Rule("o-proj", """
    %a = reshape(%o)
    %b = grouped_linear(%a, %wa)
    %c = reshape(%b)
    %d = linear(%c, %wb)
""", outputs=["d"],
    build=lambda m, new: [("o_proj", [m["o"], m["wa"], m["wb"]], [m["d"]],
                           {"shape": m.attr("a")["shape"], "groups": m.attr("b")["groups"],
                            "out_shape": m.attr("c")["shape"]})])


class FuseProjections(RewritePass):
    """Query/KV GEMMs carry their norm and RoPE, the q_a GEMM its RMSNorm, and the output projection is one op."""

    name = "fuse-projections"
    rules = [Q_PROJ, KV_PROJ, LINEAR_RMS, O_PROJ]  # the longer chains first
