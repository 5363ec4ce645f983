"""The kernels of one forward call of a (rank) graph with their FLOPs and bytes: the ops' own cost
functions, as `v4c inspect` uses them (at T = 1 and batch B this is `decode_step_kernels` exactly), for
any number of tokens per sequence (an MTP verify step, a prefill chunk) and with the expert-parallel
dims bound. The one change: a grouped expert GEMM reads the experts the step's tokens are expected to
touch (their union under uniform routing) rather than the cost function's upper bound min(E, assignments)."""
from __future__ import annotations

from dataclasses import dataclass

from ..graph.ir import Graph
from ..graph.ops.collective import ASSIGNED
from ..graph.registry import Concrete, get_op
from .efficiency import COLLECTIVES, FAMILY_OF_OP

KV_FAMILIES = ("attention", "indexer")  # kernels whose bytes are mostly cache reads
_QUANT = ("f8e4m3", "mxfp4")


@dataclass(frozen=True)
class Kernel:
    name: str
    op: str
    family: str        # efficiency family, or "collective"
    flops: float
    bytes: float       # HBM bytes; for a collective: bytes this rank sends
    launches: int
    dtype: str         # tensor-core format of its math: "fp4" | "fp8" | "bf16"
    layer: int | None  # decoder layer it belongs to (None: embedding, head)
    rows_per_expert: float | None = None  # grouped expert GEMMs: the step's assignments per expert


def layer_of(name: str) -> int | None:
    """``l12.attn.q`` -> 12; the graph names every layer's values ``l{i}.``."""
    head = name.split(".", 1)[0]
    return int(head[1:]) if head[:1] == "l" and head[1:].isdigit() else None


def expected_experts(experts: int, topk: int, tokens: float) -> float:
    """Experts out of ``experts`` that ``tokens`` tokens, each routed to ``topk`` distinct ones uniformly
    at random, touch on average: each expert is missed by a token with probability 1 - topk/experts."""
    return experts * (1.0 - (1.0 - topk / experts) ** tokens)


def _math_dtype(node, types, fp4_weights: str) -> str:
    """The FP4 experts' GEMM format on this GPU where the weights are MXFP4, FP8 where they are FP8 and
    for an indexer scoring quantised keys (u8 storage: FP8 or MXFP4), BF16 otherwise (attention decodes
    its FP8 rows to BF16 for the MMAs, as FlashMLA does)."""
    dts = {types[v].dtype for v in node.inputs}
    if "mxfp4" in dts:
        return fp4_weights
    if "f8e4m3" in dts or (node.op in ("indexer", "indexer_topk") and "u8" in dts):
        return "fp8"
    return "bf16"


def step_kernels(g: Graph, *, batch: int, tokens: int, context: int, topk: int, experts: int,
                 global_tokens: float, fp4_weights: str = "fp8", logits_rows: int | None = None,
                 select=None) -> list[Kernel]:
    """One call of ``g`` on ``batch`` sequences of ``tokens`` new tokens each, at ``context`` tokens of
    context (the cost functions' context; a prefill chunk passes its mid-point so that terms linear in the
    context average over the chunk's causal rows). ``global_tokens``: tokens routed in the same step over
    all ranks (data-parallel ranks route their own). ``logits_rows``: rows per sequence the LM head
    computes (serving stacks compute logits only for the last token of a prefill chunk). ``select``: a
    predicate on the kernel's name, to cost only some kernels."""
    bind = {"B": batch, "T": tokens, "L": max(context, 1), ASSIGNED: batch * tokens * topk}  # balanced routing
    types = g.value_types()
    concrete: dict = {}  # layers repeat: equal types, and equal calls, are worked out once per step
    costs: dict = {}

    def conc(v):
        t = types[v]
        if t not in concrete:
            concrete[t] = Concrete(t.concrete(bind), t.dtype)
        return concrete[t]

    out = []
    for n in g.nodes:
        op = get_op(n.op)
        if op.launches == 0 or (select is not None and not select(n.outputs[0])):
            continue
        ins, outs = [conc(v) for v in n.inputs], [conc(v) for v in n.outputs]
        key = (n.op, tuple(ins), tuple(outs), n.attrs)
        if key not in costs:
            costs[key] = op.cost(ins, outs, n.attr, context)
        c = costs[key]
        flops, nbytes = float(c.flops), float(c.bytes)
        rows = None
        if n.op in ("moe_ffn", "moe_experts"):
            flops, nbytes = _expert_union(n.op, ins, flops, nbytes, topk, experts, global_tokens)
            rows = global_tokens * topk / experts
        if n.outputs[0] == "logits" and logits_rows is not None and tokens > logits_rows:
            flops, nbytes = _fewer_rows(ins, flops, nbytes, tokens, logits_rows)
        family = "collective" if n.op in COLLECTIVES else FAMILY_OF_OP.get(n.op, "elementwise")
        out.append(Kernel(n.outputs[0], n.op, family, flops, nbytes, op.launches, _math_dtype(n, types, fp4_weights),
                          layer_of(n.outputs[0]), rows))
    return out


def _expert_union(op, ins, flops, nbytes, topk, experts, global_tokens):
    """Replace the cost function's expert reads (min(E_local, assignments) experts) by the expected union,
    and its FLOPs by the assignments that land on this rank's experts."""
    idx = ins[1]
    w13, w2 = (ins[5], ins[6]) if op == "moe_ffn" else (ins[3], ins[4])  # the operands' order in the op registry
    local = w13.shape[0]
    per_expert = (w13.numel + w2.numel) // local  # weight values of one expert
    counted = min(local, idx.numel)
    touched = local * expected_experts(experts, topk, global_tokens) / experts
    assigned = global_tokens * topk * local / experts
    nbytes += (touched - counted) * per_expert * w13.itemsize
    flops += 2 * (assigned - idx.numel) * per_expert
    return flops, nbytes


def _fewer_rows(ins, flops, nbytes, tokens, rows):
    """The LM head on ``rows`` of the ``tokens`` rows: the weight is read once either way."""
    w = ins[1]
    keep = rows / tokens
    act = nbytes - w.nbytes
    return flops * keep, w.nbytes + act * keep
