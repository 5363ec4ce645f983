"""Static accounting of a graph at a given context: kernels with FLOPs and bytes per decode step,
launches, and the KV-cache footprint (per token, asymptotically, and in total)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .ir import Graph
from .registry import Concrete, get_op
from .types import DTYPES, eval_dim


@dataclass(frozen=True)
class KernelCost:
    name: str
    op: str
    flops: int
    bytes: int
    launches: int


def decode_step_kernels(g: Graph, context: int, batch: int = 1) -> list[KernelCost]:
    """One decode step (``T = 1``) of ``batch`` sequences at ``context`` tokens: each op that
    launches kernels, with its FLOPs and bytes moved."""
    bind = {"B": batch, "T": 1, "L": max(context, 1)}
    types = g.value_types()
    conc = lambda v: Concrete(types[v].concrete(bind), types[v].dtype)  # noqa: E731
    out = []
    for n in g.nodes:
        op = get_op(n.op)
        if op.launches == 0:
            continue
        c = op.cost([conc(v) for v in n.inputs], [conc(v) for v in n.outputs], n.attr, context)
        out.append(KernelCost(n.outputs[0], n.op, c.flops, c.bytes, op.launches))
    return out


@dataclass(frozen=True)
class CacheFootprint:
    bytes_per_token: float  # growth per token of one sequence, as context -> infinity
    total_bytes: int  # one sequence at the given context, fixed buffers included
    fixed_bytes: int  # window rings, compressor slots, ring positions
    by_state: dict


def _grows_with_context(shape) -> int | None:
    """The compression ratio m of a dim ``L/m`` (1 for ``L``), None if the shape is fixed."""
    for d in shape:
        if d == "L":
            return 1
        if isinstance(d, str) and d.startswith("L/"):
            return int(d[2:])
    return None


def cache_footprint(g: Graph, context: int) -> CacheFootprint:
    per_token, total, fixed, by_state = 0.0, 0, 0, {}
    bind = {"B": 1, "L": max(context, 1)}
    for name, t in g.states:
        size = t.nbytes(bind)
        total += size
        by_state[name] = size
        m = _grows_with_context(t.shape)
        if m is None:
            fixed += size
        else:
            row = math.prod(eval_dim(d, bind) for d in t.shape if not (isinstance(d, str) and d.startswith("L")))
            per_token += row * DTYPES[t.dtype].itemsize / m
    return CacheFootprint(per_token, total, fixed, by_state)
