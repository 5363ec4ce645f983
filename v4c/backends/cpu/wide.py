"""A bf16 (or fp16) prefill's products in fp32: the weight widened per call, the result rounded back.

On CPUs without AVX512-BF16 / AMX, PyTorch's bf16 GEMM runs at the speed of a small-M product (~16
GFLOP/s on two AVX2 cores, whatever the number of rows), while the fp32 GEMM reaches ~95: widening a
[N, K] weight costs one pass over it, paid back once a call has about ten rows (measured on this
machine: 1.6x at 16 rows, 6x at 256). The arithmetic is the bf16 GEMM's own (bf16 inputs, fp32
sums, one rounding of the result); only the order of the sums differs.

fp16 the same way: without AVX512-FP16 / AMX-FP16 PyTorch's fp16 GEMM ran at 12-20 GFLOP/s on the Zen 4
(AVX512-BF16, no fp16 arithmetic) at 8 and 512 rows, against 72 for fp32 in the same (busy) run.

The registry binds these to prefill calls (more than ``DECODE_TOKENS`` rows) whose activations and
weights are both bf16 (fp16), on CPUs without bf16 (fp16) arithmetic (``native_half``; where there is
some, PyTorch's GEMM is the fast one: bf16 418 against 175 GFLOP/s fp32 on the AVX512-BF16 machine of
an earlier run). A product widens only with ``WIDE_ROWS`` rows or more (a routed expert's share of a
chunk can be a few rows; a prefill's LM head may run on its last tokens only).
"""
from __future__ import annotations

import functools
import platform

import torch
import torch.nn.functional as F

from ...graph.ops.core import reshape

BF16, F16 = torch.bfloat16, torch.float16
HALVES = (BF16, F16)
WIDE_ROWS = 12  # below this the widening costs more than the bf16 product saves


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset:
    """The CPU's feature flags as Linux reports them (none elsewhere: widening is still exact, only perhaps
    not faster)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return frozenset()
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return frozenset(flags)


def _first_flag(arm: tuple, x86: tuple) -> str | None:
    names = arm if platform.machine().lower() in ("aarch64", "arm64") else x86
    return next((f for f in names if f in _cpu_flags()), None)


def native_bf16() -> str | None:
    """The CPU feature that gives PyTorch's bf16 GEMM its own arithmetic, if this CPU reports one."""
    return _first_flag(("bf16",), ("amx_bf16", "avx512_bf16"))


def native_f16() -> str | None:
    """The CPU feature that gives PyTorch's fp16 GEMM its own arithmetic, if this CPU reports one (F16C only
    converts)."""
    return _first_flag(("asimdhp",), ("amx_fp16", "avx512_fp16"))


def native_half(dtype: torch.dtype) -> str | None:
    """``native_bf16`` / ``native_f16`` for a 16-bit float dtype (None for others)."""
    return native_bf16() if dtype == BF16 else native_f16() if dtype == F16 else None


def linear(x, w):
    """``x @ w.T``: in fp32 for bf16 (fp16) operands, else as given."""
    if x.dtype in HALVES and w.dtype == x.dtype and x.numel() >= WIDE_ROWS * x.shape[-1]:
        return F.linear(x.float(), w.float()).to(x.dtype)
    return F.linear(x, w.to(x.dtype))


def o_proj(o, wa, wb, *, shape, groups, out_shape):
    """The grouped low-rank product and the dense one, both widened."""
    x = reshape(o, shape)
    wg = wa.view(groups, -1, wa.shape[1])
    z = torch.einsum("btgk,grk->btgr", x.float(), wg.float()).to(x.dtype)
    return linear(reshape(z, out_shape), wb)


def linear_rms_norm(x, w, norm_w, *, eps):
    y = F.linear(x.float(), w.float())  # the norm reads the fp32 product rounded as the reference's
    y = y.to(x.dtype).float()
    return F.rms_norm(y, (y.shape[-1],), norm_w.float(), eps).to(x.dtype)


def expert_mm(x, wt, out):
    """``out = x @ wt`` for one routed expert's rows (``wt`` a transposed view), widened when it pays."""
    if x.dtype in HALVES and x.shape[0] >= WIDE_ROWS:
        out.copy_(torch.mm(x.float(), wt.float()))
    else:
        torch.mm(x, wt, out=out)
