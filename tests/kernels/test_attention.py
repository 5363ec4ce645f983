"""Attention-family Triton kernels (interpreted on the CPU) against the IR ops' references:
``sparse_attention`` (window ring + HCA / CSA compressed rows, sink, de-rotation, ring append)
and the unfused ``attention`` / ``window_append``.  The lightning ``indexer`` is tested in
``test_indexer.py``.

Shapes are the tiny model's: 8 heads x 64 (RoPE 16), window 8, CSA ratio 4, HCA ratio 16.  Batch
row 0 has a long prefix (position 37: a full ring, wrapped, not a multiple of the window), batch
row 1 a context shorter than the window (position 5) and, in prefill, two padding tokens; in
decode (T=1) row 1 is a padding token for the compressed kinds.

Tolerances (max abs error, outputs are O(1)): fp32 1e-5; fp16 5e-3 (a few fp16 ulps: q, keys and
probabilities enter the dots as fp16); bf16 3e-2.  Ring buffers and positions must match exactly
(fp8_ds rows byte for byte).
"""
import itertools

import pytest
import torch
import triton
import triton.language as tl
from kernel_cases import SDT, TDT, positions

from v4c.codegen.templates import attention as A
from v4c.graph import get_op, quant, storage
from v4c.graph.ops.core import apply_rope, rope_cos_sin

