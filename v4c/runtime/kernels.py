"""Imports an artifact's kernel modules, each only after its bytes match the manifest."""
from __future__ import annotations

import hashlib
import linecache
import os
import sys
import types
from pathlib import Path
from typing import Callable

from ..artifact.manifest import artifact_path
from ..artifact.shapes import parse_bucket, pick_bucket
from ..collective import agree
from ..errors import ArtifactError
from ..graph.registry import get_op
from ..settings import check_triton_mode


def _import_verified(path: Path, digest: str, name: str):
    """Execute exactly the bytes whose hash was checked (not whatever the file holds a moment later),
    and write nothing next to them: an import through the file system would leave a ``__pycache__``
    in the artifact, which then no longer matches its manifest."""
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:  # checked again right before executing it
        raise ArtifactError(f"{path}: kernel source does not match its manifest hash; refusing to import it")
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
    for key, b in aot["binaries"].items():
        mgr = get_cache_manager(key)
        meta = next((f for f in b["files"] if f.endswith(".json")), None)
        if meta is None or mgr.get_group(meta) is not None:
            continue
        group = {}
        for f in b["files"]:
            rel = f"{b['dir']}/{f}"
            data = artifact_path(root, rel, f"aot.binaries[{key!r}]").read_bytes()
            if files is not None and hashlib.sha256(data).hexdigest() != files.get(rel):
                raise ArtifactError(f"{root}: {rel}: AOT binary does not match its manifest hash; refusing to "
                                    f"install it")
            group[f] = mgr.put(data if not f.endswith(".json") else data.decode(), f, binary=not f.endswith(".json"))
        mgr.put_group(meta, group)
        n += 1
    return n


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
        # the path must stay inside the artifact (no "../x.py", absolute path or symlink out of it)
        path = artifact_path(root, m["file"], f"kernels.modules[{fam!r}].file")
        modules[fam] = _import_verified(path, m["sha256"], f"v4c_kernels_{fam}_{m['sha256'][:12]}")
    return modules


def load_kernels(root: Path, entry: dict, device_type: str) -> dict[str, Callable]:
    """Call site id (and, for nodes of graphs the manifest lists no sites of, IR op) -> callable with
    the op reference's signature, running the artifact's Triton kernel with the config of the call's
    shape bucket (or the op's reference where the manifest says so)."""
    modules = load_modules(root, entry, device_type)
    impls = _op_impls(modules, entry, device_type)
    sites = agree(entry.get("sites", {}), "cuda" if device_type == "cuda" else "cpu")
    for sid, site in sites.items():
        impls[sid] = _site_impl(modules, site)
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


def _op_impls(modules: dict, entry: dict, device_type: str) -> dict[str, Callable]:
    """IR op -> its plain launcher with the op's summary config, and the quantised one by weights."""
    ops = {op: spec for op, spec in entry.get("ops", {}).items() if "meta" in spec or spec.get("quantized")}
    quant = {op: spec["quantized"] for op, spec in ops.items() if spec.get("quantized")}
    # under torch.distributed every rank takes rank 0's configs, so no two ranks run different kernels
    metas = agree({**{op: spec["meta"] for op, spec in ops.items() if "meta" in spec},
                   **{f"{op}:quantized": q["meta"] for op, q in quant.items() if q.get("module")}},
                  "cuda" if device_type == "cuda" else "cpu")
    impls = {}
    for op, spec in ops.items():
        impls[op] = _bind(modules[spec["module"]].KERNELS[op], metas[op]) if op in metas else get_op(op).ref
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
