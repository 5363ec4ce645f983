"""The verifier: every invariant a graph must hold after every pass."""
from __future__ import annotations

from ..errors import GraphError
from . import ops as _ops  # noqa: F401  (fills the registry)
from .ir import Graph
from .registry import get_op
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
    version = {s: s for s, _ in g.states}  # state root -> its current version
    root_of = {s: s for s, _ in g.states}  # value -> state root it is a version of
    dead: dict[str, int] = {}  # superseded state versions -> index of the node that updated them
    for i, node in enumerate(g.nodes):
        where = f"node {i} ({node.op} -> %{', %'.join(node.outputs)})"
        op = get_op(node.op)
        if not op.min_inputs <= len(node.inputs) <= op.max_inputs:
            raise GraphError(f"{where}: takes {op.min_inputs}..{op.max_inputs} inputs, got {len(node.inputs)}")
        for v in node.inputs:
            if v not in types:
                raise GraphError(f"{where}: input %{v} is not defined before use")
            if v in dead:
                raise GraphError(f"{where}: reads %{v}, a state version already updated by node {dead[v]}")
        try:
            want = list(op.infer([types[v] for v in node.inputs], node.attr))
        except GraphError as e:
            raise GraphError(f"{where}: {e}") from None
        except KeyError as e:
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
