"""Helpers the kernel families share: host code, and the small ``@triton.jit`` helpers and limits
that more than one family needs. A template imports them with the line
``from .prelude import ...  # v4c: inline prelude``; when the template is rendered into an
artifact, ``v4c.codegen.emit`` replaces that line with this file's body, so the rendered
module stays self-contained (torch + triton only)."""
import math
import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


_TARGET_CAPABILITY = None  # (major, minor) while v4c compiles this module's launches ahead of time


def _capability(device):
    """(major, minor) of the GPU the kernels run on (or are compiled for); None under the interpreter."""
    if _TARGET_CAPABILITY is not None:
        return tuple(_TARGET_CAPABILITY)
    if _interpreting() or device.type != "cuda":
        return None
    return torch.cuda.get_device_capability(device)


def _check(op, meta, reason):
    if reason:
        raise ValueError(f"{op}: meta {meta} cannot run: {reason}")


_INV_FREQ = {}


def _rope_inv_freq(rope_dim: int, theta: float, yarn, device) -> torch.Tensor:
    """Per-pair RoPE inverse frequencies (YaRN when ``yarn`` = (factor, original_len, beta_fast,
    beta_slow)), computed exactly as the IR reference's ``rope_inv_freq``; cached per device.
    ``rope_dim == 0`` gives a single zero (no rotation)."""
    key = (rope_dim, float(theta), tuple(yarn) if yarn else None, str(device))
    if key not in _INV_FREQ:
        if rope_dim == 0:
            _INV_FREQ[key] = torch.zeros(1, dtype=torch.float32, device=device)
            return _INV_FREQ[key]
        inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
        if yarn:
            factor, orig, beta_fast, beta_slow = yarn

            def corr(rot):  # the pair whose wavelength makes `rot` turns over `orig` tokens
                return rope_dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(corr(beta_fast)), 0)
            high = min(math.ceil(corr(beta_slow)), rope_dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
            inv = inv / factor * ramp + inv * (1 - ramp)
        _INV_FREQ[key] = inv.to(device)
    return _INV_FREQ[key]


# ---- shared by the attention and indexer families ------------------------------------------

SMEM_BYTES = 200 * 1024  # under the ~227 KiB a Hopper block may use, with room for the compiler
MAX_ACC_REGS = 128  # fp32 accumulator values per thread before spills get likely


@triton.jit
def _pow2(e):
    """fp32 ``2**e`` for int32 ``e`` in [-127, 127], built from the bits (2**-127 is subnormal)."""
    biased = e + 127
    bits = tl.where(biased > 0, biased << 23, 1 << 22)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_byte(y):
    """e4m3fn byte of fp32 ``y`` (saturated to +-448), nearest even, built from the bits: the interpreter's
    fp32 -> float8e4nv cast loses the carry when rounding crosses a power of two (31.5 -> 16)."""
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    a = tl.abs(y)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)  # binade; -6 covers subnormals
    t = a * _pow2(3 - e)  # exact: |y| in units of the binade's e4m3 step, in [0, 16)
    r = ((t + 12582912.0) - 12582912.0).to(tl.int32)  # adding 1.5 * 2**23 rounds to an integer, ties even
    code = tl.where(r >= 16, (e + 8) << 3, tl.where(r >= 8, ((e + 7) << 3) | (r - 8), r))
    return (code | ((y.to(tl.int32, bitcast=True) < 0).to(tl.int32) << 7)).to(tl.uint8)


