"""A decode step's dense products in C (native/linear.c on the kernels of dots.c): ``native.linear``
against PyTorch's product for fp32, bf16 and fp16 on every instruction set this CPU has (the others
skipped), odd widths, groups; and the cpu backend's ``native-decode`` implementations of the ops that
hold a product (linear, o_proj, q_proj, kv_proj, linear_rms_norm, moe_router, indexer) against their
references, bound for decode calls only.

fp32: within 1e-5 of the output's scale (the sums run in another order); bf16 / fp16: each output is the
fp32 sum rounded once, as PyTorch's product gives it, so within one rounding step of the dtype.
"""
import pytest
import torch

from impls import CPU, chosen, run
from v4c.backends.cpu import native
from v4c.graph.registry import get_op
from v4c.graph.weight_formats import quantize_fp8_block
from v4c.graph.weights import QuantizedWeight

ISAS = ("avx2", "avx512vl", "avx512f", "avx512bf16")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ["f32", "bf16", "f16"]
needs_c = pytest.mark.skipif(not native.moe_decode_available(torch.float32),
                             reason="the C products need AVX2 + FMA or AVX-512F")


def _close(got, want, what=""):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    scale = float(want.float().abs().max()) or 1.0
    tol = 1e-5 if want.dtype == torch.float32 else torch.finfo(want.dtype).eps  # bf16 2^-7, fp16 2^-10
    err = float((got.float() - want.float()).abs().max()) / scale
    assert err <= tol, f"{what}: error {err:.2e} of the output's scale"


@pytest.mark.parametrize("t,n,k,groups", [(1, 37, 45, 1), (3, 300, 7, 1), (16, 5, 130, 1), (2, 1, 1, 1),
                                          (4, 66, 33, 3), (1, 8, 64, 4)])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ISAS)
def test_linear_equals_the_product(isa, dtype, t, n, k, groups):
    if isa not in native.dot_isas(dtype):
        pytest.skip(f"this CPU has no {isa} kernel for {dtype} (it has {native.dot_isas(dtype) or 'none'})")
    g = torch.Generator().manual_seed(t * n + k)
    w = torch.randn(groups * n, k, generator=g).to(dtype)
    if groups == 1:
        x = torch.randn(2, t, k, generator=g).to(dtype)
        want = (x.float() @ w.float().T).to(dtype)
    else:
        x = torch.randn(t, groups, k, generator=g).to(dtype)
        want = torch.einsum("tgk,grk->tgr", x.float(), w.float().view(groups, n, k)).to(dtype)
    _close(native.linear(x, w, groups, isa=isa), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("isa", ISAS)
def test_a_rows_bits_do_not_depend_on_how_many_rows_the_call_holds(isa, dtype):
    """A block of 4 weight rows x RC token rows ends in 4 x RC lane sums, some reduced eight at once and the
    rest one by one (reduce512.h for the 16-lane kernels, dots.c's 8-lane one for AVX-512VL): the same
    additions in the same order, so each call size (1 to 13 rows: every remainder of the blocks) gives
    every row the bits it has alone."""
    if isa not in native.dot_isas(dtype):
        pytest.skip(f"this CPU has no {isa} kernel for {dtype} (it has {native.dot_isas(dtype) or 'none'})")
    g = torch.Generator().manual_seed(11)
    x, w = torch.randn(13, 1, 200, generator=g).to(dtype), torch.randn(203, 200, generator=g).to(dtype)
    alone = torch.cat([native.linear(x[r:r + 1], w, isa=isa) for r in range(13)])
    for t in range(2, 14):
        assert torch.equal(native.linear(x[:t], w, isa=isa), alone[:t]), t


@needs_c
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_does_not_depend_on_the_thread_count_or_the_other_rows(dtype):
    """Each output is one row's sum in a fixed order, whichever thread computes it and whatever the
    other token rows of the call (the kernels block rows differently for one or two token rows than
    for more)."""
    g = torch.Generator().manual_seed(9)
    x, w = torch.randn(9, 1, 300, generator=g).to(dtype), torch.randn(1000, 300, generator=g).to(dtype)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.linear(x, w)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(native.linear(x, w), one), threads
    finally:
        torch.set_num_threads(before)
    for rows in (slice(0, 1), slice(3, 5), slice(2, 5)):
        assert torch.equal(native.linear(x[rows].contiguous(), w), one[rows])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_avx512vl_is_avx2_on_more_registers(dtype):
    """The AVX-512VL kernels block 4 weight rows x up to 6 token rows (AVX2's: x 3) and reduce eight
    sums at once: the same additions in the same order, so the same bits for any number of token rows
    (every remainder of 6), widths with tails (K not a multiple of 8) and row counts not multiples of 4."""
    have = native.dot_isas(dtype)
    if not {"avx2", "avx512vl"} <= set(have):
        pytest.skip(f"this CPU does not have both kernels (it has {have or 'none'})")
    g = torch.Generator().manual_seed(11)
    for n, k in ((37, 45), (66, 136), (8, 7), (129, 256)):
        w = torch.randn(n, k, generator=g).to(dtype)
        for t in (*range(1, 15), 25, 96):
            x = torch.randn(t, k, generator=g).to(dtype)
            assert torch.equal(native.linear(x, w, isa="avx512vl"), native.linear(x, w, isa="avx2")), (n, k, t)


@pytest.mark.parametrize("isa", ISAS[:3])
def test_fp16_values_widen_and_round_as_pytorch_converts_them(isa):
    """Every fp16 value (subnormals, infinities, NaNs) times weights that keep the product exact in fp32 (so the
    only difference could be the conversions): 1 (widened and stored back), 0.5 (ties below the smallest normal),
    3, 1/3 (rounded), powers of two that push values into subnormals or past 65504 (to infinity), and 65504
    itself. The C code widens by F16C (weights) and in C (token rows), and rounds in C to nearest even, as
    PyTorch's ``.half()`` does; only the sign of a zero differs (the sums start from +0)."""
    if isa not in native.dot_isas(torch.float16):
        pytest.skip(f"this CPU has no {isa} kernel for fp16 (it has {native.dot_isas(torch.float16) or 'none'})")
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16).reshape(-1, 1)
    w = torch.tensor([1.0, 0.5, 3.0, 1 / 3, 2 ** -10, 2 ** 10, -1.5, 2 ** -24, 65504.0]).half().reshape(-1, 1)
    got, want = native.linear(x, w, isa=isa), (x.float() @ w.float().T).half()
    same = (got.view(torch.int16) == want.view(torch.int16)) | (got.isnan() & want.isnan()) | ((got == 0) & (want == 0))
    assert bool(same.all()), [(x[r].item(), w[c].item(), got[r, c].item(), want[r, c].item())
                              for r, c in (~same).nonzero()[:4].tolist()]
    assert int(want.isnan().sum()) > 2000 and int(want.isinf().sum()) > 2000  # both kinds were exercised


