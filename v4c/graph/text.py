"""Textual form of the IR; ``parse(print_graph(g)) == g`` for every valid graph.

    graph tiny {
      meta {"dtype": "f32"}
      input %ids : i64[B,T]
      param %model.norm.weight : f32[256]
      state %layers.0.ring : u8[B,8,584] window as fp8_ds
      %h = rms_norm(%x, %model.norm.weight) {"eps": 1e-06} : f32[B,T,256]
      return %logits
      state_out %layers.0.ring = %layers.0.ring.1
    }

A state declaration ends with its kind and, unless it is plain, ``as`` its storage format.
Attributes are one JSON object per node (lists read back as tuples).
"""
from __future__ import annotations

import json
import re

from ..errors import GraphError
from .ir import Graph, Node, StateDecl
from .types import TensorType

_NAME = r"%[A-Za-z0-9_.]+"
_TYPE = re.compile(r"[a-z0-9]+\[[^\]]*\]")
_DECL = re.compile(rf"^(input|param) ({_NAME}) : (.+)$")
_STATE = re.compile(rf"^state ({_NAME}) : ({_TYPE.pattern})(?: ([a-z_]+)(?: as ([a-z0-9_]+))?)?$")
_NODE = re.compile(rf"^({_NAME}(?:, {_NAME})*) = ([a-z_0-9]+)\(((?:{_NAME}(?:, {_NAME})*)?)\)(?: (\{{.*\}}))? : (.+)$")


def print_graph(g: Graph) -> str:
    lines = [f"graph {g.name} {{"]
    if g.meta:
        lines.append(f"  meta {json.dumps(dict(g.meta), sort_keys=True)}")
    for kw, decls in (("input", g.inputs), ("param", g.params)):
        lines += [f"  {kw} %{n} : {t}" for n, t in decls]
    info = dict(g.state_decls)
    lines += [f"  state %{n} : {t}{_state_suffix(info.get(n))}" for n, t in g.states]
    for node in g.nodes:
        outs = ", ".join(f"%{o}" for o in node.outputs)
        ins = ", ".join(f"%{i}" for i in node.inputs)
        attrs = f" {node.attrs_json()}" if node.attrs else ""
        types = ", ".join(str(t) for t in node.types)
        lines.append(f"  {outs} = {node.op}({ins}){attrs} : {types}")
    lines.append("  return " + ", ".join(f"%{o}" for o in g.outputs))
    lines += [f"  state_out %{s} = %{v}" for s, v in g.state_outputs]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _state_suffix(d: StateDecl | None) -> str:
    if d is None:
        return ""
    return f" {d.kind}" + (f" as {d.format}" if d.format != "plain" else "")


def _names(s: str) -> tuple[str, ...]:
    return tuple(x.strip()[1:] for x in s.split(",") if x.strip())


def _listify(v):
    if isinstance(v, list):
        return tuple(_listify(x) for x in v)
    return v


def parse_graph(text: str) -> Graph:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines or not re.match(r"^graph [A-Za-z0-9_.-]+ \{$", lines[0]) or lines[-1] != "}":
        raise GraphError("IR text must start with 'graph NAME {' and end with '}'")
    name = lines[0].split()[1]
    decls = {"input": [], "param": [], "state": []}
    state_decls = []
    nodes, outputs, state_out, meta = [], (), [], ()
    for lineno, ln in enumerate(lines[1:-1], start=2):
        try:
            if ln.startswith("meta "):
                meta = tuple(sorted((k, _listify(v)) for k, v in json.loads(ln[5:]).items()))
            elif m := _STATE.match(ln):
                decls["state"].append((m.group(1)[1:], TensorType.parse(m.group(2))))
                if m.group(3):
                    state_decls.append((m.group(1)[1:], StateDecl(m.group(3), m.group(4) or "plain")))
            elif m := _DECL.match(ln):
                decls[m.group(1)].append((m.group(2)[1:], TensorType.parse(m.group(3))))
            elif ln.startswith("return"):
                outputs = _names(ln[len("return"):])
            elif ln.startswith("state_out "):
                s, v = ln[len("state_out "):].split(" = ")
                state_out.append((s.strip()[1:], v.strip()[1:]))
            elif m := _NODE.match(ln):
                attrs = {k: _listify(v) for k, v in json.loads(m.group(4)).items()} if m.group(4) else {}
                types = [TensorType.parse(t) for t in _TYPE.findall(m.group(5))]
                nodes.append(Node.make(m.group(2), _names(m.group(3)), _names(m.group(1)), types, attrs))
            else:
                raise GraphError("unrecognised line")
        except (GraphError, ValueError) as e:
            raise GraphError(f"IR line {lineno}: {e}: {ln[:120]!r}") from None
    if decls["state"] and not state_decls:  # text written before states declared their kind
        state_decls = _implied_decls(decls["state"], nodes)
    return Graph(name, tuple(decls["input"]), tuple(decls["param"]), tuple(decls["state"]), tuple(nodes),
                 outputs, tuple(state_out), meta, tuple(state_decls))


def _implied_decls(states, nodes) -> list:
    """Each state's kind and format as its readers and writers imply them: what an artifact compiled
    before the declarations existed says without saying it (the verifier still checks the result)."""
    from .registry import get_op
    root = {s: s for s, _ in states}
    seen: dict = {s: set() for s, _ in states}
    for n in nodes:
        op = get_op(n.op)
        for i, v in enumerate(n.inputs):
            if v in root and i < len(op.operands) and op.operands[i].kind:
                spec = op.operands[i]
                fmt = n.attr.get(op.cache_format) if spec.role == "cache" and op.cache_format else None
                seen[root[v]].add((spec.kind, fmt or "plain"))
        for ii, oi in op.state_io:
            if n.inputs[ii] in root:
                root[n.outputs[oi]] = root[n.inputs[ii]]
    out = []
    for s, _ in states:
        if len(seen[s]) != 1:
            raise GraphError(f"state %{s} declares no kind and its uses imply {sorted(seen[s]) or 'none'}")
        out.append((s, StateDecl(*seen[s].pop())))
    return out
