"""The C MoE decode (native/moe.c, kernels in dots.c) against the op reference, for fp32, bf16 and fp16
weights on every instruction set this CPU has (AVX2 + FMA, AVX-512VL, AVX-512F, AVX512-BF16; the others are
skipped, and run on a CPU that has them): widths that are not multiples of the vector length, one to
hundreds of experts, top-k 1 to 8, 1 to 16 tokens, with and without a shared expert of its own width.

fp32 is held to 1e-5 of the reference (relative to the output's largest value); bf16 and fp16 to be at
least as close to an fp32 evaluation of the same inputs as the reference itself is, within a quarter of
the dtype's step (both round each product and activation step to the dtype; the C path sums the weighted
experts in fp32 and rounds once).
"""
import pytest
import torch

from impls import CPU, chosen
from v4c.backends.cpu import moe, native, wide
from v4c.backends.cpu.weight_views import WeightViews
from v4c.graph.ops.collective import ep_select
from v4c.graph.ops.fused import moe_ffn as ref_ffn
from v4c.graph.ops.fused import moe_router as ref_router

ISAS = ("avx2", "avx512vl", "avx512f", "avx512bf16")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ["f32", "bf16", "f16"]
# tokens, D, I, shared width (0: none), experts, top-k
SHAPES = [
    (1, 37, 13, 19, 5, 2),      # odd widths everywhere, the shared expert wider than the routed ones
    (1, 64, 32, 32, 1, 1),      # one expert, top-1
    (3, 100, 24, 24, 2, 2),     # two experts: every token hits both
    (8, 72, 40, 0, 64, 6),      # the benchmark's routing at batch 8, no shared expert
    (16, 48, 17, 9, 8, 8),      # top-8 of 8: each expert holds every token
    (5, 33, 7, 33, 300, 8),     # hundreds of experts, top-8
    (16, 130, 66, 66, 256, 1),  # 16 tokens, top-1 of 256 (widths past one 64-lane step, with tails)
    (2, 1, 3, 1, 3, 3),         # widths of one value
]
# a prefill's calls (up to moe.NATIVE_PREFILL_TOKENS tokens): tens of token rows an expert
PREFILL_SHAPES = [
    (64, 72, 40, 24, 2, 2),     # every token on both experts, and the shared expert
    (40, 37, 13, 19, 3, 2),     # odd widths; ~27 rows an expert
    (17, 100, 30, 0, 1, 1),     # one expert of 17 rows
    (96, 48, 17, 9, 32, 6),     # 32 experts top-6: ~18 rows each
    (25, 1, 7, 3, 2, 2),        # widths of one value
]


def _isa(isa: str, dtype) -> None:
    if isa == "avx512bf16" and dtype != torch.bfloat16:
        pytest.skip("AVX512-BF16 takes bf16 weights only")
    if isa not in native.dot_isas(dtype):
        pytest.skip(f"this CPU has no {isa} (it has {native.dot_isas(dtype) or 'none'})")


