"""A decode step's products with the release's quantised weights in C (native/quant.c): the MoE with
MXFP4 (or FP8) routed experts and a shared expert that is FP8, MXFP4 or plain, and the dense products
with FP8 / MXFP4 weights (``linear``, the grouped output projection, the fused projections), against
the reference ops (``weights.linear``: activations rounded to e4m3 per 1x128 block, the weights'
exact values, fp32 sums); the registry binding them for decode calls only; and a whole model with
the release's formats decoding the same tokens through the cpu backend as through the reference.

Tolerances. fp32: 1e-5 of the output's largest value. Every product is exact in both paths (a
quantised activation has 4 significant bits, a decoded weight 2 (e2m1) or 4 (e4m3), the scales are
powers of two), so the paths differ only in the order of the fp32 sums (~1e-7 relative per sum of
a few hundred terms). The one place an order difference could grow is the MoE's re-quantisation of
the SwiGLU output to e4m3, which moves a value by one e4m3 step (~6%) only when it lies within a few
fp32 ulps of a rounding midpoint (a chance of ~1e-5 per value; these seeded cases do not hit one, and
a hit would show as an error near 1e-2, far outside the bound). bf16 and fp16: as test_native_moe's: at
least as close to an fp32 evaluation of the same inputs (``truth``) as the reference itself is, plus a
quarter of the dtype's step (both round every product and activation step to the dtype; the C path sums
the weighted experts in fp32 and rounds once, the reference rounds after each expert); the dense products,
whose outputs are the fp32 sums rounded once in both, within one rounding step of the dtype.
"""
import pytest
import torch

import v4c
from impls import CPU, chosen, run
from v4c.backends.cpu import native
from v4c.graph.ops.collective import ep_select
from v4c.graph.ops.fused import moe_ffn as ref_ffn
from v4c.graph.ops.fused import moe_router as ref_router
from v4c.graph.registry import get_op
from v4c.graph.weight_formats import quantize_fp8_block, quantize_mxfp4
from v4c.graph.weights import QuantizedWeight, grouped_linear, linear

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ["f32", "bf16", "f16"]
needs_q = pytest.mark.skipif(not native.quant_available(), reason="the quantised C products need AVX2 + FMA")
ISAS = ("avx2", "avx512bf16")  # the quantised products' instruction sets (avx512bf16: quant_bf16.c's MXFP4 kernel)


def _isa(isa):
    if isa not in native.quant_isas():
        pytest.skip(f"this CPU (or compiler) has no {isa} kernel for the quantised products")
    return isa


def _quant(w: torch.Tensor, fmt: str | None, dtype=torch.float32):
    """``w [..., N, K]`` quantised to ``fmt`` (stacked experts one by one for FP8), or plain in ``dtype``."""
    if fmt is None:
        return w.to(dtype)
    if fmt == "mxfp4":
        return QuantizedWeight("mxfp4", *quantize_mxfp4(w))
    if w.dim() == 2:
        return QuantizedWeight("f8e4m3", *quantize_fp8_block(w))
    parts = [quantize_fp8_block(m) for m in w]
    return QuantizedWeight("f8e4m3", torch.stack([d for d, _ in parts]), torch.stack([s for _, s in parts]))


def _moe_case(shape, dtype, fmt="mxfp4", shared_fmt="f8e4m3", seed=0, bias=None):
    """(h, idx, w, perm, offsets, w13, w2, *shared) of one decode call: ``shape`` = (tokens, D, I, shared
    width (0: none), experts, top-k)."""
    t, d, i, s, e, k = shape
    g = torch.Generator().manual_seed(seed)
    w13 = _quant(torch.randn(e, 2 * i, d, generator=g) * 0.3, fmt)
    w2 = _quant(torch.randn(e, d, i, generator=g) * 0.3, fmt)
    shared = [_quant(torch.randn(*sz, generator=g) * 0.3, shared_fmt, dtype) for sz in ((s, d), (s, d), (d, s))] \
        if s else []
    h = torch.randn(t, 1, d, generator=g).to(dtype)
    routing = ref_router(h, torch.randn(e, d, generator=g).to(dtype),
                         torch.randn(e, generator=g) if bias is None else bias, topk=k, scaling=1.5)
    return (h, *routing, w13, w2, *shared)


