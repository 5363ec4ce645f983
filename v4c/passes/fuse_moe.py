"""MoE fusions: router + selection + expert permutation as one op; experts (grouped GEMMs with the
clamped SwiGLU, weighted combine and scatter) with the shared expert as the other."""
from __future__ import annotations

from .base import RewritePass
from .pattern import Rule

_SHARED = """
    %r = moe_experts(%h, %i, %w, %w13, %w2)
    %sg0 = linear(%h, %sg)
    %su0 = linear(%h, %su)
    %a = swiglu(%sg0, %su0)
    %s = linear(%a, %sd)
    %y = add(%r, %s)
"""
_ALONE = """
    %y = moe_experts(%h, %i, %w, %w13, %w2)
"""


def _moe_rule(name: str, route: str, routing_inputs: list[str], shared: bool) -> Rule:
    def build(m, new):
        y = m["y"]
        perm, offsets = new(f"{y}.perm"), new(f"{y}.offsets")
        ra = m.attr("i")
        attrs = {"scaling": ra["scaling"], "hash": "ids" in routing_inputs}
        if "topk" in ra:
            attrs["topk"] = ra["topk"]
        experts = [m[v] for v in ("h", "i", "w")] + [perm, offsets, m["w13"], m["w2"]]
        experts += [m[v] for v in ("sg", "su", "sd")] if shared else []
        return [("moe_router", [m["h"], m["rw"], *[m[v] for v in routing_inputs]], [m["i"], m["w"], perm, offsets], attrs),
                ("moe_ffn", experts, [y], {"limit": m.attr("y" if not shared else "r")["limit"]})]

    return Rule(name, f"""
        %l = linear(%h, %rw)
        %i, %w = {route}({", ".join(f"%{v}" for v in ["l", *routing_inputs])})
    """ + (_SHARED if shared else _ALONE), outputs=["y"], build=build)


class FuseMoE(RewritePass):
    """Each MoE block is two ops: routing with its expert permutation, and the grouped-GEMM experts with the shared expert."""

    name = "fuse-moe"
    rules = [_moe_rule("moe-score", "moe_route", ["bias"], True), _moe_rule("moe-hash", "moe_hash_route", ["table", "ids"], True),
             _moe_rule("moe-score-alone", "moe_route", ["bias"], False),
             _moe_rule("moe-hash-alone", "moe_hash_route", ["table", "ids"], False)]
