"""The official release's quantised weight formats: encode, decode, and what each format stores.

This module is the single source of truth for these formats; the loader, the reference runtime,
the kernels' tests and the test suite's checkpoint writer all use it.

FP8 block-scaled weights (IR dtype ``f8e4m3``)
    Data ``float8_e4m3fn [N, K]`` (safetensors ``F8_E4M3``), scale ``float8_e8m0fnu``
    (``F8_E8M0``) ``[ceil(N/128), ceil(K/128)]``: value = data * 2^(e - 127) per 128x128 block.
    The official names store the scale as ``X.scale``; checkpoints converted by transformers
    as ``X.weight_scale_inv`` (same contents despite the name).

MXFP4 routed-expert weights (IR dtype ``mxfp4``)
    Data ``int8 [..., N, K/2]`` (safetensors ``I8``): two e2m1 codes per byte along K, element 2j
    in the low nibble, 2j+1 in the high nibble; a code is ``sign << 3 | magnitude code`` with
    magnitudes [0, 0.5, 1, 1.5, 2, 3, 4, 6]. Scale ``F8_E8M0 [..., N, K/32]``: value = fp4 * 2^(e - 127).

Scales
    A block's scale is the smallest power of two ``s >= amax / qmax`` (qmax 448 for e4m3, 6 for
    e2m1), so the division is exact and nothing saturates; an all-zero block gets ``s = 1``.
    Activations (quantised dynamically before FP8/FP4 GEMMs, per 1x128 block along K, as the
    official inference does) first clamp amax to ``ACT_AMAX_MIN``.

Rounding onto e4m3 is torch's round-to-nearest-even cast; onto e2m1 round-to-nearest, ties to the
even code (``v4c.graph.quant``, shared with the FP4 indexer cache). Decoding is exact: every
decoded value is a code times a power of two, representable in float32 (and in bf16).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quant import E2M1_VALUES, _e2m1_codes, _ue8m0_decode, e2m1_pow2_scale, e4m3_pow2_scale

__all__ = [
    "FP8_BLOCK", "MXFP4_BLOCK", "ACT_BLOCK", "ACT_AMAX_MIN", "E8M0", "WeightFormat", "FORMATS",
    "quantize_fp8_block", "dequantize_fp8_block", "quantize_mxfp4", "dequantize_mxfp4",
    "quantize_act_fp8", "dequantize_act_fp8", "ue8m0_to_float",
]

FP8_BLOCK = 128
MXFP4_BLOCK = 32
ACT_BLOCK = 128
ACT_AMAX_MIN = 1e-4  # the official act_quant's floor: an all-zero row block still gets a finite scale
E8M0 = torch.float8_e8m0fnu


@dataclass(frozen=True)
class WeightFormat:
    """How a quantised weight of logical shape ``[..., N, K]`` is stored."""

    name: str                 # IR dtype
    storage: torch.dtype      # dtype of the data tensor
    safetensors: str          # safetensors code of the data tensor
    block: tuple[int, int]    # (rows, cols) sharing one scale
    pack: int                 # values per stored element along K

    def storage_shape(self, shape) -> tuple[int, ...]:
        *lead, n, k = shape
        return (*lead, n, k // self.pack)

    def scale_shape(self, shape) -> tuple[int, ...]:
        *lead, n, k = shape
        return (*lead, math.ceil(n / self.block[0]), math.ceil(k / self.block[1]))

    def check_shape(self, shape, what: str = "weight") -> None:
        """ValueError unless a weight of logical ``shape`` can be stored in this format."""
        if len(shape) < 2:
            raise ValueError(f"{what}: a {self.name} weight needs at least 2 dims, got {tuple(shape)}")
        if self.name == "mxfp4" and shape[-1] % MXFP4_BLOCK:
            raise ValueError(f"{what}: mxfp4 needs the input dim to be a multiple of {MXFP4_BLOCK}, "
                             f"got shape {tuple(shape)}")

    def nbytes(self, shape) -> int:
        """Bytes of data plus scales."""
        return math.prod(self.storage_shape(shape)) * self.storage.itemsize + math.prod(self.scale_shape(shape))


FORMATS = {
    "f8e4m3": WeightFormat("f8e4m3", torch.float8_e4m3fn, "F8_E4M3", (FP8_BLOCK, FP8_BLOCK), 1),
    "mxfp4": WeightFormat("mxfp4", torch.int8, "I8", (1, MXFP4_BLOCK), 2),
}


# ---- helpers -----------------------------------------------------------------------------------

def _float_input(w: torch.Tensor, what: str, min_dim: int) -> torch.Tensor:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() < min_dim:
        raise ValueError(f"{what} needs at least {min_dim} dims, got shape {tuple(w.shape)}")
    w = w.detach().to(torch.float32)
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what} contains inf or nan")
    return w


def _scale_bytes(scale: torch.Tensor, what: str) -> torch.Tensor:
    if scale.dtype not in (E8M0, torch.uint8):
        raise ValueError(f"{what} must be float8_e8m0fnu (or its uint8 bytes), got {scale.dtype}")
    return scale.view(torch.uint8)


def ue8m0_to_float(scale: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(e - 127)`` for e8m0 scales (or their uint8 bytes); exact."""
    return _ue8m0_decode(_scale_bytes(scale, "scale"))


