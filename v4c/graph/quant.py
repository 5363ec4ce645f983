"""Byte-exact KV-cache storage formats used by production V4 decoders, written as plain torch functions.

Every function here works on tensors of shape ``[..., d]`` (any number of leading dims, any device), is
vectorised over rows, and is deterministic. Packed rows are ``torch.uint8`` tensors whose last dim is the
row size in bytes; multi-byte fields are always written little-endian, independent of the host.

Power-of-two scales
    All formats scale a group of values by ``s = 2**e``, the smallest power of two with
    ``s >= amax / qmax`` (``qmax`` = 448 for FP8 e4m3, 6 for FP4 e2m1), so ``|x / s| <= qmax`` and
    the division is exact. A group whose amax is 0 uses ``s = 1``. The exponent is kept within the
    UE8M0 range ``[-127, 127]``; a UE8M0 byte is just the biased exponent ``e + 127`` (255 means NaN).

Attention KV rows ("fp8_ds_mla", V4 variant)
    A row of ``d`` values is split into ``n = d - r`` leading "nope" dims and ``r`` trailing RoPE dims.
    The nope dims are cut into blocks of ``block`` values, each with its own UE8M0 scale. The packed
    row holds, in order: ``n`` bytes of e4m3 codes (nope values divided by their block scale), ``2*r``
    bytes of the RoPE values as bf16, ``n // block`` scale bytes, then zero padding up to a multiple
    of 8 bytes. For V4 (d=512, r=64, block=64): 448 + 128 + 7 + 1 = 584 bytes. The default block is
    ``gcd(64, n)``: 64 for real models, smaller for tiny test models whose ``n`` is not a multiple of 64.

Indexer keys
    * FP8: ``D`` e4m3 codes followed by one float32 scale for the whole row (132 bytes for D=128).
    * MXFP4: ``D/2`` bytes of e2m1 codes, two per byte (even element in the low nibble, odd element
      in the high nibble; a nibble is ``sign << 3 | magnitude code``, magnitude codes 0..7 standing
      for 0, 0.5, 1, 1.5, 2, 3, 4, 6), followed by ``D/32`` UE8M0 scale bytes, one per 32 values
      (68 bytes for D=128). Rounding onto the e2m1 grid is round-to-nearest, ties to the even code.
      The sign bit copies the sign bit of the input (as FP8 casts do), so small negatives become -0.

``hadamard`` is the orthonormal Walsh-Hadamard transform (Sylvester order), which the FP4 indexer path
applies to indexer queries and keys before quantising them.

Inputs are converted to float32 before quantising; non-finite inputs raise ``ValueError``.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "E4M3_MAX", "E2M1_MAX", "E2M1_VALUES",
    "kv_block", "kv_row_bytes", "index_key_bytes",
    "e4m3_pow2_scale", "e2m1_pow2_scale",
    "quantize_kv_rows", "dequantize_kv_rows",
    "quantize_index_fp8", "dequantize_index_fp8",
    "quantize_index_fp4", "dequantize_index_fp4",
    "hadamard",
]

E4M3_MAX = 448.0
E2M1_MAX = 6.0
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # magnitude code -> value
_UE8M0_BIAS = 127
_INDEX_FP4_BLOCK = 32


# ----------------------------------------------------------------------------------------------- sizes

def _check_pos_int(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")


def kv_block(d: int, rope_dim: int) -> int:
    """Default nope block size for a ``d``-dim KV row with ``rope_dim`` RoPE dims: ``gcd(64, d - rope_dim)``."""
    _check_pos_int("d", d)
    _check_pos_int("rope_dim", rope_dim)
    n = d - rope_dim
    if n < 0:
        raise ValueError(f"rope_dim={rope_dim} exceeds row dim d={d}")
    return math.gcd(64, n)


def _resolve_block(d, rope_dim, block):
    default = kv_block(d, rope_dim)
    if block is None:
        return default
    n = d - rope_dim
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0 or n % block:
        raise ValueError(f"block={block!r} must be a positive int dividing the {n} nope dims")
    return block


def kv_row_bytes(d: int, rope_dim: int, block: int | None = None) -> int:
    """Bytes per packed KV row: ``round_up(n + 2*r + n//block, 8)`` with ``n = d - r`` (584 for V4)."""
    block = _resolve_block(d, rope_dim, block)
    n = d - rope_dim
    raw = n + 2 * rope_dim + n // block
    return (raw + 7) // 8 * 8


def index_key_bytes(d: int, fmt: str) -> int:
    """Bytes per indexer key of dim ``d`` stored as ``fmt`` in {"bf16", "fp8", "fp4", "f32"}."""
    _check_pos_int("d", d)
    if fmt == "bf16":
        return 2 * d
    if fmt == "f32":
        return 4 * d
    if fmt == "fp8":
        return d + 4
    if fmt == "fp4":
        if d % _INDEX_FP4_BLOCK:
            raise ValueError(f"fp4 indexer keys need a dim divisible by {_INDEX_FP4_BLOCK}, got {d}")
        return d // 2 + d // _INDEX_FP4_BLOCK
    raise ValueError(f"unknown indexer key format {fmt!r} (expected bf16, fp8, fp4 or f32)")


# ----------------------------------------------------------------------------------------------- helpers

def _as_f32(x, what):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if not (x.is_floating_point()):
        raise ValueError(f"{what} must be a floating-point tensor, got {x.dtype}")
    x = x.to(torch.float32)
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contains inf or nan (after conversion to float32)")
    return x


def _check_packed(packed, nbytes, what):
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise ValueError(f"{what} must be a torch.uint8 tensor")
    if packed.dim() < 1 or packed.shape[-1] != nbytes:
        raise ValueError(f"{what} must have last dim {nbytes}, got shape {tuple(packed.shape)}")


def _pow2_from_exponent(e):
    """float32 ``2**e`` for int32 ``e`` in [-127, 127], built from the bit pattern (exact on every device)."""
    biased = (e + _UE8M0_BIAS).to(torch.int32)
    bits = torch.where(biased > 0, biased << 23, torch.full_like(biased, 1 << 22))  # 2^-127 is subnormal
    return bits.view(torch.float32)


def _pow2_f64(e):
    """float64 ``2**e`` for int64 ``e`` well inside float64's normal range, built from the bit pattern."""
    return ((e + 1023) << 52).view(torch.float64)


def _pow2_scale(amax, qmax):
    """Smallest ``2**e >= amax / qmax`` (1 where amax == 0), clamped to UE8M0's range; returns (scale, byte)."""
    if not isinstance(amax, torch.Tensor):
        amax = torch.as_tensor(amax, dtype=torch.float32)
    if not amax.is_floating_point():
        amax = amax.to(torch.float32)
    a = amax.to(torch.float32)
    if a.numel() and (not bool(torch.isfinite(a).all()) or bool((a < 0).any())):
        raise ValueError("amax must be finite and non-negative")
    # Candidate from frexp of the float64 quotient (the quotient of a float32 by qmax is never rounded onto
    # a power of two unless it is one), then one exact correction step each way against qmax * 2**e.
    mant, ex = torch.frexp(a.to(torch.float64) / qmax)  # q = mant * 2**ex, mant in [0.5, 1)
    e = torch.where(mant == 0.5, ex - 1, ex).to(torch.int64)
    e = torch.where(a == 0, torch.zeros_like(e), e)
    e = e.clamp(-_UE8M0_BIAS, _UE8M0_BIAS)
    a64 = a.to(torch.float64)
    e = torch.where((a64 > qmax * _pow2_f64(e)) & (e < _UE8M0_BIAS), e + 1, e)
    lower = (a64 <= qmax * _pow2_f64(e - 1)) & (e > -_UE8M0_BIAS) & (a > 0)
    e = torch.where(lower, e - 1, e)
    e = e.to(torch.int32)
    return _pow2_from_exponent(e), (e + _UE8M0_BIAS).to(torch.uint8)


def e4m3_pow2_scale(amax):
    """(float32 scale, uint8 UE8M0 byte): smallest power of two ``s >= amax / 448``; 1 for amax == 0."""
    return _pow2_scale(amax, E4M3_MAX)


def e2m1_pow2_scale(amax):
    """(float32 scale, uint8 UE8M0 byte): smallest power of two ``s >= amax / 6``; 1 for amax == 0."""
    return _pow2_scale(amax, E2M1_MAX)


def _ue8m0_decode(b):
    """float32 ``2**(b - 127)`` for uint8 UE8M0 bytes; byte 255 decodes to NaN."""
    b = b.to(torch.int32)
    bits = torch.where(b > 0, b << 23, torch.full_like(b, 1 << 22))
    bits = torch.where(b == 255, torch.full_like(b, 0x7FC00000), bits)
    return bits.view(torch.float32)


def _to_e4m3_bytes(y):
    """float32 (already scaled, |y| <= 448) -> uint8 e4m3fn codes, round-to-nearest-even."""
    return y.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)


