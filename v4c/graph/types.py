"""Tensor types of the IR: dtypes and shapes whose dims may be symbolic.

A dim is an ``int`` or a symbol expression: ``"B"`` (batch), ``"T"`` (tokens in
this call), ``"L"`` (the session's maximum context), or ``"SYM/k"`` meaning
``ceil(SYM / k)`` (e.g. ``"L/4"``, the compressed rows of a CSA layer).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Union

import torch

from ..errors import GraphError

Dim = Union[int, str]

DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32,
    "f16": torch.float16,
    "bf16": torch.bfloat16,
    "f64": torch.float64,
    "i64": torch.int64,
    "i32": torch.int32,
    "bool": torch.bool,
    "u8": torch.uint8,  # packed quantised cache rows
    # quantised weights (v4c/graph/weight_formats.py): the type's shape is the logical [..., N, K]; the data
    # is stored as below and the UE8M0 scales are the param ``<name>_scale_inv`` (verify.py checks it)
    "f8e4m3": torch.float8_e4m3fn,  # FP8 with one scale per 128x128 block
    "mxfp4": torch.int8,            # e2m1 packed two per byte along K, one scale per 1x32 block
    "e8m0": torch.float8_e8m0fnu,   # the scales: a biased power-of-two exponent per byte
}
TORCH_TO_DTYPE = {v: k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset({"f32", "f16", "bf16", "f64"})
INT_DTYPES = frozenset({"i64", "i32"})
QUANT_DTYPES = frozenset({"f8e4m3", "mxfp4"})
_PACK = {"mxfp4": 2}  # logical values per stored element

_DIM_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:/([1-9][0-9]*))?$")


def check_dim(d: Dim) -> Dim:
    if isinstance(d, bool):
        raise GraphError(f"bad dim {d!r}")
    if isinstance(d, int):
        if d < 0:
            raise GraphError(f"negative dim {d}")
        return d
    if isinstance(d, str) and _DIM_RE.match(d):
        return d
    raise GraphError(f"bad dim {d!r}: expected an int, a symbol or 'SYM/int'")


def eval_dim(d: Dim, bindings: Mapping[str, int]) -> int:
    """Concrete size of ``d`` under ``bindings`` (symbol -> int)."""
    if isinstance(d, int):
        return d
    m = _DIM_RE.match(d)
    sym, div = m.group(1), m.group(2)
    if sym not in bindings:
        raise GraphError(f"dim {d!r}: symbol {sym!r} is not bound (bound: {sorted(bindings)})")
    v = bindings[sym]
    return math.ceil(v / int(div)) if div else v


def dim_str(d: Dim) -> str:
    return str(d)


def parse_dim(s: str) -> Dim:
    s = s.strip()
    return check_dim(int(s)) if s.lstrip("-").isdigit() else check_dim(s)


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise GraphError(f"unknown dtype {self.dtype!r} (known: {sorted(DTYPES)})")
        object.__setattr__(self, "shape", tuple(check_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def concrete(self, bindings: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(eval_dim(d, bindings) for d in self.shape)

    def numel(self, bindings: Mapping[str, int] | None = None) -> int:
        return math.prod(self.concrete(bindings or {}))

    def nbytes(self, bindings: Mapping[str, int] | None = None) -> int:
        """Bytes as stored (a quantised weight's data only; its scales are a param of their own)."""
        return self.numel(bindings) * DTYPES[self.dtype].itemsize // _PACK.get(self.dtype, 1)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(tuple(shape), self.dtype)

    def with_dtype(self, dtype: str) -> "TensorType":
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(dim_str(d) for d in self.shape)}]"

    @staticmethod
    def parse(s: str) -> "TensorType":
        m = re.fullmatch(r"\s*([a-z0-9]+)\[([^\]]*)\]\s*", s)
        if not m:
            raise GraphError(f"bad tensor type {s!r}")
        inner = m.group(2).strip()
        dims = tuple(parse_dim(x) for x in inner.split(",")) if inner else ()
        return TensorType(dims, m.group(1))