def _expect_shape(t: torch.Tensor, shape, what: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{what}: expected shape {tuple(shape)}, got {tuple(t.shape)}")


def _pad_to(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    return F.pad(w, (0, cols - w.shape[-1], 0, rows - w.shape[-2]))


# ---- FP8 128x128 -------------------------------------------------------------------------------

def quantize_fp8_block(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> (data ``float8_e4m3fn [N, K]``, scale ``float8_e8m0fnu [ceil(N/b), ceil(K/b)]``)."""
    w = _float_input(w, "FP8 weight", 2)
    if w.dim() != 2:
        raise ValueError(f"FP8 weight must be 2-D [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = math.ceil(n / block), math.ceil(k / block)
    blocks = _pad_to(w, nb * block, kb * block).view(nb, block, kb, block)  # zero padding never raises amax
    scale, sbyte = e4m3_pow2_scale(blocks.abs().amax(dim=(1, 3)))
    data = (blocks / scale[:, None, :, None]).reshape(nb * block, kb * block)[:n, :k]
    return data.to(torch.float8_e4m3fn).contiguous(), sbyte.view(E8M0)


def dequantize_fp8_block(data: torch.Tensor, scale: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """(``e4m3 [N, K]``, ``e8m0 [ceil(N/b), ceil(K/b)]``) -> float32 ``[N, K]``, exact."""
    if data.dtype != torch.float8_e4m3fn or data.dim() != 2:
        raise ValueError(f"FP8 data must be a 2-D float8_e4m3fn tensor, got {data.dtype} {tuple(data.shape)}")
    n, k = data.shape
    _expect_shape(scale, (math.ceil(n / block), math.ceil(k / block)), f"scale of FP8 weight {tuple(data.shape)}")
    s = ue8m0_to_float(scale).repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :k]
    return data.to(torch.float32) * s


# ---- MXFP4 1x32 --------------------------------------------------------------------------------

def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [..., N, K]`` (K a multiple of 32) -> (packed ``int8 [..., N, K/2]``, scale ``e8m0 [..., N, K/32]``)."""
    w = _float_input(w, "MXFP4 weight", 2)
    k = w.shape[-1]
    if k % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 weight: the input dim must be a multiple of {MXFP4_BLOCK}, got shape {tuple(w.shape)}")
    blocks = w.reshape(*w.shape[:-1], k // MXFP4_BLOCK, MXFP4_BLOCK)
    scale, sbyte = e2m1_pow2_scale(blocks.abs().amax(dim=-1))
    codes = _e2m1_codes(blocks / scale[..., None]).reshape(*w.shape[:-1], k // 2, 2)
    packed = codes[..., 0] | (codes[..., 1] << 4)  # element 2j low nibble, 2j+1 high nibble
    return packed.view(torch.int8).contiguous(), sbyte.view(E8M0)


_E2M1_TABLE = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(``int8 [..., N, K/2]``, ``e8m0 [..., N, K/32]``) -> float32 ``[..., N, K]``, exact."""
    if packed.dtype not in (torch.int8, torch.uint8) or packed.dim() < 2:
        raise ValueError(f"MXFP4 data must be an int8 tensor of at least 2 dims, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    k = 2 * packed.shape[-1]
    if k % MXFP4_BLOCK:
        raise ValueError(f"MXFP4 data {tuple(packed.shape)}: {k} values per row is not a multiple of {MXFP4_BLOCK}")
    _expect_shape(scale, (*packed.shape[:-1], k // MXFP4_BLOCK), f"scale of MXFP4 weight {tuple(packed.shape)}")
    u = packed.view(torch.uint8)
    nib = torch.stack([u & 0x0F, u >> 4], dim=-1).reshape(*packed.shape[:-1], k).long()
    vals = _E2M1_TABLE.to(packed.device)[nib]
    s = ue8m0_to_float(scale).repeat_interleave(MXFP4_BLOCK, dim=-1)
    return vals * s


# ---- activations 1x128 -------------------------------------------------------------------------

def quantize_act_fp8(x: torch.Tensor, block: int = ACT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` -> (``e4m3 [..., K]``, float32 power-of-two scales ``[..., ceil(K/block)]``).

    ``s = 2**ceil(log2(max(amax, 1e-4) / 448))`` per block of ``block`` values along K, ``x_q = x / s``.
    """
    x = _float_input(x, "activation", 1)
    k = x.shape[-1]
    kb = math.ceil(k / block)
    xb = F.pad(x, (0, kb * block - k)).reshape(*x.shape[:-1], kb, block)
    scale, _ = e4m3_pow2_scale(xb.abs().amax(dim=-1).clamp_min(ACT_AMAX_MIN))
    xq = (xb / scale[..., None]).reshape(*x.shape[:-1], kb * block)[..., :k]
    return xq.to(torch.float8_e4m3fn), scale


def dequantize_act_fp8(xq: torch.Tensor, scale: torch.Tensor, block: int = ACT_BLOCK) -> torch.Tensor:
    """Inverse of ``quantize_act_fp8``: float32 ``[..., K]``, exact."""
    k = xq.shape[-1]
    _expect_shape(scale, (*xq.shape[:-1], math.ceil(k / block)), f"scale of activation {tuple(xq.shape)}")
    return xq.to(torch.float32) * scale.repeat_interleave(block, dim=-1)[..., :k]
