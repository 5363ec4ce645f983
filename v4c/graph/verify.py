"""The verifier: every invariant a graph must hold after every pass."""
from __future__ import annotations

from ..errors import GraphError
from . import ops as _ops  # noqa: F401  (fills the registry)
from .ir import Graph, Node
from .registry import OpDef, get_op
from .signature import STATE_KINDS, Operand, check_attrs
from .storage import KEY_FORMATS, KV_FORMATS, stored_dtype
from .types import QUANT_DTYPES
from .weight_formats import FORMATS
from .weights import scale_name


def verify(g: Graph) -> Graph:
    """Check ``g``; raise GraphError naming the first broken invariant, else return ``g``."""
    types = {}
    for kind, decls in (("input", g.inputs), ("param", g.params), ("state", g.states)):
        for n, t in decls:
            if n in types:
                raise GraphError(f"{kind} %{n} is defined twice")
            types[n] = t
    _check_quantized_params(g)
    _check_state_decls(g)
    params, decls = dict(g.params), dict(g.state_decls)
    version = {s: s for s, _ in g.states}  # state root -> its current version
    root_of = {s: s for s, _ in g.states}  # value -> state root it is a version of
    dead: dict[str, int] = {}  # superseded state versions -> index of the node that updated them
    for i, node in enumerate(g.nodes):
        where = f"node {i} ({node.op} -> %{', %'.join(node.outputs)})"
        op = get_op(node.op)
        if not op.min_inputs <= len(node.inputs) <= op.max_inputs:
            raise GraphError(f"{where}: takes {op.min_inputs}..{op.max_inputs} inputs ({op.signature()}), "
                             f"got {len(node.inputs)}")
        why = check_attrs(node.attr, op.attrs, node.op)
        if why:
            raise GraphError(f"{where}: {why}")
        for spec, v in zip(op.operands, node.inputs):
            if v not in types:
                raise GraphError(f"{where}: input %{v} is not defined before use")
            if v in dead:
                raise GraphError(f"{where}: reads %{v}, a state version already updated by node {dead[v]}")
            why = _role_error(spec, v, node, op, params, root_of, decls)
            if why:
                raise GraphError(f"{where}: operand {spec.name} (%{v}) {why}")
        try:
            want = list(op.infer([types[v] for v in node.inputs], node.attr))
        except GraphError as e:
            raise GraphError(f"{where}: {e}") from None
        except KeyError as e:  # an optional attribute the op needs in this use
            raise GraphError(f"{where}: missing attribute {e}") from None
        if len(want) != len(node.outputs) or list(node.types) != want:
            raise GraphError(f"{where}: declared types {[str(t) for t in node.types]} "
                             f"but the op infers {[str(t) for t in want]}")
        for o in node.outputs:
            if o in types:
                raise GraphError(f"{where}: %{o} is defined twice")
        for ii, oi in op.state_io:
            src = node.inputs[ii]
            if src not in root_of or version[root_of[src]] != src:
                raise GraphError(f"{where}: input {ii} (%{src}) must be the current version of a state")
            root = root_of[src]
            dead[src] = i
            version[root] = node.outputs[oi]
            root_of[node.outputs[oi]] = root
        types.update(zip(node.outputs, node.types))
    for o in g.outputs:
        if o not in types:
            raise GraphError(f"output %{o} is not defined")
        if o in dead:
            raise GraphError(f"output %{o} is a superseded state version")
    final = {s: v for s, v in version.items() if v != s}
    if dict(g.state_outputs) != final:
        raise GraphError(f"state_out must map each updated state to its final version: expected {final}, "
                         f"got {dict(g.state_outputs)}")
    return g


def _role_error(spec: Operand, v: str, node: Node, op: OpDef, params, root_of, decls) -> str | None:
    """Why value ``v`` cannot be operand ``spec`` of ``node``, or None."""
    if spec.role == "weight":
        return None if v in params else "is a weight: it must be a param"
    if spec.role == "activation":
        return "is a param, not an activation" if v in params else "is a state, not an activation" if v in root_of \
            else None
    if v not in root_of:
        return f"is a {spec.role}: it must be a state"
    d = decls[root_of[v]]
    if spec.kind and d.kind != spec.kind:
        return f"must be a {spec.kind} state; %{root_of[v]} is declared {d.kind}"
    fmt = node.attr.get(op.cache_format) if spec.role == "cache" else None
    if spec.role == "cache" and (fmt or "plain") != d.format:
        return f"has {op.cache_format}={fmt!r}, but %{root_of[v]} is declared {d.format}"
    return None


_FORMATS = {"window": KV_FORMATS, "compressed_rows": KV_FORMATS, "indexer_keys": KEY_FORMATS, "compressor_state": ()}


def _check_state_decls(g: Graph) -> None:
    """Each state, in order, declares a known kind and a storage format its kind and dtype allow."""
    types = dict(g.states)
    for n, t in g.states:
        if n not in dict(g.state_decls):
            raise GraphError(f"state %{n} : {t} declares no kind (one of {', '.join(STATE_KINDS)})")
    if [n for n, _ in g.state_decls] != [n for n, _ in g.states]:
        raise GraphError("state declarations must name each state once, in the order of the states")
    for n, d in g.state_decls:
        if d.kind not in STATE_KINDS:
            raise GraphError(f"state %{n}: unknown kind {d.kind!r} (one of {', '.join(STATE_KINDS)})")
        if d.format != "plain" and d.format not in _FORMATS[d.kind]:
            raise GraphError(f"state %{n}: a {d.kind} state cannot be stored as {d.format!r} "
                             f"(plain{''.join(', ' + f for f in _FORMATS[d.kind])})")
        if d.format != "plain" and stored_dtype(d.format, types[n].dtype) != types[n].dtype:
            raise GraphError(f"state %{n} : {types[n]}: stored as {d.format} it must be "
                             f"{stored_dtype(d.format, types[n].dtype)}")


def _check_quantized_params(g: Graph) -> None:
    """Every quantised weight has its e8m0 scale param of the shape its format implies, and every scale a weight."""
    params = dict(g.params)
    owners = {}
    for n, t in g.params:
        if t.dtype not in QUANT_DTYPES:
            continue
        f = FORMATS[t.dtype]
        if not all(isinstance(d, int) for d in t.shape):
            raise GraphError(f"param %{n} : {t}: a quantised weight needs concrete dims")
        try:
            f.check_shape(t.shape, f"param %{n}")
        except ValueError as e:
            raise GraphError(str(e)) from None
        s = scale_name(n)
        want = f"e8m0[{','.join(str(d) for d in f.scale_shape(t.shape))}]"
        if s not in params:
            raise GraphError(f"param %{n} : {t} has no scale param %{s} (expected {want})")
        if str(params[s]) != want:
            raise GraphError(f"param %{n} : {t}: its scale %{s} is {params[s]}, expected {want}")
        owners[s] = n
    for n, t in g.params:
        if t.dtype == "e8m0" and n not in owners:
            raise GraphError(f"param %{n} : {t} is a scale without a quantised weight")
