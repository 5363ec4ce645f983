"""Kernel templates, one module per family. Each module is self-contained (torch + triton only):
``v4c/codegen/emit.py`` renders it into the artifact, and the runtime imports that copy.

Contract of a template module:

    KERNELS: dict[str, callable]   IR op name -> launcher
    META: dict[str, dict]          op -> {meta-parameter: tuple of candidate values}
    DEFAULT_META: dict[str, dict]  op -> the values used when nothing was tuned
    def constraints(op, meta, shapes) -> str | None   reason a meta choice cannot run, or None

A launcher is called exactly like the op's PyTorch reference (same tensors, same
attributes as keywords) plus ``meta=`` (a dict), and returns what the reference returns;
for ops that update states it updates them in place and returns them.
"""
