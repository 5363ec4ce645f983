"""Imports an artifact's kernel modules, each only after its bytes match the manifest."""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

from ..autotune.agree import agree
from ..errors import ArtifactError
from ..graph.registry import get_op
from ..settings import check_triton_mode


def _import_verified(path: Path, digest: str, name: str):
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:  # checked again right before executing it
        raise ArtifactError(f"{path}: kernel source does not match its manifest hash; refusing to import it")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_modules(root: Path, entry: dict, device_type: str) -> dict:
    """Template family -> the artifact's rendered kernel module, imported after its hash check."""
    if device_type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the modules' @triton.jit run, i.e. at import
    try:
        import triton  # noqa: F401
    except ImportError:
        raise ArtifactError("backend 'triton' needs the triton package (pip install triton)") from None
    try:
        check_triton_mode(device_type)
    except RuntimeError as e:
        raise ArtifactError(str(e)) from None
    modules = {}
    for fam, m in entry.get("modules", {}).items():
        modules[fam] = _import_verified(root / m["file"], m["sha256"], f"v4c_kernels_{fam}_{m['sha256'][:12]}")
    return modules


def load_kernels(root: Path, entry: dict, device_type: str) -> dict[str, Callable]:
    """IR op -> callable with the op reference's signature, running the artifact's Triton kernel
    (its ``qgemm`` variant, or its reference where the manifest says so, for calls on quantised weights)."""
    modules = load_modules(root, entry, device_type)
    ops = entry.get("ops", {})
    quant = {op: spec["quantized"] for op, spec in ops.items() if spec.get("quantized")}
    # under torch.distributed every rank takes rank 0's configs, so no two ranks run different kernels
    metas = agree({**{op: spec["meta"] for op, spec in ops.items()},
                   **{f"{op}:quantized": q["meta"] for op, q in quant.items() if q.get("module")}},
                  "cuda" if device_type == "cuda" else "cpu")
    impls = {}
    for op, spec in ops.items():
        impls[op] = _bind(modules[spec["module"]].KERNELS[op], metas[op])
        if op in quant:  # calls on quantised weights: the qgemm launcher, or the op's reference
            q = quant[op]
            qf = _bind(modules[q["module"]].QUANTIZED[op][0], metas[f"{op}:quantized"]) if q.get("module") \
                else get_op(op).ref
            impls[op] = _by_weights(impls[op], qf)
    return impls


def _bind(launcher: Callable, meta: dict) -> Callable:
    meta = dict(meta)
    return lambda *args, **attrs: launcher(*args, meta=meta, **attrs)


def _by_weights(plain: Callable, quantized: Callable) -> Callable:
    """One op kind, two kinds of call: those passing a quantised weight (anything with ``fmt``,
    i.e. a ``QuantizedWeight``) go to ``quantized``, the others to ``plain``."""
    def call(*args, **attrs):
        return (quantized if any(hasattr(a, "fmt") for a in args) else plain)(*args, **attrs)
    return call
