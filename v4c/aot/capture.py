"""The kernel launches one call of a launcher makes, found without a GPU.

The launcher runs as the runtime would call it, on ``meta`` tensors (shapes, dtypes and strides,
no memory), while Triton is pointed at a stand-in driver that reports the compilation target and
``JITFunction._do_compile`` records what it would compile instead of compiling it.  Everything
before that point is Triton's own launch path (argument binding, specialisation on alignment and
on ints equal to 1 or divisible by 16, option parsing), so a recorded launch compiles to exactly
the kernel a GPU of that target would build at run time, under the same cache key.

Runs only where Triton's interpreter is off (the AOT worker processes): under the interpreter
``@triton.jit`` makes interpreted functions, which the real compiler cannot take.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..graph.types import DTYPES
from ..graph.weight_formats import FORMATS
from ..graph.weights import QuantizedWeight
from .targets import capability, gpu_target


@dataclass
class Launch:
    """One recorded launch: what ``triton.compile`` needs, and a few facts for the report."""
    fn: Any            # the JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any       # the backend's parsed options
    grid: Any

    @property
    def kernel(self) -> str:
        return self.fn.__name__


class _TargetDriver:
    """Answers the three questions Triton's launch path asks of the driver, for a target with no
    device behind it.  The device id is the architecture number, so each target gets its own
    per-device binder cache in a JITFunction."""

    def __init__(self, target: str):
        self.target = gpu_target(target)
        self.device = self.target.arch

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@contextlib.contextmanager
def recording(target: str, modules):
    """Within: kernel launches are recorded into the yielded list, nothing is compiled or run;
    the modules' launchers see ``target``'s compute capability."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    real_run, real_compile = JITFunction.run, JITFunction._do_compile
    grids: list = []

    def run(self, *args, grid, warmup, **kwargs):
        grids.append(grid)
        return real_run(self, *args, grid=grid, warmup=True, **kwargs)

    def do_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        launches.append(Launch(self, signature, constexprs, attrs, options, grids[-1] if grids else None))
        return None  # the launch path returns before it would run anything

    cap = capability(target)
    saved = [(m, getattr(m, "_TARGET_CAPABILITY", None)) for m in modules]
    saved_driver = driver._active  # reset_active() would create the real driver, which needs a GPU
    driver.set_active(_TargetDriver(target))
    JITFunction.run, JITFunction._do_compile = run, do_compile
    for m in modules:
        m._TARGET_CAPABILITY = cap
    try:
        yield launches
    finally:
        JITFunction.run, JITFunction._do_compile = real_run, real_compile
        driver._active = saved_driver
        for m, v in saved:
            m._TARGET_CAPABILITY = v


def meta_input(spec):
    """A value as the runtime passes it, on the meta device: ``{"dtype", "shape"}`` for a tensor
    (IR dtype names; quantised weights become a ``QuantizedWeight`` of meta data and scales) or None."""
    if spec is None:
        return None
    dtype, shape = spec["dtype"], tuple(spec["shape"])
    if dtype in FORMATS:
        f = FORMATS[dtype]
        return QuantizedWeight(dtype, torch.empty(f.storage_shape(shape), dtype=f.storage, device="meta"),
                               torch.empty(f.scale_shape(shape), dtype=DTYPES["e8m0"], device="meta"))
    return torch.empty(shape, dtype=DTYPES[dtype], device="meta")


def capture(module, task: dict, target: str) -> list[Launch]:
    """The launches of one call: ``task`` names the launcher (``"launcher": [table, op]`` with table
    ``KERNELS`` or ``QUANTIZED``), its inputs (``meta_input`` specs), attributes and meta."""
    table, op = task["launcher"]
    fn = getattr(module, table)[op]
    if table == "QUANTIZED":
        fn = fn[0]
    args = [meta_input(s) for s in task["inputs"]]
    while args and args[-1] is None:  # trailing optional inputs the node does not pass
        args.pop()
    with recording(target, [module]) as launches:
        fn(*args, meta=dict(task["meta"]), **task["attrs"])
    return launches