H, D, ROPE, W = 8, 64, 16, 8
YARN = [16.0, 64, 32.0, 1.0]
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def attn_case(kind, T, dtype=torch.float32, fmt=None, *, p0=(37, 5), ratio=None, nc=None, topk=4, seed=0,
              heads=H, d=D, rope=ROPE, w=W):
    """Inputs and attrs of one sparse_attention call after a prefix already in the caches."""
    g = torch.Generator().manual_seed(seed)
    H, D, ROPE, W = heads, d, rope, w
    B = len(p0)
    ratio = ratio or {"sliding": 0, "hca": 16, "csa": 4}[kind]
    pos = positions(B, T, p0, pad_decode=kind != "sliding")
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    kv = torch.randn(B, T, D, generator=g).to(dtype)
    sd = TDT[storage.stored_dtype(fmt, SDT[dtype])]
    width = storage.stored_width(D, fmt, ROPE)
    ring = torch.zeros(B, W, width, dtype=sd)
    ring_pos = torch.full((B, W), -1, dtype=torch.int64)
    for b in range(B):  # the ring as earlier calls left it: the last W positions, slot p % W
        ps = torch.arange(max(0, p0[b] - W), p0[b])
        ring[b, ps % W] = storage.encode(torch.randn(len(ps), D, generator=g), fmt, ROPE, sd)
        ring_pos[b, ps % W] = ps
    sinks = torch.randn(H, generator=g)
    args = [q, kv, ring, ring_pos, sinks, pos]
    if kind != "sliding":
        nc = nc or (max(p0) + T) // ratio + 2  # some rows past every query's horizon
        args.append(storage.encode(torch.randn(B, nc, D, generator=g), fmt, ROPE, sd))
    if kind == "csa":  # what the indexer hands over: distinct visible rows, -1 padded
        idx = torch.full((B, T, topk), -1, dtype=torch.int64)
        for b, t in itertools.product(range(B), range(T)):
            if pos[b, t] >= 0:
                pick = torch.randperm(int(pos[b, t] + 1) // ratio, generator=g)[:topk]
                idx[b, t, :len(pick)] = pick
        args.append(idx)
    attrs = dict(kind=kind, window=W, scale=D ** -0.5)
    if kind != "sliding":
        attrs["ratio"] = ratio
    if fmt:
        attrs.update(kv_format=fmt, kv_rope_dim=ROPE)
    return args, attrs


def _fused_attrs(kind, attrs, rope=ROPE, yarn=YARN):
    yarn = None if kind == "sliding" else yarn
    return dict(attrs, rope_dim=rope, theta=10000.0 if kind == "sliding" else 160000.0, yarn=yarn)


def _clone(args):
    return [a.clone() for a in args]


def run_sparse(args, attrs, meta=None):
    want = get_op("sparse_attention").ref(*_clone(args), **attrs)
    got = A.sparse_attention(*_clone(args), **attrs, meta=meta)
    return got, want


def check_sparse(got, want, dtype):
    (o, ring, ring_pos), (o_ref, ring_ref, ring_pos_ref) = got, want
    assert o.dtype == o_ref.dtype and o.shape == o_ref.shape
    err = (o.float() - o_ref.float()).abs().max().item()
    assert err <= TOL[dtype], f"output max abs error {err:.3g} > {TOL[dtype]}"
    assert torch.equal(ring_pos, ring_pos_ref)
    assert torch.equal(ring, ring_ref), "window ring differs"


# ---- sparse_attention ---------------------------------------------------------------------------

CONFIGS = [(torch.float32, None), (torch.float16, None), (torch.float32, "fp8_ds"), (torch.float16, "fp8_ds")]


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
@pytest.mark.parametrize("dtype,fmt", CONFIGS, ids=["f32", "f16", "f32-fp8ds", "f16-fp8ds"])
def test_sparse_attention(kind, T, dtype, fmt):
    args, attrs = attn_case(kind, T, dtype, fmt)
    attrs = _fused_attrs(kind, attrs)
    got, want = run_sparse(args, attrs)
    check_sparse(got, want, dtype)
    pos = args[5]
    assert (got[0][pos < 0] == 0).all(), "padding queries must give zeros"


@pytest.mark.parametrize("kind,dtype,fmt", [("hca", torch.float32, "bf16"), ("csa", torch.float32, "f16"),
                                            ("sliding", torch.bfloat16, None), ("csa", torch.bfloat16, "fp8_ds")])
def test_sparse_attention_other_storage(kind, dtype, fmt):
    """Plain 16-bit caches (this call's rows are rounded to them first) and bf16 activations."""
    for T in (1, 6):
        args, attrs = attn_case(kind, T, dtype, fmt, seed=T)
        got, want = run_sparse(args, _fused_attrs(kind, attrs))
        check_sparse(got, want, dtype)


def test_sparse_attention_long_decode_and_prefill():
    """Decode and prefill over many compressed rows (several key tiles per split) and a prefill
    longer than the window (the ring is only visible to the first W tokens)."""
    meta = {"BLOCK_N": 16, "SPLIT_K": 4, "BLOCK_T": 2}
    for kind, T, fmt in [("hca", 1, None), ("csa", 1, "fp8_ds"), ("hca", 13, "fp8_ds"), ("sliding", 13, None)]:
        args, attrs = attn_case(kind, T, torch.float32, fmt, p0=(163, 70), ratio=4, topk=40, seed=3)
        got, want = run_sparse(args, _fused_attrs(kind, attrs), meta)
        check_sparse(got, want, torch.float32)


def test_sparse_attention_meta_candidates_agree():
    sample = [  # head dim 64: 4 chunks of 16 on 4 warps, 2 of 32 on 8 warps (see _head_chunks)
        {"BLOCK_T": 1, "BLOCK_H": 16, "BLOCK_N": 16, "SPLIT_K": 1, "BLOCK_R": 8, "num_warps": 4, "num_stages": 1},
        {"BLOCK_T": 2, "BLOCK_H": 32, "BLOCK_N": 32, "SPLIT_K": 2, "BLOCK_R": 16, "num_warps": 8, "num_stages": 2},
        {"BLOCK_T": 2, "BLOCK_H": 16, "BLOCK_N": 64, "SPLIT_K": 16, "BLOCK_R": 16, "num_warps": 4, "num_stages": 1},
    ]
    for meta in sample:
        assert A.constraints("sparse_attention", meta, [(1, 1, H, D)]) is None
    for kind, T in [("hca", 1), ("csa", 1), ("hca", 6), ("csa", 6)]:
        args, attrs = attn_case(kind, T, torch.float32, "fp8_ds", p0=(90, 5), ratio=4, topk=12, seed=7)
        attrs = _fused_attrs(kind, attrs)
        outs = []
        for meta in sample:
            got, want = run_sparse(args, attrs, meta)
            check_sparse(got, want, torch.float32)
            outs.append(got[0])
        for o in outs[1:]:
            assert (o - outs[0]).abs().max().item() <= 1e-6


def test_sparse_attention_sees_the_quantised_new_rows():
    """This call's rows must be attended as the fp8_ds cache will hold them: attending the raw rows
    instead changes the output by far more than the tolerance."""
    args, attrs = attn_case("sliding", 6, torch.float32, "fp8_ds")
    attrs = _fused_attrs("sliding", attrs)
    got, want = run_sparse(args, attrs)
    raw = dict(attrs, kv_format=None, kv_rope_dim=0)
    ring_plain = storage.decode(args[2], "fp8_ds", D, ROPE)
    o_raw = get_op("sparse_attention").ref(args[0], args[1], ring_plain, args[3].clone(), *args[4:], **raw)[0]
    assert (got[0] - want[0]).abs().max() <= TOL[torch.float32]
    assert (o_raw - want[0]).abs().max() > 100 * TOL[torch.float32]


@pytest.mark.parametrize("kind,fmt", [("csa", "fp8_ds"), ("hca", None)])
def test_attention_unfused(kind, fmt):
    for T in (1, 6):
        args, attrs = attn_case(kind, T, torch.float16, fmt)
        ring0 = args[2].clone()
        want = get_op("attention").ref(*_clone(args), **attrs)
        got = A.attention(*args, **attrs, meta={"SPLIT_K": 2})
        assert (got.float() - want.float()).abs().max() <= TOL[torch.float16]
        assert torch.equal(args[2], ring0), "the unfused attention must not touch the ring"


@pytest.mark.parametrize("fmt,dtype", [(None, torch.float16), ("fp8_ds", torch.float32), ("bf16", torch.float32)])
def test_window_append(fmt, dtype):
    for T, p0 in [(1, (37, 5)), (6, (37, 5)), (13, (3, 20))]:  # 13 > W: only the last W valid tokens land
        args, attrs = attn_case("sliding", T, dtype, fmt, p0=p0)
        ring, ring_pos, kv, pos = args[2], args[3], args[1], args[5]
        fa = {k: v for k, v in attrs.items() if k in ("kv_format", "kv_rope_dim")}
        want = get_op("window_append").ref(ring.clone(), ring_pos.clone(), kv, pos, **fa)
        got = A.window_append(ring.clone(), ring_pos.clone(), kv, pos, **fa, meta={"BLOCK_R": 8})
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_fp8_row_quantiser_is_byte_exact():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 20, D, generator=g) * torch.exp(torch.randn(6, 20, 1, generator=g) * 4)
    x[0, 0] = 0.0  # all-zero row: scale 1
    x[0, 1, :16] = torch.tensor([31.4, -31.7, 15.9, 0.0, -0.0, 1e-3, 448.0, 447.9, 1.0, 1.75, -1.8125, 2.2e-3,
                                 3e-9, -7e-10, 100.0, 0.5])  # e4m3 rounding across binades, subnormal codes
    x[0, 2] = 1e-30  # tiny block: clamped scale exponent
    lay = A._KVLayout(D, "fp8_ds", ROPE)
    for xs in (x, x.to(torch.float16)):
        got = A._quantize_kv(xs, lay, quant.kv_row_bytes(D, ROPE), 16, 4)
        assert torch.equal(got, quant.quantize_kv_rows(xs, ROPE))


