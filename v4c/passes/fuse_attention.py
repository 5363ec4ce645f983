"""Compressed-attention fusions: compressor, lightning indexer, sparse attention."""
from __future__ import annotations

from .base import RewritePass
from .pattern import Rule

COMPRESSOR = Rule("compressor", """
    %a = linear(%h, %wkv)
    %g = linear(%h, %wg)
    %r, %pk, %pg = compress(%a, %g, %ape, %nw, %rows, %pk0, %pg0, %pos)
""", outputs=["r", "pk", "pg"],
    build=lambda m, new: [("compressor", [m[v] for v in ("h", "wkv", "wg", "ape", "nw", "rows", "pk0", "pg0", "pos")],
                           [m["r"], m["pk"], m["pg"]], m.attr("r"))])

INDEXER = Rule("indexer", """
    %a = linear(%cq, %wq)
    %b = reshape(%a)
    %q = rope(%b, %pos)
    %w = linear(%h, %ww)
    %i = indexer_topk(%q, %w, %keys, %pos)
""", outputs=["i"],
    build=lambda m, new: [("indexer", [m[v] for v in ("cq", "h", "wq", "ww", "keys", "pos")], [m["i"]],
                           {"shape": m.attr("b")["shape"], **{k: m.attr("q")[k] for k in ("rope_dim", "theta", "yarn")},
                            **m.attr("i")})])


def _attention_rule(extra: list[str]) -> Rule:
    args = ", ".join(f"%{v}" for v in ["q", "kv", "ring", "rp", "sinks", "pos", *extra])
    return Rule(f"sparse-attention-{len(extra)}", f"""
        %o = attention({args})
        %r1, %rp1 = window_append(%ring, %rp, %kv, %pos)
        %o1 = rope(%o, %pos)
    """, outputs=["o1", "r1", "rp1"],
        when=lambda m: None if m.attr("o1").get("inverse") else "the output RoPE is not the de-rotation",
        build=lambda m, new: [("sparse_attention", [m[v] for v in ["q", "kv", "ring", "rp", "sinks", "pos", *extra]],
                               [m["o1"], m["r1"], m["rp1"]],
                               {**m.attr("o"), **{k: m.attr("o1")[k] for k in ("rope_dim", "theta", "yarn")}})])


class FuseAttention(RewritePass):
    """Each compressor, indexer and attention (with ring append and de-rotation) is one op."""

    name = "fuse-attention"
    rules = [COMPRESSOR, INDEXER, _attention_rule(["rows", "idx"]), _attention_rule(["rows"]), _attention_rule([])]
