"""Which launcher runs a call on quantised weights (IR dtypes ``f8e4m3`` / ``mxfp4``).

The IR keeps one op name whether its weights are quantised or not, so an op kind may have both kinds
of call (the FP8 projections and the bf16 LM head are both ``linear``). A call site whose node reads
quantised params goes to the ``qgemm`` template's launcher for the op (``qgemm.QUANTIZED``) when it
passes exactly the quantised arguments that launcher takes (``ARGS``); otherwise to the op's PyTorch
reference, with the reason, so the manifest and ``v4c inspect`` show it. Whether the launcher's
tiles fit the site's shapes is the config choice's business (``autotune/choose.py``).
"""
from __future__ import annotations

from ..graph.ir import Graph, Node
from ..graph.types import QUANT_DTYPES

FAMILY = "qgemm"

# op -> {input position: format} of the quantised arguments its qgemm launcher takes, in the op's own
# argument order; every listed position that a node has must be quantised so, no other may be.
# moe_ffn's shared expert (positions 7-9) may be absent.
ARGS = {
    "linear": {1: "f8e4m3"},
    "linear_rms_norm": {1: "f8e4m3"},
    "q_proj": {1: "f8e4m3"},
    "kv_proj": {1: "f8e4m3"},
    "o_proj": {1: "f8e4m3", 2: "f8e4m3"},
    "moe_ffn": {5: "mxfp4", 6: "mxfp4", 7: "f8e4m3", 8: "f8e4m3", 9: "f8e4m3"},
    "indexer": {2: "f8e4m3"},
}

# op -> the qgemm META key of its quantised launcher (qgemm.QUANTIZED[op][1])
KERNEL = {"linear": "fp8_linear", "linear_rms_norm": "fp8_linear_rms_norm", "q_proj": "fp8_q_proj",
          "kv_proj": "fp8_kv_proj", "o_proj": "fp8_o_proj", "moe_ffn": "moe_ffn_fp4", "indexer": "fp8_indexer"}


def quantised_inputs(graph: Graph, node: Node) -> dict[int, str]:
    """{input position: format} of the quantised params ``node`` reads."""
    ptypes = dict(graph.params)
    return {i: ptypes[v].dtype for i, v in enumerate(node.inputs)
            if v in ptypes and ptypes[v].dtype in QUANT_DTYPES}


def mismatch(node: Node, found: dict[int, str]) -> str | None:
    """Why ``node``'s quantised arguments ``found`` are not what the op's qgemm launcher takes, or None."""
    op = node.op
    want = ARGS.get(op)
    if want is None:
        return f"no quantised kernel for {op}"
    for i in sorted(set(want) | set(found)):
        if i >= len(node.inputs):
            continue
        if found.get(i) != want.get(i):
            return (f"{op} %{node.outputs[0]}: input {i} (%{node.inputs[i]}) is "
                    f"{found.get(i, 'unquantised')}, the quantised kernel takes {want.get(i, 'it unquantised')}")
    return None