def _from_e4m3_bytes(b):
    return b.contiguous().view(torch.float8_e4m3fn).to(torch.float32)


def _le_bytes(bits, nbytes):
    """int32 bit patterns [...] -> uint8 [..., nbytes], little-endian."""
    bits = bits.to(torch.int64) & ((1 << (8 * nbytes)) - 1)
    shifts = torch.arange(0, 8 * nbytes, 8, device=bits.device, dtype=torch.int64)
    return ((bits.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


def _from_le_bytes(b, signed_bits):
    """uint8 [..., k] little-endian -> int64 [...] interpreted as a signed ``signed_bits``-bit integer."""
    k = b.shape[-1]
    shifts = torch.arange(0, 8 * k, 8, device=b.device, dtype=torch.int64)
    v = (b.to(torch.int64) << shifts).sum(-1)
    return torch.where(v >= (1 << (signed_bits - 1)), v - (1 << signed_bits), v)


def _block_amax(x, block):
    shape = x.shape[:-1] + (x.shape[-1] // block, block)
    xb = x.reshape(shape)
    return xb, xb.abs().amax(dim=-1)


# ----------------------------------------------------------------------------------------------- KV rows

def quantize_kv_rows(x: torch.Tensor, rope_dim: int, block: int | None = None) -> torch.Tensor:
    """Pack ``[..., d]`` KV rows into the fp8_ds_mla V4 layout: ``uint8 [..., kv_row_bytes(d, rope_dim, block)]``."""
    x = _as_f32(x, "KV rows")
    if x.dim() < 1:
        raise ValueError("KV rows need at least one dim")
    d = x.shape[-1]
    block = _resolve_block(d, rope_dim, block)
    n = d - rope_dim
    nblk = n // block
    nope, rope = x[..., :n], x[..., n:]
    parts = []
    if n:
        xb, amax = _block_amax(nope, block)
        scale, sbyte = e4m3_pow2_scale(amax)
        codes = _to_e4m3_bytes(xb / scale.unsqueeze(-1)).reshape(nope.shape)
        parts.append(codes)
    rope_bits = rope.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    parts.append(_le_bytes(rope_bits, 2).reshape(rope.shape[:-1] + (2 * rope_dim,)))
    if n:
        parts.append(sbyte)
    total = kv_row_bytes(d, rope_dim, block)
    pad = total - (n + 2 * rope_dim + nblk)
    if pad:
        parts.append(torch.zeros(x.shape[:-1] + (pad,), dtype=torch.uint8, device=x.device))
    return torch.cat(parts, dim=-1)


def dequantize_kv_rows(packed: torch.Tensor, d: int, rope_dim: int, block: int | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack fp8_ds_mla V4 rows back to ``[..., d]`` values (RoPE dims come back bf16-rounded)."""
    block = _resolve_block(d, rope_dim, block)
    _check_packed(packed, kv_row_bytes(d, rope_dim, block), "packed KV rows")
    n = d - rope_dim
    nblk = n // block
    lead = packed.shape[:-1]
    out = []
    if n:
        codes = _from_e4m3_bytes(packed[..., :n]).reshape(lead + (nblk, block))
        scale = _ue8m0_decode(packed[..., n + 2 * rope_dim:n + 2 * rope_dim + nblk])
        out.append((codes * scale.unsqueeze(-1)).reshape(lead + (n,)))
    rb = packed[..., n:n + 2 * rope_dim].reshape(lead + (rope_dim, 2))
    rope = _from_le_bytes(rb, 16).to(torch.int16).view(torch.bfloat16).to(torch.float32)
    out.append(rope)
    return torch.cat(out, dim=-1).to(dtype)


# ----------------------------------------------------------------------------------------------- indexer FP8

def quantize_index_fp8(x: torch.Tensor) -> torch.Tensor:
    """Indexer keys ``[..., D]`` -> ``uint8 [..., D + 4]``: e4m3 codes, then one float32 pow2 scale (LE)."""
    x = _as_f32(x, "indexer keys")
    if x.dim() < 1:
        raise ValueError("indexer keys need at least one dim")
    scale, _ = e4m3_pow2_scale(x.abs().amax(dim=-1))
    codes = _to_e4m3_bytes(x / scale.unsqueeze(-1))
    sb = _le_bytes(scale.view(torch.int32), 4)
    return torch.cat([codes, sb], dim=-1)


def dequantize_index_fp8(packed: torch.Tensor, D: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [..., D + 4]`` -> ``[..., D]`` (e4m3 value times the stored float32 scale)."""
    _check_packed(packed, index_key_bytes(D, "fp8"), "packed FP8 indexer keys")
    codes = _from_e4m3_bytes(packed[..., :D])
    scale = _from_le_bytes(packed[..., D:], 32).to(torch.int32).view(torch.float32)
    return (codes * scale.unsqueeze(-1)).to(dtype)


# ----------------------------------------------------------------------------------------------- indexer MXFP4

# Thresholds between consecutive e2m1 magnitudes; a tie goes to the even code, so the comparison is strict
# when the lower code is even and inclusive when it is odd.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _e2m1_codes(y):
    """float32 (already scaled) -> uint8 nibbles ``sign << 3 | magnitude code``, RNE on the e2m1 grid."""
    a = y.abs()
    code = torch.zeros(y.shape, dtype=torch.uint8, device=y.device)
    for k, t in enumerate(_E2M1_MIDPOINTS):
        step = (a > t) if k % 2 == 0 else (a >= t)
        code += step.to(torch.uint8)
    sign = torch.signbit(y).to(torch.uint8) << 3
    return code | sign


def quantize_index_fp4(x: torch.Tensor) -> torch.Tensor:
    """Indexer keys ``[..., D]`` -> ``uint8 [..., D//2 + D//32]``: packed e2m1 pairs, then UE8M0 block scales."""
    x = _as_f32(x, "indexer keys")
    if x.dim() < 1:
        raise ValueError("indexer keys need at least one dim")
    D = x.shape[-1]
    index_key_bytes(D, "fp4")  # validates D
    xb, amax = _block_amax(x, _INDEX_FP4_BLOCK)
    scale, sbyte = e2m1_pow2_scale(amax)
    nib = _e2m1_codes(xb / scale.unsqueeze(-1)).reshape(x.shape[:-1] + (D // 2, 2))
    packed = nib[..., 0] | (nib[..., 1] << 4)
    return torch.cat([packed, sbyte], dim=-1)


def dequantize_index_fp4(packed: torch.Tensor, D: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8 [..., D//2 + D//32]`` -> ``[..., D]``."""
    _check_packed(packed, index_key_bytes(D, "fp4"), "packed FP4 indexer keys")
    lead = packed.shape[:-1]
    pb = packed[..., :D // 2]
    nib = torch.stack([pb & 0x0F, pb >> 4], dim=-1).reshape(lead + (D,)).to(torch.int64)
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=packed.device)
    vals = table[nib].reshape(lead + (D // _INDEX_FP4_BLOCK, _INDEX_FP4_BLOCK))
    scale = _ue8m0_decode(packed[..., D // 2:])
    return (vals * scale.unsqueeze(-1)).reshape(lead + (D,)).to(dtype)


# ----------------------------------------------------------------------------------------------- Hadamard

def hadamard(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along ``dim`` (size a power of two), Sylvester order.

    Equal to ``x @ H / sqrt(size)`` with ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``; orthogonal and
    its own inverse. Half-precision inputs are transformed in float32 and cast back.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError("hadamard needs a floating-point tensor")
    if x.dim() == 0:
        raise ValueError("hadamard needs at least one dim")
    size = x.shape[dim]
    if size < 1 or size & (size - 1):
        raise ValueError(f"hadamard size must be a power of two, got {size}")
    orig = x.dtype
    work = x if orig in (torch.float32, torch.float64) else x.to(torch.float32)
    y = work.movedim(dim, -1).contiguous()
    lead = y.shape[:-1]
    h = 1
    while h < size:
        y = y.reshape(lead + (size // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2)
        h *= 2
    y = y.reshape(lead + (size,)) * (size ** -0.5)
    return y.movedim(-1, dim).to(orig)
