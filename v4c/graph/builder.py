"""A small helper to emit nodes with their types inferred from the op registry."""
from __future__ import annotations

from . import ops as _ops  # noqa: F401
from .ir import Graph, Node, StateDecl
from .registry import get_op
from .types import TensorType


class GraphBuilder:
    """Accumulates declarations and nodes; ``finish`` returns an immutable ``Graph``."""

    def __init__(self, name: str):
        self.name = name
        self.inputs: list = []
        self.params: list = []
        self.states: list = []
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {}
        self._current: dict[str, str] = {}  # state root -> current version
        self._root: dict[str, str] = {}
        self._decl: dict[str, StateDecl] = {}

    def _fresh(self, base: str) -> str:
        if base not in self.types:
            return base
        k = 1
        while f"{base}.{k}" in self.types:
            k += 1
        return f"{base}.{k}"

    def _declare(self, kind: list, name: str, t: TensorType) -> str:
        if name in self.types:
            raise ValueError(f"%{name} declared twice")
        kind.append((name, t))
        self.types[name] = t
        return name

    def input(self, name, shape, dtype) -> str:
        return self._declare(self.inputs, name, TensorType(tuple(shape), dtype))

    def param(self, name, shape, dtype) -> str:
        return self._declare(self.params, name, TensorType(tuple(shape), dtype))

    def state(self, name, shape, dtype, kind: str | None = None, fmt: str = "plain") -> str:
        """A state buffer holding ``kind`` (None: the kind its uses imply, known at ``finish``)."""
        self._current[name] = self._root[name] = name
        self._decl[name] = StateDecl(kind or "", fmt)
        return self._declare(self.states, name, TensorType(tuple(shape), dtype))

    def cur(self, state: str) -> str:
        return self._current[state]

    def op(self, op: str, *inputs: str, out: str | tuple[str, ...], **attrs):
        """Append ``op(inputs)``; ``out`` names the result(s). Returns the output name(s)."""
        opdef = get_op(op)
        node_types = list(opdef.infer([self.types[i] for i in inputs], attrs))
        outs = (out,) if isinstance(out, str) else tuple(out)
        if len(outs) != len(node_types):
            raise ValueError(f"{op}: {len(node_types)} outputs, {len(outs)} names")
        names = [self._fresh(o) for o in outs]
        for ii, oi in opdef.state_io:  # a state update makes the output its new version
            root = self._root[inputs[ii]]
            self._current[root] = names[oi]
            self._root[names[oi]] = root
        self.nodes.append(Node.make(op, inputs, names, node_types, attrs))
        self.types.update(zip(names, node_types))
        return names[0] if isinstance(out, str) else tuple(names)

    def _kind_from_uses(self, state: str) -> str:
        kinds = {get_op(n.op).operands[i].kind for n in self.nodes for i, v in enumerate(n.inputs)
                 if self._root.get(v) == state} - {None}
        if len(kinds) != 1:
            raise ValueError(f"state %{state}: its uses imply kinds {sorted(kinds)}; declare its kind")
        return kinds.pop()

    def finish(self, outputs, meta: dict | None = None) -> Graph:
        state_out = tuple((s, v) for s, v in self._current.items() if v != s)
        decls = tuple((s, d if (d := self._decl[s]).kind else StateDecl(self._kind_from_uses(s), d.format))
                      for s, _ in self.states)
        return Graph(self.name, tuple(self.inputs), tuple(self.params), tuple(self.states), tuple(self.nodes),
                     tuple(outputs), state_out, tuple(sorted((meta or {}).items())), decls)
