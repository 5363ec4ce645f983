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
_HALF = (torch.bfloat16, torch.float16)


@contextmanager
def few_row_gemms(rows: int):
    """Within the block, products run on ATen's kernels when ``rows`` (tokens in the call) is small."""
    on = torch.backends.mkldnn.is_available() and torch._C._get_mkldnn_enabled()
    if not on or rows > FEW_ROWS:
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear`` with the kernel picked by the number of rows of ``x``."""
    if x.dtype not in _HALF or x.numel() > FEW_ROWS * x.shape[-1] or not torch._C._get_mkldnn_enabled():
        return F.linear(x, w)
    torch._C._set_mkldnn_enabled(False)
    try:
        return F.linear(x, w)
    finally:
        torch._C._set_mkldnn_enabled(True)
