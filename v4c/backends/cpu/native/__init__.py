"""The cpu backend's native extension: small C kernels bound as PyTorch operators (``torch.ops.v4c_native``).

What it holds: the mHC mixes (``mhc.c``), the projections' RMSNorm + RoPE epilogue (``norm_rope.c``),
attention over plain caches (``attention.c``) and, on CPUs with AVX2 + FMA or AVX-512, a decode step's
MoE (``moe.c``) and dense products (``linear.c``) on dot-product kernels per instruction set (``dots.c``),
all plain C, and (``quant.c``, AVX2 + FMA; ``quant_bf16.c``, the MXFP4 products on AVX512-BF16) the same
decode products with the release's quantised weights (MXFP4 experts, FP8 block-scaled matrices) read as stored. ``ops.cpp`` and ``ops_products.cpp`` (the
dot-product kernels' operators) declare the operators with typed schemas
(``TORCH_LIBRARY(v4c_native)`` and a fragment of it: tensors, optional tensors, ints, floats, bools; ``norm_rope_`` marks its
in-place argument ``Tensor(a!)``) and registers CPU kernels that check every operand's dtype, shape,
device and layout (a wrong one is a TypeError or ValueError naming it, never a crash) before calling
the C code. Row ranges run on PyTorch's own OpenMP team (``parallel.c``), the threads PyTorch's ops
just used, as many as ``torch.get_num_threads()``.

Why C: a decode step is dispatch-bound, and each mHC mix (post-mix, logits, sigmoid/softmax,
a 20-round Sinkhorn on a 4x4 matrix, collapse, norm) is ~60 tiny PyTorch calls for a few KFLOP;
in a prefill the same mix is a dozen memory passes over the streams, and attention's PyTorch
composition computes about twice the window's products plus half a dozen passes for masks and
the softmax.

Build: on first use, with the machine's C and C++ compilers and the include and library paths of
the installed torch (``torch.utils.cpp_extension``), one compiler per source at once, then one link
against libc10/libtorch_cpu (no ninja, no setuptools step). The library lands in
``$V4C_CACHE_DIR/native/<content hash>/libv4c_native.so``: the hash covers the sources, the flags,
both compilers' versions and torch's version, location and C++ ABI, so a change to any of them builds
a new entry and every later process just loads the existing one (``torch.ops.load_library``). An
entry is published whole (built in a temporary directory, renamed into place) and loaded only when
it, its directory and the cache's ``native`` directory belong to this user and nobody else can write
them; otherwise it is built again. Flags are portable (baseline x86-64 plus an AVX2 clone chosen at
load time; the MoE's AVX2, AVX-512F and AVX512-BF16 kernels carry function-level target attributes and
are only called where the CPU has them; no -march=native).

Next to the library the build puts ``_v4c_native_py.so`` (``ops_py.cpp``, where Python's headers are): the
operators as pybind11 functions making the dispatcher's unboxed call, ~3x cheaper a call than ``torch.ops``'
boxed one; ``_ops()`` hands those out. Without it (no headers, a failed build or import, an entry others could
write) the operators are called through ``torch.ops`` (``calls()``, ``py_why()``).

Without a C or C++ compiler, with ``V4C_NATIVE=0``, or when the build fails, ``library()`` is None,
``why()`` says why, one warning per process says so, and the callers keep their PyTorch paths: the
same results up to rounding, slower.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

from ....settings import cache_dir, native_enabled

_HERE = Path(__file__).parent
_C_SOURCES = ("mhc.c", "norm_rope.c", "attention.c", "attention_bf16.c", "moe.c", "linear.c", "dots.c", "quant.c",
              "quant_bf16.c", "route.c", "compress.c", "indexer.c", "parallel.c")
_CXX_SOURCES = ("ops.cpp", "ops_products.cpp")  # the operators (ops.h: what they share)
_LIB = "libv4c_native.so"
# the operators as Python functions (ops_py.cpp): optional, built only where Python's headers are
_PY_SOURCE, _PY_MODULE = "ops_py.cpp", "_v4c_native_py"
_PY_LIB = _PY_MODULE + ".so"
_PY_LINK_LIBS = ("-ltorch_python", "-ltorch", "-ltorch_cpu", "-lc10")
_CFLAGS = ("-O3", "-std=c99", "-ffp-contract=off", "-fPIC", "-pthread")
_CXXFLAGS = ("-O3", "-fPIC", "-pthread")
_LINK_LIBS = ("-lc10", "-ltorch_cpu", "-lm")
_state: dict = {}
_py: list = [None]  # the imported Python module of the operators (``_load_py``)
_noticed: list = []  # the one unavailability warning of this process (kept when tests reset _state)


class NativeUnavailableWarning(UserWarning):
    """The native extension could not be used: the cpu backend runs its PyTorch paths."""


def _private(p: Path) -> bool:
    """Owned by this user and writable by no one else (so nobody else can have replaced it)."""
    try:
        st = p.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


def _compilers() -> tuple[str | None, str | None]:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    return cc, cxx


def _cxx_std() -> str:
    """The C++ standard torch's own extension builder uses: C++20 from torch 2.12, C++17 before."""
    try:
        major, minor = (int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return "-std=c++20"
    return "-std=c++20" if (major, minor) >= (2, 12) else "-std=c++17"


def _abi() -> str:
    return f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


def _build_key(cc: str, cxx: str) -> str:
    """The cache entry's name: a hash over everything that changes the library. Computed without
    importing torch.utils.cpp_extension (which pulls in setuptools): its paths follow from torch's
    location, which is hashed."""
    h = hashlib.sha256("\0".join((cc, cxx, *_CFLAGS, *_CXXFLAGS, _cxx_std(), _abi(), *_LINK_LIBS, torch.__version__,
                                  os.path.dirname(torch.__file__), platform.machine(), *_python_abi())).encode())
    for compiler in (cc, cxx):
        try:
            h.update(subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout)
        except (OSError, subprocess.SubprocessError):
            pass
    for name in sorted(p.name for p in _HERE.iterdir() if p.suffix in (".c", ".h", ".cpp")):
        h.update(name.encode() + b"\0" + (_HERE / name).read_bytes())
    return h.hexdigest()[:24]


def _python_abi() -> tuple[str, str]:
    """What the Python module of the entry depends on: the interpreter's extension suffix (its ABI) and
    the headers' directory."""
    return sysconfig.get_config_var("EXT_SUFFIX") or "", sysconfig.get_paths().get("include") or ""


def _registered() -> bool:
    """Whether this process already holds the operators (a library is loaded once per process: a
    second copy would register the namespace again, which PyTorch refuses)."""
    try:
        torch.ops.v4c_native.hc_mix.default
    except (AttributeError, RuntimeError):
        return False
    return True


def _load(path: Path) -> None:
    if not _registered():
        torch.ops.load_library(str(path))


def _torch_paths() -> tuple[list[str], list[str]]:
    """torch's include and library directories."""
    try:
        from torch.utils import cpp_extension  # (only when building: it imports setuptools)
        return cpp_extension.include_paths(), cpp_extension.library_paths()
    except ImportError:  # the same paths, as torch lays them out
        top = Path(torch.__file__).parent
        return [str(top / "include"), str(top / "include" / "torch" / "csrc" / "api" / "include")], [str(top / "lib")]


def _compile_commands(cc: str, cxx: str, tmp: Path) -> tuple[list, list, Path]:
    includes, libdirs = _torch_paths()
    includes = [f"-I{p}" for p in includes]
    out = tmp / _LIB
    compiles, objs = [], []
    for src in _CXX_SOURCES:  # the longest compiles (torch's headers) first
        obj = tmp / (Path(src).stem + ".o")
        compiles.append([cxx, *_CXXFLAGS, _cxx_std(), _abi(), *includes, "-c", "-o", str(obj), str(_HERE / src)])
        objs.append(obj)
    for src in _C_SOURCES:
        obj = tmp / (Path(src).stem + ".o")
        compiles.append([cc, *_CFLAGS, "-c", "-o", str(obj), str(_HERE / src)])
        objs.append(obj)
    # the soname is what the Python module's link records: importing it then finds this library already loaded
    link = [cxx, "-shared", "-pthread", f"-Wl,-soname,{_LIB}", "-o", str(out), *map(str, objs),
            *(f"-L{d}" for d in libdirs), *(f"-Wl,-rpath,{d}" for d in libdirs), *_LINK_LIBS]
    return compiles, link, out


def _py_commands(cxx: str, tmp: Path) -> tuple[list, list] | str:
    """The compile and link of the Python module (ops_py.cpp) next to the library in ``tmp``, or why it
    cannot be built here."""
    py_include = _python_abi()[1]
    if not py_include or not (Path(py_include) / "Python.h").is_file():
        return f"Python's headers (Python.h) are not in {py_include or 'any include directory'}"
    includes, libdirs = _torch_paths()
    obj = tmp / (Path(_PY_SOURCE).stem + ".o")
    compile_ = [cxx, *_CXXFLAGS, _cxx_std(), _abi(), *(f"-I{p}" for p in (*includes, py_include)), "-c", "-o",
                str(obj), str(_HERE / _PY_SOURCE)]
    link = [cxx, "-shared", "-pthread", "-o", str(tmp / _PY_LIB), str(obj), f"-L{tmp}", f"-l:{_LIB}",
            *(f"-L{d}" for d in libdirs), *(f"-Wl,-rpath,{d}" for d in libdirs), *_PY_LINK_LIBS]
    return compile_, link


def _load_py(path: Path) -> None:
    """Import the Python module of the operators from ``path`` (after the library is loaded); where it
    is missing or does not import, ``_state["py_why"]`` says why and the operators are called through
    torch.ops."""
    if _py[0] is not None:  # (imported once per process; tests reset _state)
        _state["py"] = _py[0]
        return
    if not path.is_file():
        _state["py_why"] = _state.get("py_why") or f"{path.name} was not built"
        return
    try:
        spec = importlib.util.spec_from_file_location(_PY_MODULE, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except Exception as e:  # (any failure of the optional module leaves torch.ops, which works)
        _state["py_why"] = f"importing {path.name} failed: {type(e).__name__}: {e}"
        return
    _py[0] = _state["py"] = mod


def _failed(jobs: list) -> None:
    """Raise for the first compiler (of those done) that failed, with its messages."""
    for job, log in jobs:
        if job.poll():
            log.seek(0)
            raise subprocess.CalledProcessError(job.returncode, job.args, stderr=log.read())


def _build() -> bool:
    """Load the library from its cache entry, building the entry first when there is none (or it is
    not trustworthy). False (and ``_state["why"]``) when it cannot be had."""
    cc, cxx = _compilers()
    if cc is None or cxx is None:
        _state["why"] = "no C/C++ compiler found (cc, gcc or clang; c++, g++ or clang++)"
        return False
    root = cache_dir() / "native"
    final = root / _build_key(cc, cxx)
    lib_path = final / _LIB
    if _private(root) and _private(final) and _private(lib_path):
        try:
            _load(lib_path)
        except OSError:
            pass  # a damaged entry: built again below
        else:
            py_path = final / _PY_LIB
            if py_path.exists() and not _private(py_path):
                _state["py_why"] = f"{py_path} is writable by others: not imported"
            else:
                _load_py(py_path)
            return True
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(root, 0o700)
    except OSError:
        root = None  # no usable cache directory: build in a temporary one, as without a cache
    tmp = Path(tempfile.mkdtemp(prefix="v4c-native-", dir=root))
    jobs: list = []
    py_job = None
    try:
        compiles, link, out = _compile_commands(cc, cxx, tmp)
        py = _py_commands(cxx, tmp)
        if isinstance(py, str):
            _state["py_why"] = py
        else:  # the Python module compiles alongside; its failure leaves the library as it is
            py_log = tempfile.TemporaryFile(mode="w+", dir=tmp)
            try:
                py_job = (subprocess.Popen(py[0], stdout=py_log, stderr=subprocess.STDOUT, text=True), py_log)
            except OSError:
                py_log.close()
                raise
        # one compiler per source, all at once, then one link
        for cmd in compiles:  # (output to files: a pipe nobody reads could fill up and stall a compiler)
            log = tempfile.TemporaryFile(mode="w+", dir=tmp)
            try:
                jobs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log))
            except OSError:
                log.close()
                raise
        deadline = time.monotonic() + 300
        while any(job.poll() is None for job, _ in jobs):  # the first failure ends the build at once
            _failed(jobs)
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(jobs[0][0].args, 300)
            time.sleep(0.02)
        _failed(jobs)
        subprocess.run(link, check=True, capture_output=True, text=True, timeout=120)
        _load(out)  # (loaded before it is published: an entry that does not load is never kept)
        if py_job is not None:
            _link_py(py_job, py[1], deadline)
            _load_py(tmp / _PY_LIB)
        if root is not None:  # keep it for the next process: the entry appears whole or not at all
            for obj in tmp.glob("*.o"):
                obj.unlink()
            for built in (out, tmp / _PY_LIB):
                if built.exists():
                    os.chmod(built, 0o755)
            os.chmod(tmp, 0o700)
            shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:
                pass  # another process published the same build first
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        err = getattr(e, "stderr", "") or str(e)
        _state["why"] = f"building the C helpers failed: {err.strip()[:500]}"
        return False
    finally:
        for job, log in jobs + ([py_job] if py_job else []):  # after a failure, no compiler is left running
            if job.poll() is None:
                job.kill()
                job.wait()
            log.close()
        shutil.rmtree(tmp, ignore_errors=True)  # a loaded library stays mapped; nothing is left behind
    return True


