"""GPU compilation targets as Triton's compiler names them, and the limits a launch must fit."""
from __future__ import annotations

from ..autotune.devices import device_for_target

GPU_TARGETS = ("sm80", "sm86", "sm89", "sm90", "sm100", "sm120")
MAX_REGISTERS = 255  # per thread, every target


def capability(target: str) -> tuple[int, int]:
    """``"sm90"`` -> ``(9, 0)``, ``"sm100"`` -> ``(10, 0)``."""
    if target not in GPU_TARGETS:
        raise ValueError(f"unknown GPU target {target!r}; choose one of {', '.join(GPU_TARGETS)}")
    n = int(target[2:])
    return n // 10, n % 10


def gpu_target(target: str):
    """Triton's ``GPUTarget`` for ``target`` (CUDA, 32-thread warps)."""
    from triton.backends.compiler import GPUTarget
    major, minor = capability(target)
    return GPUTarget("cuda", major * 10 + minor, 32)


def shared_memory_limit(target: str) -> int:
    """Bytes of shared memory one block may use (the opt-in maximum)."""
    capability(target)
    return device_for_target(target).smem_per_block
