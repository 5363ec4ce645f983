"""Cache storage formats: how a state buffer holds rows, and the encode/decode at its boundary.

``kv_format`` (window ring and compressed rows) is a plain dtype ("f32", "bf16", "f16") or
"fp8_ds" (the 584-byte V4 row: e4m3 nope dims, bf16 RoPE dims, UE8M0 scales).
``key_format`` (indexer keys) is a plain dtype, "fp8" (e4m3 + fp32 scale) or "mxfp4"
(e2m1 + UE8M0 scales per 32; keys and queries are Hadamard-rotated first).
Decoding happens inside the ops that read a cache, never as a pass over it.
"""
from __future__ import annotations

import torch

from ..errors import GraphError
from . import quant
from .types import DTYPES

PLAIN = ("f32", "bf16", "f16")
KV_FORMATS = PLAIN + ("fp8_ds",)
KEY_FORMATS = PLAIN + ("fp8", "mxfp4")


def stored_dtype(fmt: str, default: str) -> str:
    if fmt is None:
        return default
    return fmt if fmt in PLAIN else "u8"


def stored_width(d: int, fmt: str | None, rope_dim: int = 0) -> int:
    """Last-dim size of a buffer holding ``d``-wide rows in ``fmt``."""
    if fmt is None or fmt in PLAIN:
        return d
    if fmt == "fp8_ds":
        return quant.kv_row_bytes(d, rope_dim)
    if fmt == "fp8":
        return quant.index_key_bytes(d, "fp8")
    if fmt == "mxfp4":
        return quant.index_key_bytes(d, "fp4")
    raise GraphError(f"unknown cache format {fmt!r}")


def encode(x: torch.Tensor, fmt: str | None, rope_dim: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows as the buffer stores them (``dtype``: the buffer's dtype for plain formats)."""
    if fmt is None or fmt in PLAIN:
        return x.to(DTYPES[fmt] if fmt else dtype or x.dtype)
    if fmt == "fp8_ds":
        return quant.quantize_kv_rows(x, rope_dim)
    if fmt == "fp8":
        return quant.quantize_index_fp8(x)
    if fmt == "mxfp4":
        return quant.quantize_index_fp4(quant.hadamard(x.float()))
    raise GraphError(f"unknown cache format {fmt!r}")


def decode(stored: torch.Tensor, fmt: str | None, d: int, rope_dim: int = 0) -> torch.Tensor:
    """Rows in fp32 from a buffer slice (for mxfp4: still in the Hadamard basis)."""
    if fmt is None or fmt in PLAIN:
        return stored.float()
    if fmt == "fp8_ds":
        return quant.dequantize_kv_rows(stored, d, rope_dim)
    if fmt == "fp8":
        return quant.dequantize_index_fp8(stored, d)
    if fmt == "mxfp4":
        return quant.dequantize_index_fp4(stored, d)
    raise GraphError(f"unknown cache format {fmt!r}")


def round_trip(x: torch.Tensor, fmt: str | None, rope_dim: int = 0) -> torch.Tensor:
    """What a row reads back as once stored: the current chunk sees what later steps will see."""
    if fmt is None:
        return x
    return decode(encode(x, fmt, rope_dim), fmt, x.shape[-1], rope_dim).to(x.dtype)
