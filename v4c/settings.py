"""Every environment knob v4c reads, in one place.

V4C_CACHE_DIR     where the tuning store lives (default ~/.cache/v4c)
V4C_DIST_TIMEOUT  seconds a torch.distributed collective (and forming the process group) may wait
                  for a peer before it is an error (default 300)
V4C_NATIVE        0 turns off the torch backend's small C helpers (mHC mixes, projection epilogue,
                  attention, decode MoE), which are otherwise compiled on first use with the
                  machine's C compiler
V4C_NUM_THREADS   CPU threads for the torch backend (default: one per physical core, torch's own
                  choice; set it when other work shares the machine)
V4C_MALLOC_KEEP_MB
                  MiB of freed memory glibc's allocator keeps for reuse once a model is loaded on
                  the CPU (default 1024; 0 leaves glibc's defaults): a long prefill's activations
                  are tens of MB each, which glibc would otherwise map fresh and fault in, page by
                  page, on every call
TRITON_INTERPRET  Triton kernels run on a CPU only under Triton's interpreter, which Triton reads
                  once, when triton itself is imported. The ``v4c`` command sets it at start on
                  a machine without CUDA; importing v4c or loading a model never writes the
                  environment: a Python program that runs kernels on the CPU (backend "triton",
                  ``v4c.autotune.tune``) sets it before importing triton, and is told so otherwise.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.path.expanduser(os.environ.get("V4C_CACHE_DIR") or "~/.cache/v4c"))


def dist_timeout() -> float:
    return float(os.environ.get("V4C_DIST_TIMEOUT") or 300)


def native_enabled() -> bool:
    return os.environ.get("V4C_NATIVE", "1") != "0"


def configure_threads() -> None:
    """Apply V4C_NUM_THREADS, if set, to torch's intra-op pool (the CPU backend's GEMMs and reductions)."""
    n = os.environ.get("V4C_NUM_THREADS")
    if not n:
        return
    try:
        threads = int(n)
    except ValueError:
        raise ValueError(f"V4C_NUM_THREADS must be a positive integer, got {n!r}") from None
    if threads < 1:
        raise ValueError(f"V4C_NUM_THREADS must be a positive integer, got {n!r}")
    import torch
    torch.set_num_threads(threads)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def malloc_keep_mb() -> int:
    n = os.environ.get("V4C_MALLOC_KEEP_MB")
    if n is None or n == "":
        return 1024
    try:
        mb = int(n)
    except ValueError:
        raise ValueError(f"V4C_MALLOC_KEEP_MB must be a whole number of MiB (0 to turn it off), got {n!r}") from None
    if not 0 <= mb <= 2047:
        raise ValueError(f"V4C_MALLOC_KEEP_MB must be between 0 and 2047, got {n!r}")
    return mb


def glibc_mallopt():
    """glibc's ``mallopt`` (int, int) -> int, or None on another C library or system."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # glibc's knobs only
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


@functools.lru_cache(maxsize=None)  # once per process (a bad setting raises, and is read again next time)
def configure_malloc() -> int:
    """On glibc: serve allocations below V4C_MALLOC_KEEP_MB from the heap and keep that much freed
    memory there. glibc maps every block over its threshold (at most 32 MiB) fresh and unmaps it on
    free, so each call of a 4,096-token prefill faulted its activations in again (the mHC mix of the
    478m model: 33 -> 17-20 ms a call). Returns the MiB kept (0: not applied)."""
    mb = malloc_keep_mb()
    mallopt = glibc_mallopt() if mb else None
    if mallopt is None:
        return 0
    size = mb << 20
    # the threshold first: setting either fixes both (glibc stops moving them), and a refused
    # threshold (older glibc caps it at 32 MiB) leaves the trim threshold alone
    if mallopt(_M_MMAP_THRESHOLD, size) != 1 or mallopt(_M_TRIM_THRESHOLD, size) != 1:
        return 0
    return mb


def configure_triton() -> None:
    """Use Triton's interpreter where no CUDA device exists (unless the user said otherwise); called by
    the ``v4c`` command at start, never on import."""
    if "TRITON_INTERPRET" in os.environ or "triton" in sys.modules:
        return
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_mode(device_type: str) -> None:
    """Kernels run on the CPU only through the interpreter, which must have been on when triton
    was first imported; say so clearly instead of failing inside a kernel."""
    if device_type != "cpu":
        return
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(getattr(tl, "cdiv", None), InterpretedFunction):
        raise RuntimeError("Triton kernels on the CPU need its interpreter: set TRITON_INTERPRET=1 in the "
                           "environment before triton is imported (the v4c command does), or use backend 'cpu'")
