"""The IR: an immutable graph of typed SSA values.

A graph has inputs (per call: token ids, positions), params (weights, read
only), states (per-sequence decode buffers) and nodes in execution order.
A node that updates a state takes the current version of the state as an
input and returns the next version as an output (the op's ``state_io`` says
which output aliases which input); the runtime updates the buffer in place,
so the verifier checks that nothing reads a version after it was updated.
Each state is declared with what it holds (its kind) and how (its storage format).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..errors import GraphError
from .types import TensorType


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        raise TypeError("nested dict attributes are not allowed")
    return v


@dataclass(frozen=True)
class Node:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    types: tuple[TensorType, ...]
    attrs: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def make(op: str, inputs, outputs, types, attrs: dict | None = None) -> "Node":
        items = tuple(sorted((k, _freeze(v)) for k, v in (attrs or {}).items()))
        return Node(op, tuple(inputs), tuple(outputs), tuple(types), items)

    @property
    def attr(self) -> dict[str, Any]:
        return dict(self.attrs)

    def attrs_json(self) -> str:
        return json.dumps(dict(self.attrs), sort_keys=True, separators=(", ", ": "))


@dataclass(frozen=True)
class StateDecl:
    """What a state buffer holds (``signature.STATE_KINDS``) and its storage format: ``plain`` (values as
    computed) or a cache format of ``storage.py`` that the ops reading and writing it encode with."""

    kind: str
    format: str = "plain"


@dataclass(frozen=True)
class Graph:
    name: str
    inputs: tuple[tuple[str, TensorType], ...]
    params: tuple[tuple[str, TensorType], ...]
    states: tuple[tuple[str, TensorType], ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    # (state name, name of its final version) for every state a node updates
    state_outputs: tuple[tuple[str, str], ...] = ()
    meta: tuple[tuple[str, Any], ...] = field(default=())
    # (state name, its declaration), in the order of ``states``
    state_decls: tuple[tuple[str, StateDecl], ...] = ()

    def value_types(self) -> dict[str, TensorType]:
        types: dict[str, TensorType] = {}
        for n, t in (*self.inputs, *self.params, *self.states):
            types[n] = t
        for node in self.nodes:
            types.update(zip(node.outputs, node.types))
        return types

    def state_decl(self, name: str) -> StateDecl:
        for n, d in self.state_decls:
            if n == name:
                return d
        raise GraphError(f"state %{name} has no declaration")

    def param_types(self) -> dict[str, TensorType]:
        return dict(self.params)

    def ops(self) -> Iterator[str]:
        return (n.op for n in self.nodes)

    def replace(self, **kw) -> "Graph":
        return Graph(**{**self.__dict__, **kw})