def _link_py(job: tuple, link: list, deadline: float) -> None:
    """Wait for the Python module's compile and link it; a failure is only noted (``_state["py_why"]``)."""
    proc, log = job
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        if proc.returncode == 0:
            subprocess.run(link, check=True, capture_output=True, text=True, timeout=120)
            return
        log.seek(0)
        err = log.read()
    except (OSError, subprocess.SubprocessError) as e:
        err = getattr(e, "stderr", "") or str(e)
    _state["py_why"] = f"building {_PY_LIB} failed: {err.strip()[:500]}"


_build_lock = threading.Lock()


def library():
    """The operators (``torch.ops.v4c_native``), or None (``why()`` says why)."""
    if "lib" not in _state:
        with _build_lock:  # sessions in several threads at first use: one build, every thread waits for it
            if "lib" not in _state:
                if not native_enabled():
                    _state["why"] = "disabled by V4C_NATIVE=0"
                    ok = False
                else:
                    ok = _build()
                if ok:
                    _state["ops"] = _Ops(_state.get("py"))
                elif not _noticed:
                    _noticed.append(_state["why"])
                    warnings.warn(f"v4c: the cpu backend's native extension is unavailable ({_state['why']}); "
                                  "its PyTorch paths run instead (the same results, slower)",
                                  NativeUnavailableWarning, stacklevel=2)
                _state["lib"] = torch.ops.v4c_native if ok else None
    return _state["lib"]


