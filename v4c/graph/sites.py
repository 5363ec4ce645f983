"""Kernel call sites: the nodes of a graph that a kernel sees as the same call.

Nodes of one op with equal attributes and equal input types (shapes with their symbols, dtypes)
are one call site: every layer's ``q_proj`` of a model is one site, a sliding and a CSA
``sparse_attention`` are two.  A site's id is stable across processes (a hash of what defines
it), so the compiler keys an artifact's per-site config tables by it and the runtime finds each
node's table again from the graph alone.
"""
from __future__ import annotations

import hashlib
import json

from .ir import Graph, Node
from .types import TensorType


def site_id(node: Node, types: dict[str, TensorType]) -> str:
    what = {"attrs": dict(node.attrs), "inputs": [str(types[v]) for v in node.inputs]}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{node.op}:{digest}"


def call_sites(graph: Graph, ops=None) -> dict[str, list[Node]]:
    """site id -> its nodes, in order of first appearance; only nodes of ``ops`` when given."""
    types = graph.value_types()
    out: dict[str, list[Node]] = {}
    for n in graph.nodes:
        if ops is None or n.op in ops:
            out.setdefault(site_id(n, types), []).append(n)
    return out


def token_input(node: Node, types: dict[str, TensorType]) -> int | None:
    """Index of the first input shaped ``[B, T, ...]``: where a call's batch and token counts are read."""
    for i, v in enumerate(node.inputs):
        shape = types[v].shape
        if len(shape) >= 2 and shape[0] == "B" and shape[1] == "T":
            return i
    return None