def _case(shape, dtype, seed=0):
    t, d, i, s, e, k = shape
    g = torch.Generator().manual_seed(seed)
    w13 = (torch.randn(e, 2 * i, d, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(e, d, i, generator=g) * 0.3).to(dtype)
    shared = [(torch.randn(*sz, generator=g) * 0.3).to(dtype) for sz in ((s, d), (s, d), (d, s))] if s else []
    h = torch.randn(t, 1, d, generator=g).to(dtype)
    routing = ref_router(h, torch.randn(e, d, generator=g).to(dtype), torch.randn(e, generator=g), topk=k,
                         scaling=1.5)
    return (h, *routing, w13, w2, *shared)


def _close(got, args, limit=2.0):
    want = ref_ffn(*args, limit=limit)
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.float32:
        scale = float(want.abs().max())
        err = float((got - want).abs().max()) / scale
        assert err <= 1e-5, f"fp32 error {err:.2e} of the output's scale"
        return
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    truth = ref_ffn(*up, limit=limit)
    scale = truth.abs().max()
    err_got, err_want = [float((x.float() - truth).abs().max() / scale) for x in (got, want)]
    slack = torch.finfo(want.dtype).eps / 4  # bf16 2^-9, fp16 2^-12
    assert err_got <= err_want + slack, f"{want.dtype} error {err_got:.2e} vs the reference's {err_want:.2e}"


def _run(args, isa=None, limit=2.0):
    h, idx, w, perm, offsets, w13, w2, *shared = args
    flat = h.reshape(-1, h.shape[-1])
    return native.moe_decode(flat, w.reshape(-1), perm.reshape(-1), offsets, w13, w2, shared, k=idx.shape[-1],
                             limit=limit, isa=isa).view_as(h)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "t{}-D{}-I{}-S{}-E{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ISAS)
def test_moe_decode_equals_reference(isa, dtype, shape):
    _isa(isa, dtype)
    args = _case(shape, dtype)
    _close(_run(args, isa), args)


@pytest.mark.parametrize("shape", PREFILL_SHAPES, ids=lambda s: "t{}-D{}-I{}-S{}-E{}-k{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ISAS[:3])
def test_moe_prefill_calls_equal_reference(isa, dtype, shape):
    _isa(isa, dtype)
    args = _case(shape, dtype, seed=3)
    for limit in (2.0, 0.3):  # (0.3: the clamps bite on most rows)
        _close(_run(args, isa, limit=limit), args, limit=limit)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_a_nan_gate_stays_nan(dtype):
    """The clamp of the gate keeps a NaN, as the reference's ``clamp(max=limit)`` does (the kernel had
    turned it into ``limit``, so a NaN gate gave a finite output): a token whose gate is inf - inf and
    whose up value is finite (clamped from inf) gives NaN on both."""
    if not native.moe_decode_available(dtype):
        pytest.skip("no C MoE on this CPU")
    inf = float("inf")
    h = torch.tensor([[[inf, inf]]]).to(dtype)
    w13 = torch.tensor([[[1.0, -1.0], [1.0, 1.0]]]).to(dtype)  # gate row: inf - inf; up row: inf (then clamped)
    w2 = torch.ones(1, 2, 1).to(dtype)
    idx, w = torch.zeros(1, 1, 1, dtype=torch.int64), torch.ones(1, 1, 1)
    perm, offsets = torch.zeros(1, dtype=torch.int64), torch.tensor([0, 1])
    args = (h, idx, w, perm, offsets, w13, w2)
    assert bool(ref_ffn(*args, limit=2.0).isnan().all())
    assert bool(_run(args).isnan().all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_avx512vl_moe_is_avx2_bit_for_bit(dtype):
    """AVX-512VL runs AVX2's sums on 32 registers (bigger blocks for a prefill's many rows an expert):
    the MoE's result is the same bits on both, decode and prefill calls alike."""
    have = native.dot_isas(dtype)
    if not {"avx2", "avx512vl"} <= set(have):
        pytest.skip(f"this CPU does not have both kernels (it has {have or 'none'})")
    for shape in SHAPES + PREFILL_SHAPES:
        args = _case(shape, dtype, seed=5)
        assert torch.equal(_run(args, "avx512vl", limit=0.5), _run(args, "avx2", limit=0.5)), shape


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ISAS)
def test_a_tokens_result_does_not_depend_on_the_call(isa, dtype):
    """Bit for bit the same whatever else the call holds: one token alone, or among 47 others that
    share its experts (a prompt chunked differently, a speculative verify step against plain decoding
    and a request alone or batched all rely on it)."""
    _isa(isa, dtype)
    g = torch.Generator().manual_seed(4)
    t, d, i, e, k = 48, 40, 24, 4, 2
    w13 = (torch.randn(e, 2 * i, d, generator=g) * 0.3).to(dtype)
    w2 = (torch.randn(e, d, i, generator=g) * 0.3).to(dtype)
    shared = [(torch.randn(*sz, generator=g) * 0.3).to(dtype) for sz in ((i, d), (i, d), (d, i))]
    h = torch.randn(t, 1, d, generator=g).to(dtype)
    gate, bias = torch.randn(e, d, generator=g).to(dtype), torch.randn(e, generator=g)
    idx, w, perm, offsets = ref_router(h, gate, bias, topk=k, scaling=1.5)
    whole = _run((h, idx, w, perm, offsets, w13, w2, *shared), isa)
    for r in (0, 17, 47):  # token r's own routing (not routed again: the router's GEMM may round otherwise)
        own = idx[r:r + 1].reshape(-1)
        one_perm = torch.argsort(own, stable=True)
        one_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(own, minlength=e).cumsum(0)])
        one = (h[r:r + 1], idx[r:r + 1], w[r:r + 1], one_perm, one_offsets, w13, w2, *shared)
        assert torch.equal(_run(one, isa), whole[r:r + 1]), r


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ISAS)
def test_moe_decode_expert_parallel_share_and_clamp(isa, dtype):
    """An expert-parallel rank's share (offsets not starting at 0, assignments past its last
    expert), a rank no token routes to, and a limit small enough that the clamps bite."""
    _isa(isa, dtype)
    h, idx, w, perm, offsets, w13, w2, *shared = _case((6, 45, 21, 21, 12, 3), dtype, seed=1)
    for lo, hi in ((3, 8), (0, 12)):
        sidx, sw, sperm, soffsets = ep_select(idx, w, experts=(lo, hi))
        args = (h, sidx, sw, sperm, soffsets, w13[lo:hi], w2[lo:hi], *shared)
        _close(_run(args, isa, limit=0.5), args, limit=0.5)
    bias = torch.zeros(12)
    bias[6:] = -100.0  # nobody picks experts 6..11: their rank has only the shared expert
    routing = ref_router(h, torch.randn(12, 45).to(dtype), bias, topk=3, scaling=1.5)
    sidx, sw, sperm, soffsets = ep_select(*routing[:2], experts=(6, 12))
    assert int(soffsets[-1] - soffsets[0]) == 0
    args = (h, sidx, sw, sperm, soffsets, w13[6:], w2[6:], *shared)
    _close(_run(args, isa), args)
    got = _run((h, sidx, sw, sperm, soffsets, w13[6:], w2[6:]), isa)
    assert (got == 0).all()  # no assignment, no shared expert: zeros


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_moe_decode_result_does_not_depend_on_the_thread_count(dtype):
    if not native.moe_decode_available(dtype):
        pytest.skip("no C MoE on this CPU")
    cases = [_case((8, 96, 48, 48, 16, 4), dtype, seed=2), _case((80, 64, 50, 30, 4, 2), dtype, seed=2)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        ones = [_run(args) for args in cases]
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            for args, one in zip(cases, ones):
                assert torch.equal(_run(args), one), threads
    finally:
        torch.set_num_threads(before)


def test_moe_decode_instruction_sets_are_named_and_checked():
    for dtype in DTYPES:
        isas = native.dot_isas(dtype)
        rest = list(isas[1:])  # the kernels' pick first (8 lanes for fp32 on AMD Zen 3 / 4), then ISAS' order reversed
        assert set(isas) <= set(ISAS) and len(set(isas)) == len(isas)
        assert rest == sorted(rest, key=ISAS.index, reverse=True)
    assert "avx512bf16" not in native.dot_isas(torch.float32) + native.dot_isas(torch.float16)
    assert native.dot_isas(torch.float64) == ()
    if not native.moe_decode_available(torch.float32):
        pytest.skip("no C MoE on this CPU")
    args = _case((2, 32, 16, 16, 4, 2), torch.float32)
    with pytest.raises(ValueError, match="unknown instruction set 'sse9' \\(avx2, avx512vl, avx512f, avx512bf16\\)"):
        _run(args, "sse9")
    with pytest.raises(RuntimeError, match="has no avx512bf16 kernel for Float weights"):
        _run(args, "avx512bf16")
    with pytest.raises(TypeError, match="moe_decode: w2 must be Float, got BFloat16"):
        h, idx, w, perm, offsets, w13, w2, *shared = args
        _run((h, idx, w, perm, offsets, w13, w2.bfloat16(), *shared))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backend_binds_the_c_path_for_decode_calls_of_any_width(dtype):
    args = _case((4, 37, 13, 19, 5, 2), dtype)
    want = "native-decode" if native.moe_decode_available(dtype) else "decode"
    assert chosen("moe_ffn", *args, limit=2.0, phase="decode") == want
    # a prefill: the C kernel too (up to moe.NATIVE_PREFILL_TOKENS tokens), but for bf16 (fp16) on a CPU with
    # bf16 (fp16) arithmetic, where PyTorch's GEMMs are taken; without it the GEMMs widen (`wide`)
    plain_half = dtype != torch.float32 and wide.native_half(dtype) is None
    c = native.moe_decode_available(dtype) and (dtype == torch.float32 or plain_half)
    want = ("native-wide-prefill" if plain_half else "native-prefill") if c else \
        ("wide-prefill" if plain_half else "grouped")
    if dtype == torch.bfloat16 and native.moe_decode_available(dtype) and wide.native_bf16() == "avx512_bf16":
        want = "native-bf16-prefill"  # its small calls (below)
    assert chosen("moe_ffn", *args, limit=2.0, phase="prefill") == want
    double = [a.double() if isinstance(a, torch.Tensor) and a.dtype == dtype else a for a in args]
    with pytest.raises(ValueError, match="native-decode declines .*activations are f64 \\(the C products take f32, bf16, f16\\)"):
        CPU.callable("moe_ffn", double, {"limit": 2.0}, name="native-decode", phase="decode")
    mixed = list(args)
    mixed[5] = mixed[5].to(torch.bfloat16 if dtype == torch.float32 else torch.float32)
    with pytest.raises(ValueError, match="native-decode declines .*an expert weight is"):
        CPU.callable("moe_ffn", mixed, {"limit": 2.0}, name="native-decode", phase="decode")


@pytest.mark.skipif(not native.moe_decode_available(torch.bfloat16), reason="no C MoE on this CPU")
def test_bf16_prefill_on_avx512_bf16_takes_the_c_kernel_for_small_calls(monkeypatch):
    """Where the CPU's bf16 arithmetic is AVX512-BF16, PyTorch's bf16 GEMMs lead only on long calls: a bf16
    prefill's calls of up to NATIVE_BF16_PREFILL_TOKENS take the C kernel (a token's bits as in a decode step),
    longer ones the grouped GEMMs. AMX, or no bf16 arithmetic, keeps the paths it had."""
    args = _case((96, 48, 17, 9, 32, 6), torch.bfloat16, seed=9)
    monkeypatch.setattr(wide, "native_bf16", lambda: "avx512_bf16")
    assert chosen("moe_ffn", *args, limit=2.0, phase="prefill") == "native-bf16-prefill"
    fn = CPU.callable("moe_ffn", args, {"limit": 2.0}, name="native-bf16-prefill", phase="prefill",
                      ctx=WeightViews())
    assert torch.equal(fn(*args, limit=2.0), _run(args))  # 96 tokens: the C kernel
    _close(fn(*args, limit=2.0), args)
    monkeypatch.setattr(moe, "NATIVE_BF16_PREFILL_TOKENS", 95)  # one token past it: the grouped GEMMs
    want = moe.moe_grouped(*args, limit=2.0, views=WeightViews())
    assert torch.equal(fn(*args, limit=2.0), want) and not torch.equal(want, _run(args))
    monkeypatch.setattr(wide, "native_bf16", lambda: "amx_bf16")
    assert chosen("moe_ffn", *args, limit=2.0, phase="prefill") == "grouped"
    with pytest.raises(ValueError, match="native-bf16-prefill declines .*this CPU's bf16 arithmetic is amx_bf16, "
                                         "not avx512_bf16"):
        CPU.callable("moe_ffn", args, {"limit": 2.0}, name="native-bf16-prefill", phase="prefill")
    f32 = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
    monkeypatch.setattr(wide, "native_bf16", lambda: "avx512_bf16")
    assert chosen("moe_ffn", *f32, limit=2.0, phase="prefill") == "native-prefill"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_token_rows_in_any_leading_shape(dtype):
    """A call's ``[B, T, D]`` rows and ``[B, T, k]`` routing, as the router hands them over, give the bits of the
    flattened call in ``h``'s shape (the backend passes them unreshaped); a rank with no rows is a clear error."""
    args = _case((6, 40, 24, 16, 8, 3), dtype, seed=4)
    h, idx, w, perm, offsets, w13, w2, *shared = args
    b = h.reshape(2, 3, h.shape[-1])
    got = native.moe_decode(b, w.reshape(2, 3, -1), perm.reshape(2, 3, -1), offsets, w13, w2, shared,
                            k=idx.shape[-1], limit=2.0)
    assert got.shape == b.shape and torch.equal(got.reshape(h.shape), _run(args))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., D\] token rows, got shape \[40\]"):
        native.moe_decode(h.reshape(-1)[:40], w, perm, offsets, w13, w2, shared, k=idx.shape[-1], limit=2.0)