def why() -> str | None:
    """Why ``library()`` is None (None when it is not)."""
    library()
    return _state.get("why")


class _Ops:
    """The operators' overloads, looked up once (each call then skips the packet's overload lookup), and
    where the Python module of the operators was built (ops_py.cpp), its functions instead: the same
    kernels through the dispatcher's unboxed call, ~3x cheaper a call than torch.ops' boxed one."""

    def __init__(self, py=None):
        ns = torch.ops.v4c_native
        self.hc_mix = ns.hc_mix.default
        self.norm_rope_ = ns.norm_rope_.default
        self.attention = ns.attention.default
        self.moe_decode = ns.moe_decode.default
        self.dot_isas = ns.dot_isas.default
        self.linear = ns.linear.default
        self.qlinear = ns.qlinear.default
        self.moe_decode_q = ns.moe_decode_q.default
        self.moe_route = ns.moe_route.default
        self.sqrt_softplus_ = ns.sqrt_softplus_.default
        self.compress_step_ = ns.compress_step_.default
        self.compress_prefill_ = ns.compress_prefill_.default
        self.indexer_topk = ns.indexer_topk.default
        self.ring_append_ = ns.ring_append_.default
        self.attention_step_ = ns.attention_step_.default
        self.compress_decode_ = ns.compress_decode_.default
        self.compress_close_ = ns.compress_close_.default
        self.router_step = ns.router_step.default
        self.linear_norm_rope = ns.linear_norm_rope.default
        self.indexer_step = ns.indexer_step.default
        self.o_proj_step = ns.o_proj_step.default
        for name in _PY_OPS if py is not None else ():
            setattr(self, name, getattr(py, name))


