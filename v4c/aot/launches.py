"""Compiling one recorded launch for its target with Triton's own compiler, and what it costs.

A launch's key is Triton's cache key for it (the kernel's source and dependencies, signature,
constexprs, specialisation, options, target, the Triton build and the environment it reads), so
one kernel compiled for one target is compiled once, whichever call site, bucket or artifact asks.
Registers and spills come from ``ptxas -v`` (Triton runs it with ``-v`` and prints the log when
``dump_ptxas_log`` is on), shared memory from the compiled kernel's metadata.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import re
import time

from .capture import Launch
from .targets import gpu_target

_REGS = re.compile(r"Used (\d+) registers")
_SPILL_STORES = re.compile(r"(\d+) bytes spill stores")
_SPILL_LOADS = re.compile(r"(\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def _source_and_options(launch: Launch, target: str):
    from triton.compiler import ASTSource, make_backend
    src = ASTSource(launch.fn, launch.signature, launch.constexprs, launch.attrs)
    backend = make_backend(gpu_target(target))
    options = backend.parse_options(dict(launch.options.__dict__, **src.parse_options()))
    return src, backend, options


def launch_key(launch: Launch, target: str) -> str:
    """SHA-256 of Triton's cache key for this launch on ``target`` (the name of its cache entry)."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key
    src, backend, options = _source_and_options(launch, target)
    return hashlib.sha256(get_cache_key(src, backend, options, get_cache_invalidating_env_vars()).encode()).hexdigest()


def describe(launch: Launch) -> dict:
    return {"kernel": launch.kernel, "num_warps": launch.options.num_warps, "num_stages": launch.options.num_stages}


def _first(pattern, log: str) -> int:
    found = pattern.findall(log)
    return max(int(v) for v in found) if found else 0


def _error_summary(e: BaseException) -> str:
    """One line: the error, where in the kernel it arose (Triton's "at L:C:"), and its cause."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and ln.strip() != "^"]
    where = next((ln for ln in lines if re.match(r"at \d+:\d+:", ln)), "")
    cause = e.__cause__ or e.__context__
    last = f"{type(cause).__name__}: {cause}" if cause is not None else (lines[-1] if lines else "")
    return f"{type(e).__name__} {where} {last}".replace("\n", " ")[:600]


def compile_launch(launch: Launch, target: str) -> dict:
    """Compile for ``target`` (always: a caller that has a result for this key does not ask) and
    report ``ok``, ``registers``, ``spill_bytes`` (stores), ``spill_loads``, ``stack_bytes``,
    ``shared_bytes``, the cache entry's ``files`` and ``seconds``; or ``ok: False`` and ``error``."""
    import triton
    from triton import knobs

    src, _, options = _source_and_options(launch, target)
    out = {**describe(launch), "target": target}
    log = io.StringIO()
    t0 = time.perf_counter()
    saved = (knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.compilation.store_binary_only)
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True   # ptxas must run for its log
    knobs.compilation.store_binary_only = True
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(src, target=gpu_target(target), options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - every compiler failure is a result to report
        out.update(ok=False, error=_error_summary(e), detail=str(e)[-3000:])
        return out
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile, knobs.compilation.store_binary_only = saved
    text = log.getvalue()
    out.update(ok=True, registers=_first(_REGS, text), spill_bytes=_first(_SPILL_STORES, text),
               spill_loads=_first(_SPILL_LOADS, text), stack_bytes=_first(_STACK, text),
               shared_bytes=int(k.metadata.shared), seconds=round(time.perf_counter() - t0, 3),
               files=sorted(str(p) for p in getattr(k, "metadata_group", {}).values()))
    return out