@needs_c
def test_linear_names_bad_operands():
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(TypeError, match="linear: w must be Float, got BFloat16"):
        native.linear(x, w.bfloat16())
    with pytest.raises(ValueError, match=r"linear: x must be \[\.\.\., 8\], got shape \[2, 9\]"):
        native.linear(torch.randn(2, 9), w)
    with pytest.raises(ValueError, match=r"linear: w must be \[groups \* R, K\] with groups = 2, got shape \[3, 8\]"):
        native.linear(torch.randn(2, 2, 8), w, 2)
    with pytest.raises(ValueError, match=r"linear: x must be \[\.\.\., groups, 8\], got shape \[2, 3, 8\]"):
        native.linear(torch.randn(2, 3, 8), torch.randn(4, 8), 2)
    with pytest.raises(ValueError, match="unknown instruction set 'neon'"):
        native.linear(x, w, isa="neon")


def _op_cases(dtype, b):
    """(op, args, attrs, how to compare) for one decode call of b tokens."""
    g = torch.Generator().manual_seed(b)
    r = lambda *s, scale=0.2: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    hid, heads, d, rope_dim, yarn = 72, 4, 32, 16, (4.0, 64, 32, 1)
    x = r(b, 1, hid, scale=1.0)
    pos = torch.arange(b)[:, None] * 37 + 100
    rope = dict(rope_dim=rope_dim, theta=10000.0, yarn=yarn)
    keys = r(b, 100, d, scale=1.0)  # (rows for every position: up to 359 // 4)
    return [
        ("linear", (x, r(50, hid)), {}),
        ("o_proj", (r(b, 1, heads, d, scale=1.0), r(2 * 24, 2 * d), r(hid, 2 * 24)),
         dict(shape=(b, 1, 2, 2 * d), groups=2, out_shape=(b, 1, 2 * 24))),
        ("q_proj", (x, r(heads * d, hid), pos), dict(shape=(b, 1, heads, d), eps=1e-6, **rope)),
        ("kv_proj", (x, r(d, hid), (torch.rand(d, generator=g) + 0.5).to(dtype), pos), dict(eps=1e-6, **rope)),
        ("linear_rms_norm", (x, r(40, hid), (torch.rand(40, generator=g) + 0.5).to(dtype)), dict(eps=1e-6)),
        ("moe_router", (x, r(16, hid), torch.randn(16, generator=g)), dict(topk=4, scaling=1.5)),
        ("indexer", (r(b, 1, 40, scale=1.0), x, r(heads * d, 40), r(heads, hid), keys, pos),
         dict(shape=(b, 1, heads, d), topk=8, ratio=4, score_scale=d ** -0.5, weight_scale=heads ** -0.5,
              key_format=None, **rope)),
    ]


