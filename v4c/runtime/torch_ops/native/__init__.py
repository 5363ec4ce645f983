"""The torch backend's C helpers, built on first use with the machine's C compiler and called
through ctypes: the mHC mixes (``mhc.c``), the projections' RMSNorm + RoPE epilogue
(``norm_rope.c``), attention over plain caches (``attention.c``) and, on CPUs with AVX512-BF16,
a decode step's MoE (``moe.c``); row ranges run on PyTorch's own OpenMP team (``parallel.c``).

Why C: a decode step is dispatch-bound, and each mHC mix (post-mix, logits, sigmoid/softmax,
a 20-round Sinkhorn on a 4x4 matrix, collapse, norm) is ~60 tiny PyTorch calls for a few KFLOP;
in a prefill the same mix is a dozen memory passes over the streams, and attention's PyTorch
composition computes about twice the window's products plus half a dozen passes for masks and
the softmax. The sources ship with the package and are compiled into a private temporary
directory of this process, which is removed once the library is loaded (nothing is ever loaded
from a shared cache); flags are portable (baseline x86-64 plus an AVX2 clone chosen at load time,
the MoE's AVX512-BF16 code only called where the CPU has it; no -march=native). Without a
compiler, or with V4C_NATIVE=0, ``library()`` is None and the callers keep their PyTorch paths:
the same results up to rounding, slower.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from ....settings import cache_dir, native_enabled

_SOURCES = ("mhc.c", "norm_rope.c", "attention.c", "moe.c", "parallel.c")
_state: dict = {}


def _openmp_entries() -> tuple:
    """PyTorch's OpenMP team, as the C helpers hand it row ranges: GOMP_parallel, omp_get_thread_num
    and omp_get_num_threads from the OpenMP runtime already in this process (PyTorch loads its
    own), or Nones, and the helpers run single-threaded."""
    try:
        proc = ctypes.CDLL(None)
        return tuple(ctypes.cast(getattr(proc, name), ctypes.c_void_p).value
                     for name in ("GOMP_parallel", "omp_get_thread_num", "omp_get_num_threads"))
    except (OSError, AttributeError):
        return None, None, None


_FLAGS = ("-O3", "-std=c99", "-fPIC", "-pthread")


def _private(p: Path) -> bool:
    """Owned by this user and writable by no one else (so nobody else can have replaced it)."""
    try:
        st = p.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _build_key(cc: str) -> str:
    here = Path(__file__).parent
    h = hashlib.sha256(" ".join((cc, *_FLAGS)).encode())
    try:
        h.update(subprocess.run([cc, "--version"], capture_output=True, timeout=30).stdout)
    except (OSError, subprocess.SubprocessError):
        pass
    for name in sorted(p.name for p in here.iterdir() if p.suffix in (".c", ".h")):
        h.update(name.encode() + b"\0" + (here / name).read_bytes())
    return h.hexdigest()[:24]


def _build() -> ctypes.CDLL | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        _state["why"] = "no C compiler found (cc, gcc or clang)"
        return None
    root = cache_dir() / "native"
    final = root / _build_key(cc)
    lib_path = final / "libv4c_native.so"
    if _private(root) and _private(final) and _private(lib_path):
        try:
            return _bind(ctypes.CDLL(str(lib_path)))
        except OSError:
            pass  # a damaged entry: built again below
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
    except OSError:
        root = None  # no usable cache directory: build in a temporary one, as without a cache
    here = Path(__file__).parent
    tmp = Path(tempfile.mkdtemp(prefix="v4c-native-", dir=root))
    out = tmp / "libv4c_native.so"
    objs = [tmp / (Path(s).stem + ".o") for s in _SOURCES]
    jobs: list = []
    try:
        # one compiler per source, all at once (about half the wait of one sequential build on 2
        # cores), then one link
        for src, obj in zip(_SOURCES, objs):
            jobs.append(subprocess.Popen([cc, *_FLAGS, "-c", "-o", str(obj),
                                          str(here / src)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for job in jobs:
            _, err = job.communicate(timeout=120)
            if job.returncode:
                raise subprocess.CalledProcessError(job.returncode, job.args, stderr=err)
        subprocess.run([cc, "-shared", "-pthread", "-o", str(out), *map(str, objs), "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        lib = ctypes.CDLL(str(out))
        if root is not None:  # keep it for the next process: the entry appears whole or not at all
            for obj in objs:
                obj.unlink()
            os.chmod(tmp, 0o700)
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                pass  # another process published the same build first
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", "") or str(e)
        _state["why"] = f"building the C helpers failed: {err.strip()[:500]}"
        return None
    finally:
        for job in jobs:  # after a failure, no compiler is left running
            if job.poll() is None:
                job.kill()
                job.wait()
        shutil.rmtree(tmp, ignore_errors=True)  # a loaded library stays mapped; nothing is left behind
    return _bind(lib)


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i, lg, fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float
    lib.v4c_hc_mix.argtypes = [i, lg, i, i, i, i, i, p, p, p, p, p, p, p, p, fl, fl, i, p, p, p, p, p]
    lib.v4c_norm_rope.argtypes = [i, lg, i, i, i, p, p, i, fl, i, p, p]
    lib.v4c_attention.argtypes = [i, i, i, i, i, i, i, i, i, p, p, p, p, i, p, p, p, i, p, i, fl, p]
    lib.v4c_moe_decode.argtypes = [i, i, i, i, i, i, i, p, p, p, p, p, p, p, p, p, fl, p]
    lib.v4c_moe_decode_available.argtypes = []
    lib.v4c_use_openmp.argtypes = [p, p, p]
    for f in (lib.v4c_hc_mix, lib.v4c_norm_rope, lib.v4c_attention, lib.v4c_moe_decode, lib.v4c_moe_decode_available,
              lib.v4c_use_openmp):
        f.restype = i
    lib.v4c_use_openmp(*_openmp_entries())
    return lib


_build_lock = threading.Lock()


def library() -> ctypes.CDLL | None:
    """The compiled helpers, or None (``why()`` says why)."""
    if "lib" not in _state:
        with _build_lock:  # sessions in several threads at first use: one build, every thread waits for it
            if "lib" not in _state:
                if not native_enabled():
                    _state["why"] = "disabled by V4C_NATIVE=0"
                    _state["lib"] = None
                else:
                    _state["lib"] = _build()
    return _state["lib"]


def why() -> str | None:
    """Why ``library()`` is None (None when it is not)."""
    library()
    return _state.get("why")


_DT = {torch.float32: 0, torch.bfloat16: 1}
_local = threading.local()  # ctypes drops the GIL during a call: scratch buffers are per thread


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _scratch(name: str, size: int) -> torch.Tensor:
    """This thread's fp32 buffer ``name`` of at least ``size`` floats, kept across calls (a fresh
    multi-MB buffer would cost its page faults again on every call)."""
    buf = getattr(_local, name, None)
    if buf is None or buf.numel() < size:
        buf = torch.empty(size, dtype=torch.float32)
        setattr(_local, name, buf)
    return buf


def _check(rc: int, n: int) -> None:
    if rc != 0:
        raise ValueError(f"hc_mix: {n} streams is more than the C helpers support (1..8)")


def hc_mix_supported(x: torch.Tensor, y: torch.Tensor | None, norm_w: torch.Tensor | None) -> bool:
    """Whether the C mixes take these operands: CPU, contiguous, fp32 or bf16 streams (``y`` the same
    dtype), at most 8 streams."""
    if library() is None or x.device.type != "cpu" or x.dtype not in _DT or x.shape[2] > 8:
        return False
    if y is not None and (y.dtype != x.dtype or y.device.type != "cpu" or not y.is_contiguous()):
        return False
    return x.is_contiguous() and (norm_w is None or (norm_w.device.type == "cpu" and norm_w.is_contiguous()))


def _f32(t: torch.Tensor) -> torch.Tensor:
    # a plain Python check: at decode every avoided dispatch (even a no-op .float()) is ~1 us
    return t if t.dtype is torch.float32 and t.is_contiguous() else t.float().contiguous()


def _operands(fn, base, scale, norm_w):
    if norm_w is not None and norm_w.dtype not in _DT:
        norm_w = norm_w.float()
    return _f32(fn), _f32(base), _f32(scale), norm_w


def _outputs(x, head):
    b, t, n, d = x.shape
    h = torch.empty(b, t, d, dtype=x.dtype)
    if head:
        return h, None, None
    return h, torch.empty(b, t, n, dtype=torch.float32), torch.empty(b, t, n, n, dtype=torch.float32)


def hc_mix(x, y, post, comb, fn, base, scale, norm_w, *, eps, hc_eps, iters=0, head=False):
    """The mHC post-mix (when ``y`` is given) and pre-mix (or the head's collapse) of every token row
    of ``x [B, T, n, D]``, one C call for a decode step or a prefill. Returns (x1 or None, h, post,
    comb); post and comb are None for the head."""
    b, t, n, d = x.shape
    fn, base, scale, norm_w = _operands(fn, base, scale, norm_w)
    mix = y is not None
    x1 = torch.empty_like(x) if mix else None
    h, post_out, comb_out = _outputs(x, head)
    if mix:
        post, comb = _f32(post), _f32(comb)
    lib, mode, xdt = library(), (1 if mix else 0) | (2 if head else 0), _DT[x.dtype]
    wdt = _DT[norm_w.dtype] if norm_w is not None else 0
    threads = torch.get_num_threads()
    _check(lib.v4c_hc_mix(
        threads, b * t, n, d, mode, xdt, wdt, _ptr(x), _ptr(y), _ptr(post if mix else None),
        _ptr(comb if mix else None), _ptr(fn), _ptr(base), _ptr(scale), _ptr(norm_w), eps, hc_eps, iters,
        _ptr(x1), _ptr(h), _ptr(post_out), _ptr(comb_out), _ptr(_scratch("work", threads * (2 * n + 2) * d))), n)
    return x1, h, post_out, comb_out


def norm_rope_supported(x: torch.Tensor, w: torch.Tensor | None) -> bool:
    """Whether ``norm_rope_`` takes these: a contiguous CPU fp32/bf16 tensor, a weight of either dtype."""
    return (library() is not None and x.device.type == "cpu" and x.dtype in _DT and x.is_contiguous()
            and (w is None or (w.dtype in _DT and w.device.type == "cpu" and w.is_contiguous())))


def norm_rope_(x: torch.Tensor, w: torch.Tensor | None, eps: float, rope_dim: int, rot: torch.Tensor | None):
    """RMSNorm over the last dim (times ``w``), then RoPE on its last ``rope_dim`` dims with the
    rotations ``rot`` (complex, one row of rope_dim/2 per token), in place on ``x [B, T, (H,) d]``."""
    b, t, d = x.shape[0], x.shape[1], x.shape[-1]
    heads = x.shape[2] if x.dim() == 4 else 1
    rr = None
    if rot is not None:
        rr = torch.view_as_real(rot).contiguous()  # [B, T, rope_dim/2, 2] floats: (cos, sin) pairs
    if rope_dim % 2 or not 0 <= rope_dim <= d:
        raise ValueError(f"norm_rope: rope_dim {rope_dim} must be even and at most {d}")
    lib, xdt, wdt = library(), _DT[x.dtype], _DT[w.dtype] if w is not None else 0
    threads = torch.get_num_threads()
    lib.v4c_norm_rope(threads, b * t, heads, d, xdt, _ptr(x), _ptr(w), wdt, eps, rope_dim, _ptr(rr),
                      _ptr(_scratch("work", threads * d)))
    return x


_KINDS = {"sliding": 0, "hca": 1, "csa": 2}


def attention_supported(q, kv, ring, ring_pos, pos, rows, idx, kind, kv_format) -> bool:
    """Whether ``attention`` takes these: plain caches (no storage format) of q's dtype, fp32 or bf16,
    everything contiguous on the CPU, int64 positions."""
    if library() is None or kv_format is not None or kind not in _KINDS or q.dtype not in _DT:
        return False
    ts = [q, kv, ring] + ([rows] if kind != "sliding" else [])
    if any(t is None or t.device.type != "cpu" or t.dtype != q.dtype or not t.is_contiguous() for t in ts):
        return False
    ints = [ring_pos, pos] + ([idx] if kind == "csa" else [])
    return all(t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous() for t in ints)


def attention(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale):
    """The ``attention`` op in C (see attention.c): every query row against exactly its visible
    keys, rows split across threads. Returns [B, T, H, D] in q's dtype."""
    b, t, h, d = q.shape
    out = torch.empty_like(q)
    n = rows.shape[1] if kind != "sliding" else 0
    k = idx.shape[2] if kind == "csa" else 0
    rc = library().v4c_attention(
        torch.get_num_threads(), b, t, h, d, _DT[q.dtype], _KINDS[kind], window, ratio, _ptr(q), _ptr(kv), _ptr(ring),
        _ptr(ring_pos), ring.shape[1], _ptr(_f32(sinks)), _ptr(pos), _ptr(rows) if n else None, n,
        _ptr(idx) if k else None, k, scale, _ptr(out))
    if rc == -1:
        raise ValueError(f"attention: kind {kind!r} with ratio {ratio} is not one the C helpers take")
    if rc != 0:
        raise MemoryError("attention: the C helpers could not allocate their scratch memory")
    return out


def moe_decode_available() -> bool:
    """Whether this CPU (and compiler) give the C MoE its AVX512-BF16 dot products."""
    if "moe" not in _state:
        lib = library()
        _state["moe"] = lib is not None and bool(lib.v4c_moe_decode_available())
    return _state["moe"]


def moe_decode_supported(flat, w13, w2, shared) -> bool:
    """Whether ``moe_decode`` takes these: bf16 activations and plain contiguous bf16 CPU weights
    whose widths are multiples of 32, on a CPU with AVX512-BF16."""
    if flat.dtype != torch.bfloat16 or flat.device.type != "cpu" or not flat.is_contiguous():
        return False
    ws = [w13, w2, *shared]
    if any(not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16 or t.device.type != "cpu"
           or not t.is_contiguous() for t in ws):
        return False
    widths = [flat.shape[-1], w2.shape[-1]] + ([shared[0].shape[0]] if shared else [])
    return all(v % 32 == 0 for v in widths) and moe_decode_available()


def moe_decode(flat, w, perm, offsets, w13, w2, shared, *, k, limit):
    """The routed experts (and the shared one) for a few bf16 token rows ``flat [t, D]``, one C
    call (see moe.c). Returns [t, D] bf16."""
    t, d = flat.shape
    out = torch.empty_like(flat)
    sg, su, sd = shared if shared else (None, None, None)
    rc = library().v4c_moe_decode(
        torch.get_num_threads(), t, d, w2.shape[-1], sg.shape[0] if sg is not None else 0, k, w13.shape[0],
        _ptr(flat), _ptr(offsets), _ptr(perm), _ptr(_f32(w)), _ptr(w13), _ptr(w2), _ptr(sg), _ptr(su), _ptr(sd),
        limit, _ptr(out))
    if rc == -1:
        raise ValueError("moe_ffn: expert offsets must be non-decreasing (and widths multiples of 32)")
    if rc != 0:
        raise MemoryError("moe_ffn: the C helpers could not allocate their scratch memory")
    return out
