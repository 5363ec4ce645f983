"""Which CPU GEMM kernel a small product takes.

For a bf16 product of one to three rows (a decode step's GEMVs) ATen's own kernel streams the weight
at about 3x oneDNN's rate on the machines measured (28 vs 9 GB/s, 2-core EPYC, weights in DRAM);
from four rows on, oneDNN is as fast or faster. Both round the fp32 sums once to bf16, so the
choice changes speed, not results. The switch is torch's global oneDNN flag, set only around
the call (or the decode step) and restored after.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

FEW_ROWS = 3  # up to here ATen's kernel wins for half precision (2 threads: 82 vs 102 us at 3 rows; equal at 4)
HALF = (torch.bfloat16, torch.float16)


def onednn_on() -> bool:
    return torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()


@contextmanager
def aten_kernels():
    """Within the block, products run on ATen's own kernels (oneDNN off, restored after)."""
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


@contextmanager
def few_row_gemms(rows: int):
    """Within the block, products run on ATen's kernels when ``rows`` (tokens in the call) is small."""
    if rows > FEW_ROWS or not onednn_on():
        yield
        return
    with aten_kernels():
        yield


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear`` with the kernel picked by the number of rows of ``x``."""
    if x.dtype not in HALF or x.numel() > FEW_ROWS * x.shape[-1] or not onednn_on():
        return F.linear(x, w)
    with aten_kernels():
        return F.linear(x, w)
