"""IR graph -> ONNX model: the full-sequence forward of a fresh sequence, ids [B, T] -> logits.

The graph's per-call inputs become: ``ids`` (a graph input) and ``pos`` (``0..T-1`` in every
row, computed from ``ids``' shape). The decode states become their empty values (zeros, ``-1``
for ring positions) made inside the model, with ``L`` (the session's maximum context) = ``T``.
Unfused ops lower to standard ONNX ops; fused ops become calls of ``ai.v4c`` functions. Every
ONNX node carries ``v4c.node`` (the IR node it belongs to) in its metadata, and one node per
IR node names the IR op, attributes, inputs and outputs, which is what ``import_onnx`` reads.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper

from ..errors import V4CError
from ..graph.ir import Graph
from ..graph.registry import get_op
from ..graph.types import TensorType
from .emit import DOMAIN, DOMAIN_VERSION, ONNX_DTYPE, OPSET, Emitter, Val, tensor_proto, value_info
from .functions import FunctionLibrary
from .lowering import lower

FORMAT = "v4c-onnx"
FORMAT_VERSION = 1
EXTERNAL_DATA_LIMIT = 2 << 30  # protobuf cannot hold a model past 2 GB: weights go to a side file
IR_VERSION = 10  # node metadata_props need IR version 10


def _tag(nodes, start: int, group: str, **info) -> None:
    for n in nodes[start:]:
        n.metadata_props.add(key="v4c.node", value=group)
    for k, v in info.items():
        nodes[-1].metadata_props.add(key=f"v4c.{k}", value=v)


def _empty_state(e: Emitter, name: str, typ: TensorType) -> str:
    """A state's empty value: zeros, or -1 for ring positions (an empty slot), L = T.

    Built from slices of ``ids`` and broadcasts rather than ConstantOfShape so that ONNX shape
    inference keeps the batch dim ``B`` (and the static dims)."""
    if typ.rank < 2 or typ.shape[0] != "B" or not all(isinstance(d, int) for d in typ.shape[2:]):
        raise V4CError(f"export-onnx: state %{name} : {typ} is not [B, rows, ...] with static trailing dims")
    rows = typ.shape[1]
    if rows == "L":
        base = "ids"  # [B, T]
    elif isinstance(rows, str) and rows.startswith("L/"):  # [B, ceil(T / k)]
        base = e.slice("ids", 1, 0, 1 << 62, int(rows[2:]))
    elif isinstance(rows, int):  # [B, 1] + [1, rows]
        base = e("Add", e.slice("ids", 1, 0, 1), e.const([[0] * rows], "i64"))
    else:
        raise V4CError(f"export-onnx: state %{name} has dim {rows!r}; only L, L/k and ints are known")
    zero = e("Mul", base, e.scalar(0, "i64"))
    fill = e("Sub", zero, e.scalar(1, "i64")) if typ.dtype in ("i64", "i32") else zero
    value = e.cast(fill, "i64", typ.dtype)
    if typ.rank == 2:
        return e.finish(value, name)
    rest = e.const(np.zeros((1, 1, *typ.shape[2:])).tolist(), typ.dtype)
    return e("Add", e.unsqueeze(value, *range(2, typ.rank)), rest, out=name)


def _prologue(e: Emitter, g: Graph) -> dict[str, str]:
    """``pos`` and the empty states, sized from ``ids``' shape."""
    start = len(e.nodes)
    made = {}
    for name, typ in g.inputs:
        if name == "ids":
            continue
        if name != "pos" or typ != TensorType(("B", "T"), "i64"):
            raise V4CError(f"export-onnx: graph input %{name} : {typ} is not one the exported forward can make "
                           f"(it takes ids and computes pos)")
        # 0..T-1 in every row, computed elementwise from ids so that shape inference keeps [B, T]
        ones = e("Add", e("Mul", "ids", e.scalar(0, "i64")), e.scalar(1, "i64"))
        made[name] = e("CumSum", ones, e.scalar(1, "i64"), exclusive=1, out="pos")
    for name, typ in g.states:
        made[name] = _empty_state(e, name, typ)
    _tag(e.nodes, start, "prologue")
    return made


def graph_to_onnx(g: Graph, params: dict[str, torch.Tensor] | None = None, *, producer: str = "v4c") -> onnx.ModelProto:
    """The ONNX model of ``g``'s fresh-sequence forward; ``params`` (name -> tensor) become the
    initializers, or with None every param is a graph input (a weight-free graph)."""
    if [n for n, _ in g.inputs][:1] != ["ids"]:
        raise V4CError("export-onnx: the graph's first input must be %ids")
    quantised = [f"%{n} : {t}" for n, t in g.params if t.dtype not in ONNX_DTYPE]
    if quantised:
        raise V4CError(f"export-onnx: {len(quantised)} quantised weight(s) (FP8/MXFP4 blocks, first "
                       f"{quantised[0]}) have no ONNX lowering yet; export a model with unquantised weights")
    e = Emitter("prologue/")
    lib = FunctionLibrary()
    types = g.value_types()
    _prologue(e, g)
    for i, node in enumerate(g.nodes):
        start = len(e.nodes)
        e.prefix = f"{node.outputs[0]}/"
        ins = [Val(n, types[n]) for n in node.inputs]
        attrs = node.attr
        if get_op(node.op).fused:
            overload = lib.call(node.op, [v.type for v in ins], attrs)
            e(node.op, *node.inputs, out=list(node.outputs), domain=DOMAIN, overload=overload)
        else:
            lower(e, node.op, ins, list(node.outputs), attrs)
        _tag(e.nodes, start, f"n{i}", op=node.op, attrs=node.attrs_json(), inputs=json.dumps(list(node.inputs)),
             outputs=json.dumps(list(node.outputs)))
    inputs = [value_info("ids", types["ids"])]
    initializers = []
    for name, t in g.params:
        if params is None:
            inputs.append(value_info(name, t))
        else:
            initializers.append(tensor_proto(name, params[name], t.dtype))
    outputs = [value_info(o, types[o]) for o in g.outputs]
    graph = helper.make_graph(e.nodes, g.name, inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
                              functions=lib.functions, producer_name=producer, ir_version=IR_VERSION)
    decl = {"name": g.name, "meta": dict(g.meta), "inputs": [[n, str(t)] for n, t in g.inputs],
            "states": [[n, str(t), g.state_decl(n).kind, g.state_decl(n).format] for n, t in g.states],
            "state_outputs": [list(x) for x in g.state_outputs],
            "outputs": list(g.outputs), "params": "initializers" if params is not None else "inputs"}
    helper.set_model_props(model, {"v4c.format": f"{FORMAT}/{FORMAT_VERSION}", "v4c.graph": json.dumps(decl)})
    model.doc_string = ("v4c export: full-sequence forward of a fresh sequence (ids [B, T] -> logits "
                        "[B, T, vocab]); decode states start empty inside the model, L = T")
    return model


def save_model(model: onnx.ModelProto, output: Path, external_limit: int = EXTERNAL_DATA_LIMIT) -> list[Path]:
    """Write ``model``; past ``external_limit`` bytes of weights they go to ``<output>.data``.
    Returns the files written."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes <= external_limit:
        onnx.save_model(model, output)
        return [output]
    data = output.with_name(output.name + ".data")
    if data.exists():
        data.unlink()  # onnx appends to an existing data file
    onnx.save_model(model, output, save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                    size_threshold=1024)
    return [output, data]