@triton.jit
def _e4m3_value(code):
    """fp32 value of e4m3fn codes held as integer bytes, decoded with integer ops (sm80/sm86 have no fp8
    type; exact everywhere): normals (8 + m) * 2**(e - 10) from the bits, subnormals m * 2**-9, 0x7f NaN."""
    c = code.to(tl.int32) & 0xFF
    e = (c >> 3) & 15
    m = c & 7
    normal = (((c & 0x80) << 24) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    v = tl.where(e == 0, tl.where((c & 0x80) != 0, -sub, sub), normal)
    return tl.where((c & 0x7F) == 0x7F, float("nan"), v)


@triton.jit
def _e4m3_f16(code):
    """fp16 holding e4m3fn codes' values / 256, from the bits alone (sm80/sm86 have no fp8 type): sign, then
    exponent and mantissa moved up 7 bits, since fp16's bias is 8 above e4m3's; subnormals included, exact.
    Cheaper than ``_e4m3_value`` (a few integer ops); the NaN codes 0x7f/0xff come out finite: ``_e4m3_nan``."""
    c = code.to(tl.int32) & 0xFF
    return (((c & 0x80) << 8) | ((c & 0x7F) << 7)).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _e4m3_nan(code, value):
    """``value`` decoded from e4m3fn ``code``, NaN where the code is 0x7f / 0xff."""
    return tl.where((code.to(tl.int32) & 0x7F) == 0x7F, float("nan"), value)


@triton.jit
def _ue8m0_exponent(amax, THRESH: tl.constexpr, QEXP: tl.constexpr):
    """Smallest ``e`` with ``2**e >= amax / qmax`` (``qmax = (1 + THRESH/2**23) * 2**QEXP``: 448 is
    (0x600000, 8), 6 is (0x400000, 2)), 0 for amax == 0, clamped to UE8M0's [-127, 127]."""
    bits = amax.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    e = biased - 127 - QEXP + ((bits & 0x7FFFFF) > THRESH).to(tl.int32)
    e = tl.where(biased == 0, tl.where(amax == 0.0, 0, -127), e)
    return tl.minimum(tl.maximum(e, -127), 127)


@triton.jit
def _rne_bf16(x):
    """fp32 values rounded to the nearest bf16 (ties to even), still as fp32."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _round_to(x, dt: tl.constexpr):
    """fp32 ``x`` rounded to dtype ``dt`` (nearest even) and back to fp32."""
    if dt == tl.bfloat16:
        y = _rne_bf16(x)
    elif dt == tl.float32:
        y = x
    else:
        y = x.to(dt).to(tl.float32)
    return y

@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles >= 0, reduced to [-pi, pi] first (two-constant Cody-Waite with
    fma), so fast hardware sin/cos stay accurate at long-context positions."""
    turns = tl.floor(angle * 0.15915494309189535 + 0.5)
    r = tl.fma(turns, -6.2831854820251465, angle)
    r = tl.fma(turns, 1.7484555314695172e-07, r)
    return tl.cos(r), tl.sin(r)


@triton.jit
def _mm(a, b, DOT_F32: tl.constexpr):
    if DOT_F32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c

def _constraint_args(family: str, op: str, meta, shapes, metas: dict, defaults: dict):
    """The common start of a family's ``constraints``: a reason string, or (meta merged over the
    defaults, input shapes, attrs, element bytes of the activation dtype). ``shapes``: the op's
    input shapes, or a dict {"inputs": [...], "attrs": {...}, "dtype": ...}."""
    if op not in metas:
        return f"{family}: no kernel for {op}"
    attrs, dtype = {}, None
    if isinstance(shapes, dict):
        attrs, dtype = shapes.get("attrs", {}) or {}, shapes.get("dtype")
        shapes = shapes.get("inputs", [])
    m = {**defaults[op], **(meta or {})}
    for name, v in m.items():
        if name in ("num_warps", "num_stages"):
            if not (isinstance(v, int) and v >= 1):
                return f"{name}={v} must be a positive int"
        elif not _pow2_int(v):
            return f"{name}={v} must be a power of two"
    return m, list(shapes or []), attrs, 4 if str(dtype) in ("f32", "float32", "torch.float32") else 2


def _per_thread(elems, warps):
    """Elements of a [.., ..] tile each thread of ``warps`` warps holds (the register estimates' unit)."""
    return -(-elems // (32 * warps))


def _mma_warps(bm, bn, warps):
    """How Triton spreads the warps of a tensor-core dot over its [bm, bn] tile (rows first while a warp
    would hold more 16-row than 16-column slabs): (warps along M, warps along N)."""
    wm, wn = 1, 1
    while wm * wn < warps:
        if bm // 16 // wm >= bn // 16 // wn and wm < bm // 16:
            wm *= 2
        else:
            wn *= 2
    return wm, wn


def _pow2_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0 and (v & (v - 1)) == 0


def _np2(v: int) -> int:
    # plain Python: triton.next_power_of_2 is a constexpr function, ~10x slower on the host, and the
    # tuning spaces call this millions of times
    return 1 << (max(int(v), 1) - 1).bit_length()

def _dot_f32(dtype) -> bool:
    """fp32 (ieee) dots for fp32 models, and for bf16 under the interpreter (its bf16 dot is wrong)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _last_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()
