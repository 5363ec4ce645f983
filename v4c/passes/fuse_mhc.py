"""mHC fusions: the pre-mix (with the sublayer norm), post-mix + next pre-mix, and the head."""
from __future__ import annotations

from .base import RewritePass
from .pattern import Rule


def _pre_attrs(m, x="m", w="post", c="comb", h="h"):
    return {"n": m.attr(w)["n"], "eps": m.attr(x)["eps"], "hc_eps": m.attr(w)["eps"], "iters": m.attr(c)["iters"]}


def _same_eps(m):
    if m.attr("m")["eps"] != m.attr("h")["eps"] or m.attr("post")["eps"] != m.attr("comb")["eps"]:
        return "the RMS and norm epsilons differ"
    return None


HC_PRE = Rule("hc-pre", """
    %m = hc_logits(%x, %fn)
    %pre, %post, %c0 = hc_weights(%m, %base, %scale)
    %comb = sinkhorn(%c0)
    %u = hc_collapse(%x, %pre)
    %h = rms_norm(%u, %nw)
""", outputs=["h", "post", "comb"], when=_same_eps,
    build=lambda m, new: [("hc_pre", [m["x"], m["fn"], m["base"], m["scale"], m["nw"]],
                           [m["h"], m["post"], m["comb"]], _pre_attrs(m))])  # collapse + norm -> 1 kernel

HC_POST_PRE = Rule("hc-post-pre", """
    %x1 = hc_expand_mix(%x, %y, %post, %comb)
    %h, %post2, %comb2 = hc_pre(%x1, %fn, %base, %scale, %nw)
""", outputs=["x1", "h", "post2", "comb2"],
    build=lambda m, new: [("hc_post_pre", [m[v] for v in ("x", "y", "post", "comb", "fn", "base", "scale", "nw")],
                           [m["x1"], m["h"], m["post2"], m["comb2"]], m.attr("h"))])  # x' = post*y + comb^T x

HC_HEAD = Rule("hc-head", """
    %x1 = hc_expand_mix(%x, %y, %post, %comb)
    %m = hc_logits(%x1, %fn)
    %pre = hc_head_weights(%m, %base, %scale)
    %u = hc_collapse(%x1, %pre)
    %h = rms_norm(%u, %nw)
""", outputs=["h"],
    build=lambda m, new: [("hc_head", [m[v] for v in ("x", "y", "post", "comb", "fn", "base", "scale", "nw")],
                           [m["h"]], {"eps": m.attr("h")["eps"], "hc_eps": m.attr("pre")["eps"]})])


class FuseMHC(RewritePass):
    """Every mHC pre-mix is one op with its sublayer RMSNorm; each post-mix is fused with the next pre-mix or the head."""

    name = "fuse-mhc"
    rules = [HC_PRE, HC_POST_PRE, HC_HEAD]
