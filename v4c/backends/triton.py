"""Imports an artifact's kernel modules, each only after its bytes match the manifest."""
from __future__ import annotations

import hashlib
import linecache
import sys
import types
from pathlib import Path
from typing import Callable

from ..artifact.manifest import aot_binaries, read_kernel_module
from ..artifact.shapes import parse_bucket, pick_bucket
from ..collective import agree
from ..errors import ArtifactError
from ..graph.registry import get_op
from ..settings import check_triton_mode
from . import Backend, Call
from .reference import REFERENCE


def _import_verified(path: Path, data: bytes, name: str):
    """Execute exactly the bytes whose hash was checked (``read_kernel_module``: not whatever the file
    holds a moment later), and write nothing next to them: an import through the file system would leave
    a ``__pycache__`` in the artifact, which then no longer matches its manifest."""
    mod = types.ModuleType(name)
    mod.__file__ = str(path)
    # Triton reads each kernel's source back through linecache: give it these verified bytes, kept
    # (no mtime) so that a file changed after the check is never read instead
    linecache.cache[str(path)] = (len(data), None, data.decode().splitlines(True), str(path))
    sys.modules[name] = mod
    try:
        exec(compile(data, str(path), "exec", dont_inherit=True), mod.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


def install_binaries(root: Path, aot: dict | None, device_target: str | None, files: dict | None = None) -> int:
    """Put the artifact's ahead-of-time compiled kernels into Triton's cache, so that launching them
    finds them compiled, when they were built for this GPU (``device_target``, e.g. "sm90") by this very
    Triton build (its cache key covers the compiler's own sources); returns how many were installed.
    Every path must stay inside the artifact; with ``files`` (the manifest's path -> sha256), each
    binary's bytes must also match their hash (these bytes, read once, are what is installed)."""
    if not aot or not aot.get("binaries") or aot.get("target") != device_target:
        return 0
    import triton
    from triton.runtime.cache import get_cache_manager, triton_key
    if aot.get("triton") != triton.__version__ or aot.get("triton_key") != hashlib.sha256(triton_key().encode()).hexdigest():
        return 0  # another toolchain: it compiles as it would without them
    n = 0
    for key, names, read in aot_binaries(root, aot, files):
        mgr = get_cache_manager(key)
        meta = next((f for f in names if f.endswith(".json")), None)
        if meta is None or mgr.get_group(meta) is not None:
            continue
        group = {}
        for f in names:
            data = read(f)  # inside the artifact, and (with ``files``) matching its hash
            group[f] = mgr.put(data if not f.endswith(".json") else data.decode(), f, binary=not f.endswith(".json"))
        mgr.put_group(meta, group)
        n += 1
    return n


def load_modules(root: Path, entry: dict, device_type: str) -> dict:
    """Template family -> the artifact's rendered kernel module, imported after its hash check."""
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
        # the path must stay inside the artifact (no "../x.py", absolute path or symlink out of it), and the
        # bytes read must match the module's hash: those very bytes are executed
        path, data = read_kernel_module(root, fam, m)
        modules[fam] = _import_verified(path, data, f"v4c_kernels_{fam}_{m['sha256'][:12]}")
    return modules


class _Kernels:
    """An artifact's kernel modules, imported after their hash checks, with the configs every rank
    agreed on: the per-model context the triton backend's callables are bound with."""

    def __init__(self, root: Path, entry: dict, device_type: str):
        self.modules = load_modules(root, entry, device_type)
        where = "cuda" if device_type == "cuda" else "cpu"
        # under torch.distributed every rank takes rank 0's configs, so no two ranks run different kernels
        self.sites = agree(entry.get("sites", {}), where)
        ops = _op_specs(entry)
        self.metas = agree({**{op: spec["meta"] for op, spec in ops.items() if "meta" in spec},
                            **{f"{op}:quantized": spec["quantized"]["meta"] for op, spec in ops.items()
                               if (spec.get("quantized") or {}).get("module")}}, where)


def _op_specs(entry: dict) -> dict:
    return {op: spec for op, spec in entry.get("ops", {}).items() if "meta" in spec or spec.get("quantized")}


def triton_backend(root: Path, entry: dict, device_type: str) -> Backend:
    """The artifact's kernels as a backend: a call site's own table where the manifest has one (the
    config of each call's shape bucket), else the op's summary config; the reference otherwise.
    Which one a node gets is read from the manifest alone, so ``v4c inspect`` can report it without
    importing any kernel; the modules are imported when a model binds its nodes."""
    sites, ops = entry.get("sites", {}), _op_specs(entry)

    def site_check(call: Call) -> str | None:
        site = sites.get(call.site)
        if site is None:
            return "the manifest has no table for this call site"
        if site.get("module") is None or not site.get("configs"):
            return "the manifest runs this site on its reference"
        if all(c.get("config_source") == "reference" for c in site["configs"].values()):
            return "every shape bucket of this site runs on its reference (compiled with --allow-fallback)"
        return None

    def op_check(call: Call) -> str | None:
        spec = ops.get(call.op)
        if spec is None:
            return f"the artifact has no kernel for {call.op}"
        if call.quantized():
            return None if (spec.get("quantized") or {}).get("module") else "no kernel for quantised weights"
        return None if "meta" in spec else "no kernel for plain weights"

    def site_bind(call: Call, k: _Kernels) -> Callable:
        return _site_impl(k.modules, k.sites[call.site])

    def op_bind(call: Call, k: _Kernels) -> Callable:
        spec = ops[call.op]
        if call.quantized():
            q = spec["quantized"]
            return _bind(k.modules[q["module"]].QUANTIZED[call.op][0], k.metas[f"{call.op}:quantized"])
        return _bind(k.modules[spec["module"]].KERNELS[call.op], k.metas[call.op])

    backend = Backend("triton", fallback=REFERENCE, context=lambda: _Kernels(root, entry, device_type))
    for op in sorted({s["op"] for s in sites.values()} | set(ops)):
        backend.add(op, "site-kernel", site_check, bind=site_bind)(None)
        backend.add(op, "op-kernel", op_check, bind=op_bind)(None)
    return backend


def load_kernels(root: Path, entry: dict, device_type: str) -> dict[str, Callable]:
    """Call site id (and, for nodes of graphs the manifest lists no sites of, IR op) -> callable with
    the op reference's signature, running the artifact's Triton kernel with the config of the call's
    shape bucket (or the op's reference where the manifest says so); for tools that call one kernel
    outside a model (``benchmarks/gpu_check.py``)."""
    k = _Kernels(root, entry, device_type)
    impls = {}
    for op, spec in _op_specs(entry).items():
        if "meta" in spec:
            impls[op] = _bind(k.modules[spec["module"]].KERNELS[op], k.metas[op])
    for sid, site in k.sites.items():
        impls[sid] = _site_impl(k.modules, site)
    return impls


def _site_impl(modules: dict, site: dict) -> Callable:
    """The site's launcher, each call run with the config of the bucket nearest its shape."""
    op = site["op"]
    ref = get_op(op).ref
    if site.get("module") is None:
        return ref
    fn = getattr(modules[site["module"]], site["launcher"])[op]
    if site["launcher"] == "QUANTIZED":
        fn = fn[0]
    configs = site.get("configs") or {}
    for key in configs:
        parse_bucket(key)  # a malformed manifest fails at load, not in the middle of a forward
    keys, ti = sorted(configs), site.get("tokens_input")
    picked: dict = {}

    def call(*args, **attrs):
        if len(keys) == 1 or ti is None:
            c = configs[keys[0]]
        else:
            shape = args[ti].shape
            bt = (int(shape[0]), int(shape[1]))
            if bt not in picked:
                picked[bt] = configs[pick_bucket(keys, *bt)]
            c = picked[bt]
        if c.get("config_source") == "reference":
            return ref(*args, **attrs)
        return fn(*args, meta=c["meta"], **attrs)

    if not keys:
        return ref
    return call


def _bind(launcher: Callable, meta: dict) -> Callable:
    meta = dict(meta)
    return lambda *args, **attrs: launcher(*args, meta=meta, **attrs)