def test_rope_table_matches_reference():
    pos = torch.tensor([[0, 7, 12345]])
    cos, sin = rope_cos_sin(pos, 16, 160000.0, YARN)
    x = torch.randn(1, 3, 16)
    inv = A._rope_inv_freq(16, 160000.0, YARN, "cpu")
    ang = pos[0].float()[:, None] * inv
    assert torch.allclose(apply_rope(x, ang.cos()[None], ang.sin()[None]), apply_rope(x, cos, sin))


# ---- the real model's sizes --------------------------------------------------------------------

def test_real_model_sizes():
    """V4-Flash attention dims (fewer heads and shorter contexts): head dim 512 with 64 RoPE dims in
    584-byte fp8_ds rows, window 128."""
    yarn = [16.0, 65536, 32.0, 1.0]
    for kind, T in [("csa", 1), ("hca", 5), ("sliding", 3)]:
        args, attrs = attn_case(kind, T, torch.float16, "fp8_ds", p0=(700, 130), ratio=None if kind == "sliding" else 4,
                                topk=96, heads=16, d=512, rope=64, w=128)
        assert args[2].shape[2] == 584
        got, want = run_sparse(args, _fused_attrs(kind, attrs, rope=64, yarn=yarn))
        check_sparse(got, want, torch.float16)


# ---- target-dependent paths ----------------------------------------------------------------------

@triton.jit
def _decode_bytes(x_ptr, out_ptr):
    i = tl.arange(0, 256)
    codes = tl.load(x_ptr + i)
    tl.store(out_ptr + i, A._e4m3_nan(codes, A._e4m3_f16(codes).to(tl.float32) * 256.0))


