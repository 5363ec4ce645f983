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
from ..graph.registry import get_op
from ..graph.types import QUANT_DTYPES

FAMILY = "qgemm"

# op -> {operand: format} of the quantised arguments its qgemm launcher takes; every listed operand
# that a node has must be quantised so, no other may be. moe_ffn's shared expert (sg, su, sd) may be absent.
ARGS = {
    "linear": {"w": "f8e4m3"},
    "linear_rms_norm": {"w": "f8e4m3"},
    "q_proj": {"w": "f8e4m3"},
    "kv_proj": {"w": "f8e4m3"},
    "o_proj": {"wa": "f8e4m3", "wb": "f8e4m3"},
    "moe_ffn": {"w13": "mxfp4", "w2": "mxfp4", "sg": "f8e4m3", "su": "f8e4m3", "sd": "f8e4m3"},
    "indexer": {"wq": "f8e4m3"},
}

# op -> the qgemm META key of its quantised launcher (qgemm.QUANTIZED[op][1])
KERNEL = {"linear": "fp8_linear", "linear_rms_norm": "fp8_linear_rms_norm", "q_proj": "fp8_q_proj",
          "kv_proj": "fp8_kv_proj", "o_proj": "fp8_o_proj", "moe_ffn": "moe_ffn_fp4", "indexer": "fp8_indexer"}


def quantised_inputs(graph: Graph, node: Node) -> dict[str, str]:
    """{operand: format} of the quantised params ``node`` reads."""
    ptypes = dict(graph.params)
    return {o.name: ptypes[v].dtype for o, v in zip(get_op(node.op).operands, node.inputs)
            if v in ptypes and ptypes[v].dtype in QUANT_DTYPES}


def mismatch(node: Node, found: dict[str, str]) -> str | None:
    """Why ``node``'s quantised arguments ``found`` are not what the op's qgemm launcher takes, or None."""
    op = node.op
    want = ARGS.get(op)
    if want is None:
        return f"no quantised kernel for {op}"
    for i, (o, v) in enumerate(zip(get_op(op).operands, node.inputs)):
        if found.get(o.name) != want.get(o.name):
            return (f"{op} %{node.outputs[0]}: operand {o.name}, input {i} (%{v}) is "
                    f"{found.get(o.name, 'unquantised')}, the quantised kernel takes "
                    f"{want.get(o.name, 'it unquantised')}")
    return None