# the operators ops_py.cpp binds (every one a call of a forward makes)
_PY_OPS = ("hc_mix", "norm_rope_", "ring_append_", "attention", "attention_step_", "compress_step_",
           "compress_decode_", "compress_close_", "indexer_topk", "linear_norm_rope", "indexer_step", "moe_decode",
           "linear", "moe_route", "sqrt_softplus_", "o_proj_step", "router_step", "qlinear", "moe_decode_q")


def calls() -> str:
    """How the operators are called: ``"python-module"`` (ops_py.cpp's functions) or ``"torch.ops"``."""
    return "python-module" if library() is not None and _state.get("py") is not None else "torch.ops"


def py_why() -> str | None:
    """Why the operators are called through torch.ops (None when they are not)."""
    library()
    return None if _state.get("py") is not None else _state.get("py_why", "the native extension is unavailable")


def _openmp_entries() -> tuple:
    """The OpenMP team's entry points the library uses (GOMP_parallel, omp_get_thread_num,
    omp_get_num_threads of the runtime PyTorch loaded), as addresses, or Nones: then the helpers run
    single-threaded."""
    if library() is None:
        return None, None, None
    return tuple(a or None for a in torch.ops.v4c_native.openmp_entries())


def _ops() -> _Ops:
    library()
    return _state["ops"]


