"""ONNX model written by ``v4c export-onnx`` -> the IR graph it was exported from.

The ONNX graph gives the nodes: each group of ONNX nodes tagged with one ``v4c.node`` is one IR
node, whose op, attributes, inputs and outputs are checked against what the group computes
(the values it reads from outside and the values it produces; a fused op is the ``ai.v4c``
function call itself). Params come from the initializers (or graph inputs), their shapes and
dtypes from the tensors. What ONNX cannot say (the symbolic ``L`` of the decode states, the
IR's ``pos`` input that the model computes) comes from the model's ``v4c.graph`` metadata.
Types of node outputs are inferred again by the op registry and the graph is verified.
"""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from ..errors import V4CError
from ..graph.ir import Graph, Node, StateDecl
from ..graph.registry import get_op
from ..graph.text import _listify
from ..graph.types import TensorType
from ..graph.verify import verify
from .emit import DOMAIN, IR_DTYPE
from .export import FORMAT, FORMAT_VERSION


class NotV4COnnx(V4CError):
    """An ONNX file that ``v4c export-onnx`` did not write (or a newer format version)."""


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props}


def _shape(vi: onnx.ValueInfoProto) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in vi.type.tensor_type.shape.dim)


def onnx_to_graph(model: onnx.ModelProto, source: str = "model") -> Graph:
    props = {p.key: p.value for p in model.metadata_props}
    fmt = props.get("v4c.format")
    if fmt is None or "v4c.graph" not in props:
        raise NotV4COnnx(f"{source}: not an ONNX file written by v4c export-onnx (no v4c.format metadata; "
                         f"producer {model.producer_name or 'unknown'!r}); v4c imports only the files it exported")
    if fmt != f"{FORMAT}/{FORMAT_VERSION}":
        raise NotV4COnnx(f"{source}: v4c ONNX format {fmt!r}, this v4c reads {FORMAT}/{FORMAT_VERSION}")
    decl = json.loads(props["v4c.graph"])
    g = model.graph
    if decl["params"] == "initializers":
        params = [(t.name, TensorType(tuple(t.dims), IR_DTYPE[t.data_type])) for t in g.initializer]
    else:
        params = [(vi.name, TensorType(_shape(vi), IR_DTYPE[vi.type.tensor_type.elem_type])) for vi in g.input
                  if vi.name != "ids"]
    inputs = [(n, TensorType.parse(t)) for n, t in decl["inputs"]]
    states = [(s[0], TensorType.parse(s[1])) for s in decl["states"]]
    state_decls = tuple((s[0], StateDecl(*s[2:])) for s in decl["states"] if len(s) == 4)  # kind, format
    ids = [vi for vi in g.input if vi.name == "ids"]
    if not ids or TensorType(_shape(ids[0]), IR_DTYPE[ids[0].type.tensor_type.elem_type]) != dict(inputs)["ids"]:
        raise V4CError(f"{source}: graph input ids does not match the declared %ids")
    types = {n: t for n, t in (*inputs, *params, *states)}

    groups: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        key = _meta(node).get("v4c.node")
        if key is None:
            raise V4CError(f"{source}: ONNX node {node.name!r} ({node.op_type}) belongs to no v4c node")
        groups.setdefault(key, []).append(node)
    nodes = []
    for key, members in groups.items():
        if key == "prologue":
            produced = {o for n in members for o in n.output}
            missing = [n for n, _ in (*inputs[1:], *states) if n not in produced]
            if missing:
                raise V4CError(f"{source}: the prologue does not make {', '.join(missing)}")
            continue
        info = _meta(members[-1])
        try:
            op, attrs = info["v4c.op"], json.loads(info["v4c.attrs"] or "{}")
            ins, outs = json.loads(info["v4c.inputs"]), json.loads(info["v4c.outputs"])
        except (KeyError, json.JSONDecodeError) as e:
            raise V4CError(f"{source}: v4c node {key} has broken metadata ({e})") from None
        where = f"{source}: v4c node {key} ({op})"
        if get_op(op).fused:
            call = members[0]
            if len(members) != 1 or call.domain != DOMAIN or call.op_type != op:
                raise V4CError(f"{where}: expected one {DOMAIN} call of {op}")
            if list(call.input) != ins or list(call.output) != outs:
                raise V4CError(f"{where}: the call's inputs/outputs differ from its metadata")
        else:
            produced = {o for n in members for o in n.output}
            read = {i for n in members for i in n.input if i and i not in produced}
            if read != set(ins) or not set(outs) <= produced:
                raise V4CError(f"{where}: reads {sorted(read)} and makes {sorted(set(outs) & produced)}, "
                               f"but its metadata says {ins} -> {outs}")
        attrs = {k: _listify(v) for k, v in attrs.items()}
        try:
            out_types = list(get_op(op).infer([types[i] for i in ins], attrs))
        except KeyError as e:
            raise V4CError(f"{where}: input {e} is not defined before use") from None
        nodes.append(Node.make(op, ins, outs, out_types, attrs))
        types.update(zip(outs, out_types))
    graph_outputs = [o.name for o in g.output]
    if graph_outputs != decl["outputs"]:
        raise V4CError(f"{source}: graph outputs {graph_outputs} differ from the declared {decl['outputs']}")
    meta = tuple(sorted((k, _listify(v)) for k, v in decl["meta"].items()))
    return verify(Graph(decl["name"], tuple(inputs), tuple(params), tuple(states), tuple(nodes),
                        tuple(decl["outputs"]), tuple(tuple(x) for x in decl["state_outputs"]), meta, state_decls))


def import_onnx(path: str | Path) -> Graph:
    """Read an ONNX file (weights stay where they are) and rebuild the IR graph."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise NotV4COnnx(f"{path}: not a readable ONNX file ({type(e).__name__}: {str(e)[:160]})") from None
    return onnx_to_graph(model, str(path))