def _up(args):
    """The same call with fp32 activations (and plain weights widened): the bf16 paths' common truth."""
    return [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


def _moe_close(got, args, limit=2.0):
    want = ref_ffn(*args, limit=limit)
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.float32:
        scale = float(want.abs().max()) or 1.0
        err = float((got - want).abs().max()) / scale
        assert err <= 1e-5, f"fp32 error {err:.2e} of the output's scale"
        return
    truth = ref_ffn(*_up(args), limit=limit)
    scale = truth.abs().max()
    err_got, err_want = [float((x.float() - truth).abs().max() / scale) for x in (got, want)]
    slack = torch.finfo(want.dtype).eps / 4  # bf16 2^-9, fp16 2^-12
    assert err_got <= err_want + slack, f"{want.dtype} error {err_got:.2e} vs the reference's {err_want:.2e}"


def _moe(args, limit=2.0):
    return run("moe_ffn", *args, impl="native-quant", phase="decode", limit=limit)


# tokens, D, I, shared width (0: none), experts, top-k
MOE_SHAPES = [
    (1, 64, 32, 32, 8, 2),      # one token
    (4, 96, 64, 64, 6, 3),      # a few tokens (D not a multiple of the FP8 block: edge scale blocks)
    (8, 128, 96, 160, 4, 4),    # top-4 of 4: every expert hit by every token; the shared expert wider
    (16, 256, 128, 0, 64, 6),   # 16 tokens, 64 experts, no shared expert
    (3, 32, 32, 32, 2, 2),      # the smallest MXFP4 widths: one 32-value block per row
]


@needs_q
@pytest.mark.parametrize("shared_fmt", ["f8e4m3", "mxfp4", None], ids=["shared-fp8", "shared-mxfp4", "shared-plain"])
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "t{}-D{}-I{}-S{}-E{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_moe_with_mxfp4_experts_equals_reference(dtype, shape, shared_fmt):
    args = _moe_case(shape, dtype, shared_fmt=shared_fmt, seed=sum(shape))
    _moe_close(_moe(args), args)


@needs_q
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", MOE_SHAPES, ids=lambda s: "t{}-D{}-I{}-S{}-E{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_moe_with_mxfp4_experts_in_each_instruction_set(dtype, shape, isa):
    """The kernel call itself with each instruction set named: the reference's result (as above), and fp32
    sums of the two kernels within their order's rounding of each other."""
    isa = _isa(isa)
    args = _moe_case(shape, dtype, shared_fmt="mxfp4", seed=sum(shape) + 1)
    h, idx, w, perm, offsets, w13, w2, *shared = args
    d = h.shape[-1]
    got = native.moe_decode_q(h.reshape(-1, d), w.reshape(-1), perm.reshape(-1), offsets, w13, w2, shared,
                              k=idx.shape[-1], limit=2.0, isa=isa).view(h.shape)
    _moe_close(got, args)


@needs_q
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_moe_with_fp8_experts_equals_reference(dtype):
    """FP8 routed experts too (the same driver; widths off the 128-blocks, up rows sharing a block with gate rows)."""
    for shape in [(2, 100, 72, 40, 5, 2), (6, 160, 200, 0, 3, 2)]:
        args = _moe_case(shape, dtype, fmt="f8e4m3", shared_fmt="f8e4m3", seed=1)
        _moe_close(_moe(args), args)


@needs_q
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_moe_expert_parallel_share_idle_rank_repeated_experts_and_clamp(dtype):
    """A rank's share of the experts (offsets not from 0, assignments past its last expert), a rank no
    token routes to (the shared expert alone, or zeros), a rank with no tokens at all, experts hit by
    many tokens, and a limit small enough that the clamps bite."""
    h, idx, w, perm, offsets, w13, w2, *shared = _moe_case((8, 64, 64, 32, 12, 3), dtype, seed=1)
    for lo, hi in ((3, 8), (0, 12)):
        sidx, sw, sperm, soffsets = ep_select(idx, w, experts=(lo, hi))
        args = (h, sidx, sw, sperm, soffsets, w13[lo:hi], w2[lo:hi], *shared)
        _moe_close(_moe(args, limit=0.5), args, limit=0.5)
    # every token picks experts 0..2 (bias): each of them holds all 8 tokens
    bias = torch.full((12,), -100.0)
    bias[:3] = 0.0
    args = _moe_case((8, 64, 64, 32, 12, 3), dtype, seed=2, bias=bias)
    assert torch.diff(args[4])[:3].tolist() == [8, 8, 8]
    _moe_close(_moe(args), args)
    # experts 6..11 get no token: their rank computes the shared expert alone, or nothing
    sidx, sw, sperm, soffsets = ep_select(*args[1:3], experts=(6, 12))
    assert int(soffsets[-1] - soffsets[0]) == 0
    idle = (args[0], sidx, sw, sperm, soffsets, args[5][6:], args[6][6:])
    _moe_close(_moe((*idle, *args[7:])), (*idle, *args[7:]))
    assert (_moe(idle) == 0).all()
    # a rank that received no tokens at all this call
    none = (args[0][:0], sidx[:0], sw[:0], sperm[:0], torch.zeros_like(soffsets), args[5][6:], args[6][6:],
            *args[7:])
    assert _moe(none).shape == (0, 1, 64)


@needs_q
def test_moe_result_does_not_depend_on_the_thread_count():
    args = _moe_case((8, 128, 96, 96, 16, 4), torch.float32, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _moe(args)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(_moe(args), one), threads
    finally:
        torch.set_num_threads(before)


@needs_q
@pytest.mark.parametrize("isa", ISAS)
def test_moe_token_rows_get_the_same_bits_alone_or_together(isa):
    """A token's output is the same whether its experts see it alone (a decode step) or with the call's
    other rows (a prefill chunk): a chunked prompt and one call agree to the bit."""
    isa = _isa(isa)
    h, idx, w, perm, offsets, w13, w2, *shared = _moe_case((11, 128, 64, 64, 4, 2), torch.bfloat16, seed=6,
                                                          shared_fmt="mxfp4")

    def call(rows):
        sub = h[rows]
        ridx, rw = idx[rows], w[rows]
        order = torch.argsort(ridx.reshape(-1), stable=True)
        offs = torch.cat([torch.zeros(1, dtype=torch.int64),
                          torch.bincount(ridx.reshape(-1), minlength=4).cumsum(0)])
        return native.moe_decode_q(sub.reshape(-1, 128), rw.reshape(-1), order, offs, w13, w2, shared, k=2,
                                   limit=2.0, isa=isa)

    whole = call(slice(0, 11))
    for rows in (slice(0, 1), slice(4, 6), slice(2, 9)):
        assert torch.equal(call(rows), whole[rows]), rows


@needs_q
def test_moe_names_bad_operands():
    h, idx, w, perm, offsets, w13, w2, *shared = _moe_case((2, 64, 32, 32, 4, 2), torch.float32)
    flat = h.reshape(-1, 64)
    with pytest.raises(ValueError, match="w13 is mxfp4 but w2 is f8e4m3"):
        native.moe_decode_q(flat, w.reshape(-1), perm.reshape(-1), offsets, w13,
                            _quant(torch.randn(4, 64, 32), "f8e4m3"), shared, k=2, limit=2.0)
    with pytest.raises(ValueError, match=r"moe_decode_q: w2 data must have shape \[4, 64, 16\], got \[3, 64, 16\]"):
        native.moe_decode_q(flat, w.reshape(-1), perm.reshape(-1), offsets, w13, w2[:3], shared, k=2, limit=2.0)
    with pytest.raises(TypeError, match="shared_gate must be Float, got BFloat16"):
        plain = [m.dequantize().bfloat16() for m in shared]
        native.moe_decode_q(flat, w.reshape(-1), perm.reshape(-1), offsets, w13, w2, plain, k=2, limit=2.0)


# ---- dense products ------------------------------------------------------------------------------

@needs_q
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["f8e4m3", "mxfp4"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("t,n,k,groups", [(1, 37, 64, 1), (3, 300, 160, 1), (16, 130, 96, 1), (2, 1, 32, 1),
                                          (4, 66, 256, 3), (1, 256, 64, 4), (7, 13, 96, 1), (2, 9, 64, 1)])
def test_qlinear_equals_weights_linear(fmt, dtype, t, n, k, groups, isa):
    isa = _isa(isa)
    g = torch.Generator().manual_seed(t * n + k)
    w = _quant(torch.randn(groups * n, k, generator=g) * 0.1, fmt)
    if groups == 1:
        x = torch.randn(2, t, k, generator=g).to(dtype)
        want = linear(x, w)
    else:
        x = torch.randn(1, t, groups, k, generator=g).to(dtype)
        want = grouped_linear(x, w, groups)
    got = native.qlinear(x, w, groups, isa=isa)
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = float(want.float().abs().max())
    if dtype == torch.float32:
        assert float((got - want).abs().max()) <= 1e-5 * scale
    else:  # one rounding step (bf16, fp16) of the (nearly) equal fp32 sums
        torch.testing.assert_close(got.float(), want.float(), rtol=torch.finfo(dtype).eps / 2, atol=1e-5 * scale)


@needs_q
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_qlinear_fp8_odd_widths(dtype):
    """FP8 widths that end inside a 128-block and inside a vector step (the kernels' tails)."""
    g = torch.Generator().manual_seed(5)
    for n, k in [(200, 300), (5, 7), (129, 131)]:
        w = _quant(torch.randn(n, k, generator=g) * 0.1, "f8e4m3")
        x = torch.randn(3, 1, k, generator=g).to(dtype)
        want, got = linear(x, w), native.qlinear(x, w)
        scale = float(want.float().abs().max())
        torch.testing.assert_close(got.float(), want.float(), rtol=0 if dtype == torch.float32 else
                                   torch.finfo(dtype).eps / 2, atol=1e-5 * scale)


@needs_q
def test_qlinear_activation_rounding_matches_the_reference_bit_for_bit():
    """An identity-like weight exposes the quantised activations themselves: every value, every scale
    (tiny, huge, all-zero blocks, ties between e4m3 steps, e4m3 subnormals) as the reference rounds it."""
    k = 256
    eye = QuantizedWeight("f8e4m3", *quantize_fp8_block(torch.eye(k)))
    x = torch.randn(6, k) * torch.tensor([1e-6, 1e-3, 1.0, 1e3, 1e6, 0.0])[:, None]
    x[2, :16] = torch.tensor([448.0, -3.25, 2 ** -7, 2 ** -9 * 1.5, 2 ** -10, 17.0, 18.0, 19.0, 0.0, -0.0,
                              1e-4, 2 ** -6 * 0.9375, 240.0, 232.0, 248.0, 0.5])
    x[2, 200] = 448.0  # the block's amax: scale 1 for the second block, 448 -> 448
    torch.testing.assert_close(native.qlinear(x, eye), linear(x, eye), rtol=0, atol=0)


@needs_q
@pytest.mark.parametrize("isa", ISAS)
def test_qlinear_result_does_not_depend_on_the_thread_count_or_the_other_rows(isa):
    """Each kernel blocks rows differently by call size (one token row, two, a few, more than a block
    holds; weight rows in fours and the rest): a row's bits stay the same."""
    isa = _isa(isa)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(9, 1, 512, generator=g)
    for fmt, n in (("f8e4m3", 1000), ("mxfp4", 1000), ("mxfp4", 1003)):
        w = _quant(torch.randn(n, 512, generator=g) * 0.1, fmt)
        before = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = native.qlinear(x, w, isa=isa)
            for threads in (2, 3):
                torch.set_num_threads(threads)
                assert torch.equal(native.qlinear(x, w, isa=isa), one), (fmt, threads)
        finally:
            torch.set_num_threads(before)
        for rows in (slice(0, 1), slice(3, 5), slice(2, 5), slice(1, 8)):
            assert torch.equal(native.qlinear(x[rows].contiguous(), w, isa=isa), one[rows]), (fmt, n, rows)


def _mxfp4_with_scales(n, k, exps, g, codes=16):
    """An MXFP4 weight [n, k] with random codes (the first ``codes`` magnitudes of each sign, at most 8) and
    the block scale bytes ``exps`` cycled over the blocks in row-major order."""
    nib = torch.randint(0, codes, (n, k), generator=g) % 8 + 8 * torch.randint(0, 2, (n, k), generator=g)
    packed = (nib[:, 0::2] | (nib[:, 1::2] << 4)).to(torch.uint8).view(torch.int8)
    e = torch.tensor(exps, dtype=torch.uint8)
    scale = e[torch.arange(n * (k // 32)) % len(exps)].view(n, k // 32)
    return QuantizedWeight("mxfp4", packed, scale.view(torch.float8_e8m0fnu))


@needs_q
@pytest.mark.parametrize("isa", ISAS)
def test_qlinear_mxfp4_scales_at_the_ends_of_the_range(isa):
    """The bf16 kernel folds a block's scale into its decoded values only for e8m0 bytes 33-252 (no
    subnormal product or sum, which vdpbf16ps would flush); other blocks take a second sum. Rows of one
    scale each (the smallest, the fold's edges, the largest that does not overflow), rows mixing folded
    and unfolded blocks, and a NaN scale, against the reference at each row's own magnitude."""
    isa = _isa(isa)
    g = torch.Generator().manual_seed(4)
    k = 128
    x = torch.randn(5, k, generator=g)
    for exps in ([1], [2], [20], [32], [33], [127], [252], [253], [32, 33, 100, 2], [253, 200, 33, 5]):
        big = max(exps) >= 200  # codes up to 1.0 (6.0 x 2^126 overflows fp32) and small activations: finite sums
        w = _mxfp4_with_scales(6, k, exps, g, 3 if big else 8)
        xs = x * 1e-3 if big else x
        want, got = linear(xs, w), native.qlinear(xs, w, isa=isa)
        scale = want.abs().amax(dim=-1, keepdim=True)
        assert bool((scale > 0).all()) and bool(torch.isfinite(want).all()), exps
        err = ((got - want).abs() / scale).max()
        assert float(err) <= 1e-5 if min(exps) >= 20 else float(err) <= 1e-3, (exps, float(err))
    w = _mxfp4_with_scales(4, k, [127, 255, 127, 127], g)  # a NaN scale in rows 0 and 3's second block
    want, got = linear(x, w), native.qlinear(x, w, isa=isa)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and bool(torch.isnan(got[:, 0]).all())
    finite = ~torch.isnan(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def _fp8_with_scales(n, k, exps, g):
    """An FP8 weight [n, k] of random e4m3 codes (every code but the NaN ones) and row-block scale bytes ``exps``
    (one per 128-row block, the same across its column blocks)."""
    codes = torch.randint(0, 254, (n, k), generator=g, dtype=torch.int32)
    codes = codes + (codes >= 0x7F).int()  # skip 0x7F (e4m3fn's NaN; 0xFF lies beyond the draw)
    data = codes.to(torch.uint8).view(torch.float8_e4m3fn)
    rb, cb = -(-n // 128), -(-k // 128)
    scale = torch.tensor(exps, dtype=torch.uint8)[:, None].expand(rb, cb).contiguous()
    return QuantizedWeight("f8e4m3", data, scale.view(torch.float8_e8m0fnu))


@needs_q
@pytest.mark.parametrize("isa", ISAS)
def test_qlinear_fp8_every_code_and_small_scales(isa):
    """Every e4m3 code (subnormals, the largest, negative zero) and row blocks whose scales would make
    products subnormal in bf16 arithmetic (quant.c keeps those blocks on the fp32 kernel: scale bytes below
    41), with ordinary and tiny activations, against the reference at each row's own magnitude."""
    isa = _isa(isa)
    g = torch.Generator().manual_seed(8)
    n, k = 384, 200
    w = _fp8_with_scales(n, k, [5, 41, 127], g)
    for xs in (torch.randn(3, k, generator=g), torch.randn(3, k, generator=g) * 1e-4):
        want, got = linear(xs, w), native.qlinear(xs, w, isa=isa)
        for b in range(3):  # each row block at its own magnitude (2^-122, 2^-86, 1)
            blk = slice(128 * b, 128 * (b + 1))
            scale = want[:, blk].abs().amax(dim=-1, keepdim=True)
            assert bool((scale > 0).all())
            err = float(((got[:, blk] - want[:, blk]).abs() / scale).max())
            assert err <= 1e-5, (b, err)


@needs_q
def test_quantised_products_name_a_bad_instruction_set():
    x = torch.randn(2, 64)
    w = _quant(torch.randn(8, 64), "mxfp4")
    with pytest.raises(ValueError, match="qlinear: unknown instruction set 'avx9' for the quantised products"):
        native.qlinear(x, w, isa="avx9")
    assert native.quant_isas()[-1] == "avx2" and set(native.quant_isas()) <= set(ISAS)
    args = _moe_case((2, 64, 32, 32, 4, 2), torch.float32)
    h, idx, w, perm, offsets, w13, w2, *shared = args
    with pytest.raises(ValueError, match="moe_decode_q: unknown instruction set 'avx512f'"):
        native.moe_decode_q(h.reshape(-1, 64), w.reshape(-1), perm.reshape(-1), offsets, w13, w2, shared, k=2,
                            limit=2.0, isa="avx512f")


def _op_cases(dtype, b, fmt):
    """(op, args, attrs) for one decode call of b tokens with quantised weights (widths: multiples of 32)."""
    g = torch.Generator().manual_seed(b)
    r = lambda *s, scale=0.2: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    q = lambda *s: _quant(torch.randn(*s, generator=g) * 0.2, fmt)  # noqa: E731
    hid, heads, d, rope_dim, yarn = 96, 4, 32, 16, (4.0, 64, 32, 1)
    x = r(b, 1, hid, scale=1.0)
    pos = torch.arange(b)[:, None] * 37 + 100
    rope = dict(rope_dim=rope_dim, theta=10000.0, yarn=yarn)
    keys = r(b, 100, d, scale=1.0)
    return [
        ("linear", (x, q(160, hid)), {}),
        ("o_proj", (r(b, 1, heads, d, scale=1.0), q(2 * 32, 2 * d), q(hid, 2 * 32)),
         dict(shape=(b, 1, 2, 2 * d), groups=2, out_shape=(b, 1, 2 * 32))),
        ("q_proj", (x, q(heads * d, hid), pos), dict(shape=(b, 1, heads, d), eps=1e-6, **rope)),
        ("kv_proj", (x, q(d, hid), (torch.rand(d, generator=g) + 0.5).to(dtype), pos), dict(eps=1e-6, **rope)),
        ("linear_rms_norm", (x, q(64, hid), (torch.rand(64, generator=g) + 0.5).to(dtype)), dict(eps=1e-6)),
        ("indexer", (r(b, 1, 64, scale=1.0), x, q(heads * d, 64), r(heads, hid), keys, pos),
         dict(shape=(b, 1, heads, d), topk=8, ratio=4, score_scale=d ** -0.5, weight_scale=heads ** -0.5,
              key_format=None, **rope)),
    ]


@needs_q
@pytest.mark.parametrize("fmt", ["f8e4m3", "mxfp4"])
@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_ops_with_quantised_weights_equal_references(dtype, b, fmt):
    for op, args, attrs in _op_cases(dtype, b, fmt):
        assert chosen(op, *args, phase="decode", **attrs) == "native-quant", op
        got = run(op, *args, impl="native-quant", phase="decode", **attrs)
        want = get_op(op).ref(*args, **attrs)
        if op == "indexer":  # the same rows selected (as a set)
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), op
            continue
        assert got.shape == want.shape and got.dtype == want.dtype, op
        scale = float(want.float().abs().max())
        if dtype == torch.float32:
            assert float((got - want).abs().max()) <= 1e-5 * scale, op
        else:  # the product rounded once to bf16 / fp16 in both, then (norm, RoPE) the same steps
            assert float((got.float() - want.float()).abs().max()) <= torch.finfo(dtype).eps * scale, op


# ---- the registry ------------------------------------------------------------------------------

@needs_q
def test_registry_binds_the_quantised_paths_for_decode_and_prefill_calls():
    args = _moe_case((4, 64, 32, 32, 8, 2), torch.float32)
    assert chosen("moe_ffn", *args, limit=2.0, phase="decode") == "native-quant"
    assert chosen("moe_ffn", *args, limit=2.0, phase="prefill") == "native-quant"
    plain = _moe_case((4, 64, 32, 32, 8, 2), torch.float32, fmt=None, shared_fmt=None)
    with pytest.raises(ValueError, match=r"native-quant declines .*routed expert weights are f32"):
        CPU.callable("moe_ffn", plain, {"limit": 2.0}, name="native-quant", phase="decode")
    mixed = list(args)
    mixed[7] = mixed[7].dequantize().bfloat16()  # one shared matrix plain (and not the activations' dtype)
    with pytest.raises(ValueError, match="native-quant declines .*shared expert weights are "):
        CPU.callable("moe_ffn", mixed, {"limit": 2.0}, name="native-quant", phase="decode")
    strided = list(args)
    w13 = args[5]
    strided[5] = QuantizedWeight("mxfp4", w13.data.transpose(0, 1).contiguous().transpose(0, 1), w13.scale)
    with pytest.raises(ValueError, match="native-quant declines .*operand 5 is a strided view"):
        CPU.callable("moe_ffn", strided, {"limit": 2.0}, name="native-quant", phase="decode")
    double = [a.double() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a for a in args]
    with pytest.raises(ValueError, match="native-quant declines .*h is f64"):
        CPU.callable("moe_ffn", double, {"limit": 2.0}, name="native-quant", phase="decode")
    # the dense products
    (_, (x, w), _), *_ = _op_cases(torch.float32, 2, "f8e4m3")
    assert chosen("linear", x, w, phase="decode") == "native-quant"
    assert chosen("linear", x, w, phase="prefill") == "native-quant"
    assert chosen("linear", x, w.dequantize(), phase="decode") == "native-decode"
    with pytest.raises(ValueError, match="native-quant declines .*no quantised weight"):
        CPU.callable("linear", (x, w.dequantize()), {}, name="native-quant", phase="decode")


# ---- a whole model -----------------------------------------------------------------------------

def test_a_release_format_model_decodes_the_same_tokens_as_the_reference(tmp_path):
    """FP8 attention and shared experts, MXFP4 routed experts (tests/official_writer.py): greedy
    decoding through the cpu backend (the quantised C paths bound for decode) gives the reference
    backend's tokens, and its decode logits agree to fp32 sum order (plus rare e4m3 re-rounding)."""
    from official_writer import write_official_checkpoint
    from v4c.model.build import build_graph
    from v4c.model.config import V4Config
    from v4c.model.presets import tiny_config_dict
    from v4c.model.random_weights import random_params

    cfg = V4Config.from_dict(tiny_config_dict())
    ck, _ = write_official_checkpoint(random_params(build_graph(cfg, "f32"), cfg, seed=3), tiny_config_dict(),
                                      tmp_path / "ck")
    art = v4c.compile(ck, tmp_path / "a.v4c")
    fast, ref = v4c.load(art, backend="cpu"), v4c.load(art, backend="reference")
    bound = {(r["op"], r["phase"]): r["implementation"] for r in fast.implementations()}
    for phase in ("decode", "prefill"):
        want = "native-quant" if native.quant_available() else ("decode" if phase == "decode" else "per-expert")
        assert bound[("moe_ffn", phase)] == want
    if native.quant_available():
        assert bound[("linear_rms_norm", "decode")] == "native-quant"
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    got, want = fast.generate(ids, 8), ref.generate(ids, 8)
    assert torch.equal(got, want), (got[:, 12:], want[:, 12:])
