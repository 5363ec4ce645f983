"""Static accounting of a graph at a given context: kernels with FLOPs and bytes per decode step,
launches, and the KV-cache footprint (per token, asymptotically, and in total)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .ir import Graph
from .registry import Concrete, get_op
from .signature import STATE_KINDS
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


BLOCK_TOKENS = 256  # context is allocated in blocks of this many tokens, as serving stacks page their caches

def state_kind(g: Graph, name: str) -> str:
    """The memory kind of state buffer ``name`` as ``g`` declares it: window ring (+ positions),
    compressed KV rows, indexer keys, or compressor state (the pending, not yet pooled, projections
    of the attention and indexer compressors)."""
    return g.state_decl(name).kind


def planned_context(context: int, block: int = BLOCK_TOKENS) -> int:
    """Tokens allocated for a ``context``-token sequence: whole blocks."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    return -(-context // block) * block


@dataclass(frozen=True)
class CacheFootprint:
    bytes_per_token: float  # growth per token of one sequence, as context -> infinity
    total_bytes: int  # one sequence at the given context (allocated in whole blocks), fixed buffers included
    fixed_bytes: int  # window rings, compressor slots, ring positions
    by_state: dict
    by_kind: dict  # STATE_KINDS -> bytes, one sequence
    allocated_tokens: int  # the context rounded up to whole blocks


def _grows_with_context(shape) -> int | None:
    """The compression ratio m of a dim ``L/m`` (1 for ``L``), None if the shape is fixed."""
    for d in shape:
        if d == "L":
            return 1
        if isinstance(d, str) and d.startswith("L/"):
            return int(d[2:])
    return None


def cache_footprint(g: Graph, context: int, block: int = BLOCK_TOKENS) -> CacheFootprint:
    """State bytes of one sequence whose session allows ``context`` tokens; what ``Session.memory()``
    reports for a session of that ``max_context`` (per sequence)."""
    per_token, total, fixed, by_state = 0.0, 0, 0, {}
    by_kind = dict.fromkeys(STATE_KINDS, 0)
    alloc = planned_context(max(context, 1), block)
    bind = {"B": 1, "L": alloc}
    for name, t in g.states:
        size = t.nbytes(bind)
        total += size
        by_state[name] = size
        by_kind[state_kind(g, name)] += size
        m = _grows_with_context(t.shape)
        if m is None:
            fixed += size
        else:
            row = math.prod(eval_dim(d, bind) for d in t.shape if not (isinstance(d, str) and d.startswith("L")))
            per_token += row * DTYPES[t.dtype].itemsize / m
    return CacheFootprint(per_token, total, fixed, by_state, by_kind, alloc)