_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def hc_mix_supported(x: torch.Tensor, y: torch.Tensor | None, norm_w: torch.Tensor | None) -> bool:
    """Whether the C mixes take these operands: CPU, contiguous, fp32, bf16 or fp16 streams (``y`` the same
    dtype), at most 8 streams."""
    if library() is None or x.device.type != "cpu" or x.dtype not in _FLOATS or x.shape[2] > 8:
        return False
    if y is not None and (y.dtype != x.dtype or y.device.type != "cpu" or not y.is_contiguous()):
        return False
    return x.is_contiguous() and (norm_w is None or (norm_w.device.type == "cpu" and norm_w.is_contiguous()))


def hc_mix(x, y, post, comb, fn, base, scale, norm_w, *, eps, hc_eps, iters=0, head=False):
    """The mHC post-mix (when ``y`` is given) and pre-mix (or the head's collapse) of every token row
    of ``x [B, T, n, D]``, one C call for a decode step or a prefill. Returns (x1 or None, h, post,
    comb); post and comb are None for the head."""
    return _ops().hc_mix(x, y, post, comb, fn, base, scale, norm_w, eps, hc_eps, iters, head)


def norm_rope_supported(x: torch.Tensor, w: torch.Tensor | None) -> bool:
    """Whether ``norm_rope_`` takes these: a contiguous CPU fp32/bf16 tensor, a weight of either dtype."""
    return (library() is not None and x.device.type == "cpu" and x.dtype in _FLOATS and x.is_contiguous()
            and (w is None or (w.dtype in _FLOATS and w.device.type == "cpu" and w.is_contiguous())))


def norm_rope_(x: torch.Tensor, w: torch.Tensor | None, eps: float, rope_dim: int, rot: torch.Tensor | None,
               norm: bool = True):
    """RMSNorm over the last dim (times ``w``), then RoPE on its last ``rope_dim`` dims with the
    rotations ``rot`` (complex, one row of rope_dim/2 per token), in place on ``x [B, T, (H,) d]``.
    ``norm=False``: the RoPE alone (``rot`` needed, ``w`` and ``eps`` unused)."""
    return _ops().norm_rope_(x, w, eps, rope_dim, rot, norm)