def test_e4m3_decode_without_fp8_type_is_exact():
    """The integer decode (sm80 / sm86 have no fp8 type) gives every e4m3fn byte's value, NaN for 0x7f / 0xff."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    out = torch.empty(256)
    _decode_bytes[(1,)](codes, out)
    want = codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(out.isnan(), want.isnan()) and int(out.isnan().sum()) == 2
    assert torch.equal(out.nan_to_num(0.0), want.nan_to_num(0.0))


class _Spy:
    """Wraps ``_attn_kernel`` to record the fp8 decode each launch was given."""

    def __init__(self, fn):
        self.fn, self.native = fn, []

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            self.native.append(kwargs["NATIVE_FP8"])
            return launch(*args, **kwargs)
        return run


def _native_and_sm80(monkeypatch, args, attrs, meta=None):
    """The outputs of the native fp8 decode (the interpreter's default) and of an sm80 launch (no fp8 type:
    the integer decode), which must agree bit for bit: both decodes are exact."""
    spy = _Spy(A._attn_kernel)
    monkeypatch.setattr(A, "_attn_kernel", spy)
    native, want = run_sparse(args, attrs, meta)
    monkeypatch.setattr(A, "_TARGET_CAPABILITY", (8, 0))  # what AOT capture for sm80 sets
    sm80, _ = run_sparse(args, attrs, meta)
    monkeypatch.setattr(A, "_TARGET_CAPABILITY", None)
    monkeypatch.setattr(A, "_attn_kernel", spy.fn)
    assert spy.native == [True, False]
    assert all(torch.equal(x, y) for x, y in zip(native, sm80)), "integer and native fp8 decodes differ"
    return sm80, want


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_sparse_attention_sm80_fp8_decode(kind, monkeypatch):
    for T in (1, 6):
        args, attrs = attn_case(kind, T, torch.float16, "fp8_ds", seed=11)
        got, want = _native_and_sm80(monkeypatch, args, _fused_attrs(kind, attrs))
        check_sparse(got, want, torch.float16)


def test_sparse_attention_sm80_real_model_sizes(monkeypatch):
    """The sm80 decode at V4's row layout (448 e4m3 dims in 7 scale blocks, 64 bf16 RoPE dims, 584 bytes)."""
    yarn = [16.0, 65536, 32.0, 1.0]
    for kind, T in [("csa", 1), ("hca", 3)]:
        args, attrs = attn_case(kind, T, torch.bfloat16, "fp8_ds", p0=(700, 130), ratio=4, topk=64, heads=16,
                                d=512, rope=64, w=128)
        got, want = _native_and_sm80(monkeypatch, args, _fused_attrs(kind, attrs, rope=64, yarn=yarn))
        check_sparse(got, want, torch.bfloat16)


def _widen(x, pad):
    """``x`` as a view into a buffer ``pad`` elements wider a row: row strides no longer the row width."""
    w = torch.zeros(*x.shape[:-1], x.shape[-1] + pad, dtype=x.dtype)
    w[..., :x.shape[-1]] = x
    return w[..., :x.shape[-1]]


@pytest.mark.parametrize("fmt,pad", [(None, 1), ("fp8_ds", 2)])
def test_sparse_attention_padded_cache_rows(fmt, pad):
    """Cache rows inside wider buffers (odd strides for plain rows, 2-byte aligned fp8_ds rows): the kernel
    takes KV strides in units of their largest power-of-two divisor."""
    for kind, T in [("hca", 6), ("csa", 1)]:
        args, attrs = attn_case(kind, T, torch.float32, fmt, seed=2)
        attrs = _fused_attrs(kind, attrs)
        want = get_op("sparse_attention").ref(*_clone(args), **attrs)
        wide = _clone(args)
        wide[2], wide[6] = _widen(wide[2], pad), _widen(wide[6], pad)
        got = A.sparse_attention(*wide, **attrs)
        assert got[1].stride(1) == args[2].shape[2] + pad
        check_sparse(got, want, torch.float32)


# ---- constraints ----------------------------------------------------------------------------------

def test_constraints():
    real_q = (1, 1, 64, 512)
    assert A.constraints("sparse_attention", {}, [real_q]) is None
    assert "power of two" in A.constraints("sparse_attention", {"BLOCK_N": 24}, [real_q])
    assert "tl.dot" in A.constraints("sparse_attention", {"BLOCK_N": 8}, [real_q])
    assert "registers" in A.constraints("sparse_attention", {"BLOCK_T": 8, "BLOCK_H": 64}, [real_q])
    f32 = {"inputs": [real_q], "dtype": "f32"}  # fp32 "ieee" dots run on FMAs with the tiles in registers
    assert "registers" in A.constraints("sparse_attention", {}, f32)
    assert A.constraints("sparse_attention", {"BLOCK_N": 16}, f32) is None
    assert A.constraints("window_append", {}, []) is None
    assert "quantise" in A.constraints("window_append", {"BLOCK_R": 32, "num_warps": 1},
                                       [(1, 128, 584), (1, 128), (1, 1, 512)])
    for op in A.KERNELS:
        assert set(A.DEFAULT_META[op]) == set(A.META[op])
        assert all(A.DEFAULT_META[op][k] in A.META[op][k] for k in A.META[op])
    with pytest.raises(ValueError, match="cannot run"):
        args, attrs = attn_case("sliding", 1)
        A.sparse_attention(*args, **_fused_attrs("sliding", attrs), meta={"BLOCK_N": 8})