@needs_c
@pytest.mark.parametrize("b", [1, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_decode_ops_with_c_products_equal_references(dtype, b):
    if not native.moe_decode_available(dtype):
        pytest.skip(f"no C products for {dtype} here")
    for op, args, attrs in _op_cases(dtype, b):
        assert chosen(op, *args, phase="decode", **attrs) == "native-decode", op
        got = run(op, *args, impl="native-decode", phase="decode", **attrs)
        want = get_op(op).ref(*args, **attrs)
        if op == "moe_router":  # the same experts, weights and schedule
            assert torch.equal(got[0].sort(-1).values, want[0].sort(-1).values) and torch.equal(got[3], want[3])
            _close(got[1].gather(-1, got[0].argsort(-1)), want[1].gather(-1, want[0].argsort(-1)), op)
        elif op == "indexer":  # the same rows selected (as a set)
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), op
        else:
            _close(got, want, op)


@needs_c
@pytest.mark.parametrize("b", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_one_call_projections_are_the_two_calls_bit_for_bit(dtype, b):
    """The decode paths of o_proj, q_proj, kv_proj, linear_rms_norm and the indexer run their products and what
    follows in one C call (``o_proj_step``, ``linear_norm_rope``, ``indexer_step``): the same bits as the C calls
    one by one."""
    if not native.moe_decode_available(dtype):
        pytest.skip(f"no C products for {dtype} here")
    from v4c.backends.cpu.rope import rotations
    cases = {op: (args, attrs) for op, args, attrs in _op_cases(dtype, b)}
    (o, wa, wb), a = cases["o_proj"]
    z = native.linear(o.reshape(a["shape"]).contiguous(), wa, a["groups"])
    want = native.linear(z.reshape(a["out_shape"]), wb)
    assert torch.equal(run("o_proj", o, wa, wb, impl="native-decode", phase="decode", **a), want)
    for heads in (o, o.reshape(b, 1, -1)):  # [B, T, H, D] or [B, T, H * D]: viewed as [B, T, groups, K] in C++
        assert torch.equal(native.o_proj_step(heads, wa, a["groups"], wb, 2, [a["out_shape"][-1]]), want)
    n = o[0, 0].numel()
    with pytest.raises(ValueError, match=rf"x's {n} values a row are not {n + 1} groups"):
        native.o_proj_step(o, wa, n + 1, wb, 2, [a["out_shape"][-1]])
    (x, w, pos), a = cases["q_proj"]
    rot = rotations(pos, a["rope_dim"], a["theta"], a["yarn"])
    want = native.norm_rope_(native.linear(x, w).reshape(a["shape"]).contiguous(), None, a["eps"], a["rope_dim"], rot)
    assert torch.equal(run("q_proj", x, w, pos, impl="native-decode", phase="decode", **a), want)
    (x, w, nw, pos), a = cases["kv_proj"]
    want = native.norm_rope_(native.linear(x, w), nw, a["eps"], a["rope_dim"], rot)
    assert torch.equal(run("kv_proj", x, w, nw, pos, impl="native-decode", phase="decode", **a), want)
    (x, w, nw), a = cases["linear_rms_norm"]
    want = native.norm_rope_(native.linear(x, w), nw, a["eps"], 0, None)
    assert torch.equal(run("linear_rms_norm", x, w, nw, impl="native-decode", phase="decode", **a), want)
    (cq, h, wq, ww, keys, pos), a = cases["indexer"]
    from v4c.backends.cpu.rope import rope_
    q = rope_(native.linear(cq, wq).reshape(a["shape"]), pos, a["rope_dim"], a["theta"], a["yarn"])
    want = native.indexer_topk(q, native.linear(h, ww), keys, pos, a["topk"], a["ratio"],
                               a["weight_scale"] * a["score_scale"])
    assert torch.equal(run("indexer", cq, h, wq, ww, keys, pos, impl="native-decode", phase="decode", **a), want)
    with pytest.raises(ValueError, match="72 outputs are not 5 heads"):
        native.linear_norm_rope(x, torch.zeros(72, x.shape[-1], dtype=dtype), 5, None, 1e-6, 0, None)


@needs_c
def test_c_products_bind_for_decode_calls_of_plain_weights_only():
    (_, args, attrs), = [c for c in _op_cases(torch.float32, 2) if c[0] == "q_proj"]
    assert chosen("q_proj", *args, phase="prefill", **attrs) == "native"
    x, w, pos = args
    qw = QuantizedWeight("f8e4m3", *quantize_fp8_block(w))
    # a quantised weight: the quantised C product (native/quant.c, tests/test_native_quant.py) where it runs
    assert chosen("q_proj", x, qw, pos, phase="decode", **attrs) == ("native-quant" if native.quant_available()
                                                                     else "native")
    with pytest.raises(ValueError, match="native-decode declines .*a weight is f8e4m3, not the activations' f32"):
        CPU.callable("q_proj", (x, qw, pos), attrs, name="native-decode", phase="decode")
    with pytest.raises(ValueError, match="native-decode declines .*a weight is bf16, not the activations' f32"):
        CPU.callable("linear", (x, w.bfloat16()), {}, name="native-decode", phase="decode")