def ring_append_supported(ring: torch.Tensor, ring_pos: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor) -> bool:
    """Whether ``ring_append_`` takes these: contiguous CPU tensors, ``ring`` and ``kv`` of one dtype (any
    element size), int64 positions."""
    plain = all(t.device.type == "cpu" and t.is_contiguous() for t in (ring, ring_pos, kv, pos))
    return library() is not None and plain and ring.dtype == kv.dtype and ring_pos.dtype == pos.dtype == torch.int64


def ring_append_(ring: torch.Tensor, ring_pos: torch.Tensor, kv: torch.Tensor, pos: torch.Tensor) -> None:
    """The window ring's append (attention.c): token ``kv[b, u]`` at position ``pos[b, u]`` (>= 0: no
    padding) into slot ``pos % W`` of ``ring [B, W, D]``, its position into ``ring_pos``, in place;
    at most W tokens a row."""
    _ops().ring_append_(ring, ring_pos, kv, pos)


def attention(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale, isa=None):
    """The ``attention`` op in C (see attention.c): every query row against exactly its visible
    keys, rows split across threads. Returns [B, T, H, D] in q's dtype. bf16 on a CPU with
    AVX512-BF16 multiplies bf16 pairs (attention_bf16.c) unless ``isa`` names another set of
    ``dot_isas`` (then fp32 products)."""
    return _ops().attention(q, kv, ring, ring_pos, sinks, pos, rows if kind != "sliding" else None,
                            idx if kind == "csa" else None, kind, window, ratio, scale, isa)


def attention_step_(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale, rot,
                    rope_dim: int):
    """A decode call's ``sparse_attention`` in one C call: ``attention``, then ``ring_append_`` of ``kv`` (positions
    >= 0, at most W tokens a row), then the inverse RoPE of the output with ``rot`` (the conjugate rotations; none
    when ``rope_dim`` is 0), as ``norm_rope_(..., norm=False)`` applies it. Returns the output."""
    return _ops().attention_step_(q, kv, ring, ring_pos, sinks, pos, rows if kind != "sliding" else None,
                                  idx if kind == "csa" else None, kind, window, ratio, scale, rot, rope_dim)


def dot_isas(dtype: torch.dtype = torch.bfloat16) -> tuple:
    """The instruction sets this CPU (and compiler) run the C MoE and linear with for ``dtype``
    weights, best first: some of ``avx512bf16`` (bf16 only), ``avx512f``, ``avx512vl`` (AVX2's kernels on
    AVX-512's 32 registers: the same bits as ``avx2``), ``avx2`` (with FMA); empty when none (dots.c)."""
    key = ("dots", dtype)
    if key not in _state:
        ok = library() is not None and dtype in _FLOATS
        _state[key] = tuple(_ops().dot_isas(dtype)) if ok else ()
    return _state[key]