V4_SHAPES = {  # (heads, decode / prefill q shapes) of V4-Flash and V4-Pro
    "flash": [(1, 1, 64, 512), (256, 1, 64, 512), (1, 4096, 64, 512)],
    "pro": [(1, 1, 128, 512), (256, 1, 128, 512), (1, 4096, 128, 512)],
}


def _spec(q, kind, dtype="bf16"):
    return {"inputs": [q, q[:2] + (512,)], "attrs": {"kind": kind}, "dtype": dtype}


@pytest.mark.parametrize("model", sorted(V4_SHAPES))
def test_constraints_real_models(model):
    """What AOT compiles of the V4 shapes showed (ptxas on sm80 / sm90 / sm100): query rows x keys x stages
    that stayed spill-free pass, those that spilled on some target (or needed too much shared memory) fail,
    and so does every 4-warp config (a 128-wide head chunk a warp).  The default passes everywhere."""
    good = [dict(BLOCK_H=16, BLOCK_N=32, num_stages=1), dict(BLOCK_H=16, BLOCK_N=16, num_stages=2),
            dict(BLOCK_H=32, BLOCK_N=16, num_stages=1)]
    bad = [dict(BLOCK_H=16, BLOCK_N=32, num_stages=2), dict(BLOCK_H=16, BLOCK_N=64, num_stages=1),
           dict(BLOCK_H=32, BLOCK_N=32, num_stages=1), dict(BLOCK_H=32, BLOCK_N=16, num_stages=2),
           dict(BLOCK_H=16, BLOCK_N=16, num_stages=1, num_warps=4)]
    for q in V4_SHAPES[model]:
        for kind in ("sliding", "hca", "csa"):
            spec = _spec(q, kind)
            assert A.constraints("sparse_attention", {}, spec) is None
            for m in good:
                assert A.constraints("sparse_attention", {**m, "num_warps": 8}, spec) is None, m
            for m in bad:
                assert A.constraints("sparse_attention", {"num_warps": 8, **m}, spec) is not None, m
    # two query tokens a program double the rows, except in decode and CSA (one token a program)
    two = {"BLOCK_T": 2, "BLOCK_H": 16, "BLOCK_N": 32}
    prefill = V4_SHAPES[model][2]
    assert A.constraints("sparse_attention", two, _spec(prefill, "csa")) is None
    assert A.constraints("sparse_attention", two, _spec(V4_SHAPES[model][0], "hca")) is None
    assert "registers" in A.constraints("sparse_attention", two, _spec(prefill, "hca"))


# (query rows, BLOCK_N, num_stages) -> (most registers ptxas used on sm80 / sm90 / sm100, shared bytes) for
# V4-Flash's CSA decode, bf16, 8 warps: AOT compiles of this kernel (255 means at the limit or spilling).
PTXAS_V4_CSA_DECODE = {
    (16, 16, 1): (152, 49152), (16, 16, 2): (184, 73856), (16, 32, 1): (186, 81920), (16, 32, 2): (233, 131328),
    (16, 64, 1): (255, 147456), (32, 16, 1): (204, 65536), (32, 16, 2): (247, 90240), (32, 32, 1): (233, 98304),
    (32, 32, 2): (255, 147712),
}


def test_resource_model_against_ptxas():
    """The estimates behind ``constraints``: shared memory never under-estimated, and the register rule keeps
    exactly the configs that compiled with a margin (<= 210 registers everywhere) and drops those that came
    within reach of 255 on some target."""
    for (rows, block_n, stages), (regs, smem) in PTXAS_V4_CSA_DECODE.items():
        est_regs, est_smem = A._attn_resources(rows, block_n, 512, 8, stages, 2)
        assert est_smem >= smem, (rows, block_n, stages)
        assert (est_regs <= A.ATTN_REG_BUDGET) == (regs <= 210), (rows, block_n, stages, est_regs, regs)
