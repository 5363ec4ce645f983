"""Which code runs an op's calls on quantised weights (IR dtypes ``f8e4m3`` / ``mxfp4``).

The IR keeps one op name whether its weights are quantised or not, so an op kind may have both kinds
of call (the FP8 projections and the bf16 LM head are both ``linear``). For each op kind with at least
one node on quantised weights, ``quantized_variants`` says where those calls go: the ``qgemm``
template's launcher for the op (``qgemm.QUANTIZED``) when every such node passes exactly the quantised
arguments that launcher takes (``ARGS``) and its shapes meet the launcher's constraints; otherwise the
op's PyTorch reference, with the reason, so the manifest and ``v4c inspect`` show it.
"""
from __future__ import annotations

import importlib

from ..graph.ir import Graph
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
}


def _quantised_inputs(graph: Graph) -> dict:
    """node -> {input position: format} for the nodes that read a quantised param."""
    ptypes = dict(graph.params)
    out = {}
    for n in graph.nodes:
        q = {i: ptypes[v].dtype for i, v in enumerate(n.inputs)
             if v in ptypes and ptypes[v].dtype in QUANT_DTYPES}
        if q:
            out[n] = q
    return out


def _mismatch(op: str, node, found: dict) -> str | None:
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


def quantized_variants(graph: Graph) -> dict[str, dict]:
    """op -> its manifest entry for calls on quantised weights: ``{"module": "qgemm", "kernel": <qgemm
    META key>, "meta": {...}, "config_source": "default"}`` or ``{"module": None, "config_source":
    "reference", "reason": ...}``."""
    qgemm = None
    types = graph.value_types()
    out: dict[str, dict] = {}
    for node, found in _quantised_inputs(graph).items():
        op = node.op
        if out.get(op, {}).get("config_source") == "reference":
            continue  # one reference-run node makes the whole op kind run its quantised calls there
        reason = _mismatch(op, node, found)
        if reason is None:
            qgemm = qgemm or importlib.import_module(f"v4c.codegen.templates.{FAMILY}")
            key = qgemm.QUANTIZED[op][1]
            meta = dict(qgemm.DEFAULT_META[key])
            shapes = {"inputs": [tuple(types[v].shape) for v in node.inputs], "attrs": node.attr}
            why = qgemm.constraints(key, meta, shapes)
            if why is not None:
                reason = f"{op} %{node.outputs[0]}: {key} cannot run it: {why}"
            else:
                # the tuner does not search the quantised variants yet: their meta is the template default
                out.setdefault(op, {"module": FAMILY, "kernel": key, "meta": meta, "config_source": "default"})
                continue
        out[op] = {"module": None, "config_source": "reference", "reason": reason}
    return out