def moe_decode_available(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether the C MoE (and linear) run here for ``dtype`` weights."""
    return bool(dot_isas(dtype))


def moe_decode_supported(flat, w13, w2, shared) -> bool:
    """Whether ``moe_decode`` takes these: fp32, bf16 or fp16 activations and plain contiguous CPU weights of
    the same dtype (any widths), on a CPU with one of its instruction sets."""
    if flat.dtype not in _FLOATS or flat.device.type != "cpu" or not flat.is_contiguous():
        return False
    ws = [w13, w2, *shared]
    if any(not isinstance(t, torch.Tensor) or t.dtype != flat.dtype or t.device.type != "cpu"
           or not t.is_contiguous() for t in ws):
        return False
    return moe_decode_available(flat.dtype)


def moe_decode(flat, w, perm, offsets, w13, w2, shared, *, k, limit, isa=None):
    """The routed experts (and the shared one) for a few token rows ``flat [..., D]`` (fp32, bf16 or fp16,
    the weights' dtype; ``w`` and ``perm`` of any shape holding ``t * k`` values), one C call (see moe.c);
    ``isa`` picks an instruction set of ``dot_isas`` (default: the first). Returns ``flat``'s shape and dtype."""
    sg, su, sd = shared if shared else (None, None, None)
    return _ops().moe_decode(flat, w, perm, offsets, w13, w2, sg, su, sd, k, limit, isa)


def compress_step_(kv, gate, ape, pend_kv, pend_gate, pos, ratio: int, overlap: bool):
    """The compressor's decode step after its products (compress.c): each row's token into its pending
    slot (in place), and for the rows whose token closes a window the pooled row [B, d] fp32 (before
    RMSNorm and RoPE; the other rows' are undefined)."""
    return _ops().compress_step_(kv, gate, ape, pend_kv, pend_gate, pos, ratio, overlap)


def compress_prefill_(kv, gate, ape, pend_kv, pend_gate, pos, ratio: int, overlap: bool):
    """``compress_step_`` for a prefill call's ``[B, T, C]`` rows (positions consecutive from each row's first,
    padding -1 after them), token after token through the pending ring (in place): the windows each row closes,
    pooled ``[B, W, d]`` fp32 and their indices ``win [B, W]`` (-1 past a row's last; W = T // ratio + 1)."""
    return _ops().compress_prefill_(kv, gate, ape, pend_kv, pend_gate, pos, ratio, overlap)


def compress_decode_(h, wkv, wgate, ape, pend_kv, pend_gate, pos, ratio: int, overlap: bool):
    """``compress_step_(linear(h, wkv), linear(h, wgate), ape, ...)`` in one C call (plain weights of h's dtype)."""
    return _ops().compress_decode_(h, wkv, wgate, ape, pend_kv, pend_gate, pos, ratio, overlap)


def compress_close_(pooled, pos, ratio: int, norm_w, eps: float, rope_dim: int, table, rows) -> None:
    """The windows a compressor step closes, normalised, rotated (``table``: the complex rotations by position)
    and stored in the plain row store ``rows [B, N, d]`` in place (``pooled [B, d]`` fp32 is overwritten)."""
    _ops().compress_close_(pooled, pos, ratio, norm_w, eps, rope_dim, table, rows)


def indexer_topk(q, w, keys, pos, topk: int, ratio: int, scale: float, isa=None):
    """The indexer's top-k rows over plain fp32 / bf16 keys (indexer.c): ``q [B, T, H, D]``, ``w [B, T, H]``
    (``scale``: weight_scale x score_scale), ``keys [B, N, D]``, ``pos [B, T]``; [B, T, topk] int64, each
    query's rows best first, -1 past its visible rows. bf16 queries and keys on a CPU with AVX512-BF16 are
    scored in bf16 pairs unless ``isa`` names another set of ``dot_isas`` (as ``attention``)."""
    return _ops().indexer_topk(q, w, keys, pos, topk, ratio, scale, isa)


def moe_route(scores, bias, table, ids, k: int, scaling: float):
    """The router's steps after its product (route.c): ``scores [..., E]`` fp32; ``bias [E]`` fp32 picks
    the top ``k`` (or ``table [V, k]`` int32 / int64 with ``ids [...]``: hashed). Returns (idx, wts,
    perm, offsets) as ``moe_router`` does, each token's experts best first."""
    return _ops().moe_route(scores, bias, table, ids, k, scaling)


def linear_norm_rope(x, w, heads: int, norm_w, eps: float, rope_dim: int, rot):
    """``norm_rope_(linear(x, w) viewed as [..., heads, N / heads] (heads >= 1; 0: as is), norm_w, eps, rope_dim, rot)`` in one
    C call: a decode call's q / kv projection or linear_rms_norm."""
    return _ops().linear_norm_rope(x, w, heads, norm_w, eps, rope_dim, rot)


def indexer_step(cq, wq, h, ww, keys, pos, heads: int, rope_dim: int, rot, topk: int, ratio: int, scale: float):
    """A decode call's ``indexer`` in one C call: ``q = linear(cq, wq)`` as [..., heads, d], RoPE'd with ``rot``;
    ``w = linear(h, ww)``; ``indexer_topk(q, w, keys, pos, topk, ratio, scale)``."""
    return _ops().indexer_step(cq, wq, h, ww, keys, pos, heads, rope_dim, rot, topk, ratio, scale)


def o_proj_step(x, wa, groups: int, wb, lead: int, tail):
    """``linear(linear(x, wa, groups) reshaped to [z's first lead dims, *tail], wb)`` in one C call: a decode
    call's output projection."""
    return _ops().o_proj_step(x, wa, groups, wb, lead, tail)


def router_step(x, w, bias, table, ids, k: int, scaling: float):
    """A decode call's router in one C call: ``linear(x, w)`` widened to fp32, ``sqrt_softplus_``, ``moe_route``
    (``bias`` fp32 or any float dtype, widened; or ``table`` with ``ids``)."""
    return _ops().router_step(x, w, bias, table, ids, k, scaling)


def sqrt_softplus_(x):
    """``x = sqrt(softplus(x))`` in place, element by element (route.c): a contiguous fp32 tensor."""
    return _ops().sqrt_softplus_(x)


def linear(x, w, groups: int = 1, isa=None):
    """``x @ w.T`` for a few token rows (see linear.c): ``x [..., K]`` and ``w [N, K]`` of one dtype, fp32
    or bf16; with ``groups`` G > 1, ``x [..., G, K]`` and ``w [G * R, K]`` give ``[..., G, R]`` (group g
    times its R rows of w). ``isa`` as for ``moe_decode``."""
    return _ops().linear(x, w, groups, isa)


# ---- quantised weights (quant.c) ----------------------------------------------------------------

QUANT_FORMATS = ("f8e4m3", "mxfp4")


def quant_available() -> bool:
    """Whether the C products with quantised weights (quant.c: AVX2 + FMA) run here."""
    if "quant" not in _state:
        _state["quant"] = library() is not None and bool(torch.ops.v4c_native.quant_supported())
    return _state["quant"]


def _parts(w):
    """(data, scale, format) of a QuantizedWeight; (w, None, None) for a plain tensor."""
    fmt = getattr(w, "fmt", None)
    return (w, None, None) if fmt is None else (w.data, w.scale, fmt)


def quant_isas() -> tuple:
    """The instruction sets the quantised products run in here, the default first: ``avx512bf16`` (weights
    decoded to bf16 and multiplied in pairs, quant_bf16.c), ``avx2`` (with FMA); empty when none."""
    if "quant_isas" not in _state:
        _state["quant_isas"] = tuple(torch.ops.v4c_native.quant_isas()) if quant_available() else ()
    return _state["quant_isas"]


def qlinear(x, w, groups: int = 1, isa=None):
    """``x @ w.T`` for a few token rows and a quantised weight ``w`` (a ``QuantizedWeight`` of format
    f8e4m3 or mxfp4, logical shape [N, K]), as ``weights.linear`` computes it: x quantised to e4m3 per
    1x128 block, the weight's exact values, fp32 sums, the result in x's dtype (see quant.c). With
    ``groups`` G > 1, ``x [..., G, K]`` gives ``[..., G, N / G]`` (``weights.grouped_linear``). ``isa``
    names one of ``quant_isas`` (default: the first)."""
    return _ops().qlinear(x, w.data, w.scale, w.fmt, groups, isa)


def moe_decode_q(flat, w, perm, offsets, w13, w2, shared, *, k, limit, isa=None):
    """``moe_decode`` with quantised routed experts (``w13`` / ``w2``: QuantizedWeights of one format),
    the shared expert quantised (any format) or plain in ``flat``'s dtype (see quant.c); ``isa`` as
    ``qlinear``'s."""
    d13, s13, fmt = _parts(w13)
    d2, s2, fmt2 = _parts(w2)
    if fmt2 != fmt:
        raise ValueError(f"moe_decode_q: w13 is {fmt} but w2 is {fmt2}")
    parts = [_parts(m) for m in shared] if shared else [(None, None, None)] * 3
    sfmt = {p[2] for p in parts}
    if len(sfmt) != 1:
        raise ValueError(f"moe_decode_q: the shared expert's matrices differ in format ({sorted(map(str, sfmt))})")
    (sg, sgs, _), (su, sus, _), (sd, sds, _) = parts
    return _ops().moe_decode_q(flat, w, perm, offsets, fmt, d13, s13, d2, s2, sfmt.pop(), sg, sgs, su, sus, sd, sds,
                               k, limit, isa)
