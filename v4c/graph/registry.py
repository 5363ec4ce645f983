"""The closed registry of IR ops.

Every op declares its named operands and typed attributes (``signature.py``),
how its output types follow from its inputs (``infer``), a PyTorch reference
implementation (``ref``) and its cost (``cost``: FLOPs and bytes moved for
concrete shapes and a context length).  Nothing outside this registry can
appear in a graph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import GraphError
from .signature import Attr, Operand, parse_operands
from .types import DTYPES, Dim, TensorType


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int

    def __add__(self, o: "Cost") -> "Cost":
        return Cost(self.flops + o.flops, self.bytes + o.bytes)


@dataclass(frozen=True)
class Concrete:
    """A tensor's concrete shape and dtype, as cost functions see it."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def itemsize(self) -> float:
        # mxfp4 weights hold two values per byte
        return DTYPES[self.dtype].itemsize / 2 if self.dtype == "mxfp4" else DTYPES[self.dtype].itemsize

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return int(self.numel * self.itemsize)


InferFn = Callable[[Sequence[TensorType], dict], Sequence[TensorType]]
CostFn = Callable[[Sequence[Concrete], Sequence[Concrete], dict, int], Cost]


@dataclass(frozen=True)
class OpDef:
    name: str
    infer: InferFn
    ref: Callable[..., Any]
    cost: CostFn
    operands: tuple[Operand, ...]
    attrs: tuple[Attr, ...] = ()
    # (input index, output index): the output is the next version of that state input
    state_io: tuple[tuple[int, int], ...] = ()
    doc: str = ""
    launches: int = 1  # GPU kernel launches one execution takes (0 for views)
    fused: bool = False  # produced by a fusion pass, never by the builder
    cache_format: str | None = None  # the attribute naming the storage format of its cache operands

    @property
    def min_inputs(self) -> int:
        return sum(not o.optional for o in self.operands)

    @property
    def max_inputs(self) -> int:
        return len(self.operands)

    def index(self, name: str) -> int:
        for i, o in enumerate(self.operands):
            if o.name == name:
                return i
        raise GraphError(f"op {self.name!r} has no operand {name!r}")

    def signature(self) -> str:
        return f"{self.name}({', '.join(map(str, self.operands))})"


def make_opdef(name: str, infer: InferFn, ref, cost: CostFn | None, operands, attrs=(), state_io=(),
               doc: str = "", launches: int = 1, fused: bool = False, cache_format: str | None = None) -> OpDef:
    """An OpDef from operand and attribute specs (``signature.py``); ``state_io`` names its state inputs:
    ``(("ring", 0), ...)``."""
    ops = parse_operands(operands)
    names = [o.name for o in ops]
    io = tuple((names.index(i), o) for i, o in state_io)
    if any(ops[i].role not in ("cache", "state") for i, _ in io):
        raise GraphError(f"op {name!r}: a state it updates must be a cache or state operand")
    return OpDef(name, infer, ref, cost or io_bytes_cost(0), ops, tuple(Attr.parse(a) for a in attrs), io, doc,
                 launches, fused, cache_format)


OPS: dict[str, OpDef] = {}


def register(name: str, *, infer: InferFn, operands, attrs=(), cost: CostFn | None = None, state_io=(),
             cache_format: str | None = None, launches: int = 1, fused: bool = False):
    """Decorator: register ``fn`` as the reference implementation of op ``name``."""

    def deco(fn):
        if name in OPS:
            raise GraphError(f"op {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        OPS[name] = make_opdef(name, infer, fn, cost, operands, attrs, state_io, doc, launches, fused, cache_format)
        return fn

    return deco


def get_op(name: str) -> OpDef:
    try:
        return OPS[name]
    except KeyError:
        raise GraphError(f"unknown op {name!r}") from None


def operand(node, name: str) -> str | None:
    """The value ``node`` passes as its op's operand ``name`` (None: an optional operand left out)."""
    i = get_op(node.op).index(name)
    return node.inputs[i] if i < len(node.inputs) else None


def operands_with_role(node, role: str, gemm: bool | None = None) -> list[tuple[str, str]]:
    """(operand name, value) of each operand of ``node`` with ``role`` (and, if given, that ``gemm`` flag)."""
    ops = get_op(node.op).operands
    return [(o.name, v) for o, v in zip(ops, node.inputs) if o.role == role and (gemm is None or o.gemm == gemm)]


# ---- helpers shared by the op definitions -------------------------------------------------

def same_dim(a: Dim, b: Dim, what: str) -> Dim:
    if a != b:
        raise GraphError(f"{what}: {a!r} != {b!r}")
    return a


def expect(cond: bool, msg: str) -> None:
    if not cond:
        raise GraphError(msg)


def expect_rank(t: TensorType, rank: int, what: str) -> None:
    expect(t.rank == rank, f"{what}: expected rank {rank}, got {t}")


def expect_float(t: TensorType, what: str) -> None:
    expect(t.dtype in ("f32", "f16", "bf16", "f64"), f"{what}: expected a float tensor, got {t}")


def expect_int(t: TensorType, what: str) -> None:
    expect(t.dtype in ("i64", "i32"), f"{what}: expected an integer tensor, got {t}")


def io_bytes_cost(flops_per_out: int) -> CostFn:
    """Cost of an elementwise-like op: reads all inputs, writes all outputs."""

    def cost(ins, outs, attrs, ctx):
        return Cost(flops_per_out * sum(o.numel for o in outs),
                    sum(i.nbytes for i in ins) + sum(o.nbytes for o in outs))

    return cost


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize
