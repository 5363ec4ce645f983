"""The torch backend's MoE ops (router, expert FFN) and linear_rms_norm against their references at decode sizes.

The router does the reference's arithmetic in fewer calls, so its outputs are compared exactly
(both sides run under the same GEMM kernel choice). The FFN's decode path sums in another order
(the shared expert first, one product for the weighted sum), so in bf16 it is held to be at
least as close to an fp32 evaluation as the reference itself is; in fp32 it equals it to 1e-5.
"""
import gc
import weakref

import pytest
import torch

from v4c.graph.ops.collective import ep_select
from v4c.graph.ops.fused import moe_ffn as ref_ffn
from v4c.graph.ops.fused import moe_router as ref_router
from v4c.graph.weight_formats import quantize_fp8_block
from v4c.graph.weights import QuantizedWeight
from impls import CPU, chosen, run
from v4c.backends.cpu import native
from v4c.backends.cpu.router import moe_router
from v4c.backends.cpu.weight_views import WeightViews

E, D, I, K = 16, 64, 32, 4
SHAPES = [(1, 1), (8, 1), (2, 3)]  # B=1 and B=8 decode steps, a short chunk


def _weights(g, dtype, shared_width=I):
    w13 = torch.randn(E, 2 * I, D, generator=g) * 0.3
    w2 = torch.randn(E, D, I, generator=g) * 0.3
    shared = [torch.randn(shared_width, D, generator=g) * 0.3, torch.randn(shared_width, D, generator=g) * 0.3,
              torch.randn(D, shared_width, generator=g) * 0.3]
    return w13.to(dtype), w2.to(dtype), [s.to(dtype) for s in shared]


def _check(got, want, args):
    if want.dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
        return
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    truth = ref_ffn(*up, limit=2.0)
    scale = truth.abs().max()
    err_got, err_want = [float((x.float() - truth).abs().max() / scale) for x in (got, want)]
    assert err_got <= err_want + 2 ** -8, f"bf16 error {err_got:.2e} vs the reference's {err_want:.2e}"


def test_router_is_registered():
    """A decode call's product runs in C where the CPU has the kernels (test_native_dense), a prefill's
    on PyTorch's GEMM."""
    assert CPU.impl("moe_router", "torch").fn is moe_router
    args = (torch.zeros(1, 1, D), torch.zeros(E, D), torch.zeros(E))
    decode = "native-decode" if native.moe_decode_available(torch.float32) else "torch"
    assert chosen("moe_router", *args, topk=K, scaling=1.0, phase="decode") == decode
    assert chosen("moe_router", *args, topk=K, scaling=1.0, phase="prefill") == "torch"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("hashed", [False, True])
def test_moe_router_equals_reference(dtype, shape, hashed):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(*shape, D, generator=g).to(dtype)
    w = torch.randn(E, D, generator=g).to(dtype)
    if hashed:
        table = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(50)]).int()
        ids = torch.randint(0, 50, shape, generator=g)
        ids[-1, -1] = -1  # a padding row's id
        args, attrs = (h, w, table, ids), {"hash": True, "scaling": 1.5}
    else:
        args, attrs = (h, w, torch.randn(E, generator=g) * 0.5), {"topk": K, "scaling": 1.5}
    want, got = ref_router(*args, **attrs), moe_router(*args, **attrs)
    for name, x, y in zip(("experts", "weights", "permutation", "offsets"), got, want):
        assert x.dtype == y.dtype and torch.equal(x, y), name


def test_moe_router_quantised_weight_equals_reference():
    g = torch.Generator().manual_seed(6)
    h = torch.randn(8, 1, 128, generator=g)
    w = QuantizedWeight("f8e4m3", *quantize_fp8_block(torch.randn(E, 128, generator=g)))
    bias = torch.randn(E, generator=g)
    for x, y in zip(moe_router(h, w, bias, topk=K, scaling=2.0), ref_router(h, w, bias, topk=K, scaling=2.0)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("case", ["shared", "no_shared", "wide_shared", "ep", "ep_idle", "no_budget"])
@pytest.mark.parametrize("path", ["native-decode", "decode"])
def test_moe_ffn_decode_path_equals_reference(dtype, shape, case, path):
    """The decode paths (the C call where the CPU has AVX2 + FMA or AVX-512, and the PyTorch one) for
    every shape of the shared expert and expert-parallel share of the routing (``ep_idle``: a
    rank none of the tokens routes to; ``no_budget``: shared gate/up not concatenated)."""
    if path == "native-decode" and not native.moe_decode_available(dtype):
        pytest.skip("the C MoE needs AVX2 + FMA or AVX-512F")
    g = torch.Generator().manual_seed(2)
    w13, w2, shared = _weights(g, dtype, 2 * I if case == "wide_shared" else I)
    h = torch.randn(*shape, D, generator=g).to(dtype)
    bias = torch.zeros(E)
    bias[12:] = -100.0  # experts 12.. are never picked: the rank owning them idles
    idx, w, perm, offsets = ref_router(h, torch.randn(E, D, generator=g).to(dtype), bias, topk=K, scaling=1.5)
    if case in ("ep", "ep_idle"):
        lo, hi = (2, 9) if case == "ep" else (12, E)
        idx, w, perm, offsets = ep_select(idx, w, experts=(lo, hi))
        w13, w2 = w13[lo:hi], w2[lo:hi]
    if case == "no_shared":
        shared = []
    views = WeightViews(budget=0 if case == "no_budget" else 1 << 30)
    args = (h, idx, w, perm, offsets, w13, w2, *shared)
    want = ref_ffn(*args, limit=2.0)
    fn = CPU.callable("moe_ffn", args, {"limit": 2.0}, name=path, ctx=views)
    assert (views.concat_bytes > 0) == (path == "decode" and case not in ("no_shared", "no_budget"))
    for _ in range(2):  # the second call reuses the expert views and [gate; up] made when it was bound
        got = fn(*args, limit=2.0)
        assert got.shape == want.shape and got.dtype == want.dtype
        _check(got, want, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["shared", "no_shared", "ep"])
def test_a_long_prefills_experts_in_parts_are_the_same_bits(dtype, case, monkeypatch):
    """The grouped path runs a long call's experts in parts of about PART_ROWS assignments (small buffers
    the allocator reuses): in any parts, the same bits as in one piece (bf16 sums kept in fp32 across the
    parts, as index_add_ keeps them in one call), and close to the reference."""
    from v4c.backends.cpu import moe
    g = torch.Generator().manual_seed(4)
    w13, w2, shared = _weights(g, dtype)
    h = torch.randn(3, 40, D, generator=g).to(dtype)
    idx, w, perm, offsets = ref_router(h, torch.randn(E, D, generator=g).to(dtype), torch.zeros(E), topk=K,
                                       scaling=1.5)
    if case == "ep":
        idx, w, perm, offsets = ep_select(idx, w, experts=(3, 11))
        w13, w2 = w13[3:11], w2[3:11]
    args = (h, idx, w, perm, offsets, w13, w2, *(shared if case != "no_shared" else []))
    views = WeightViews()
    fn = CPU.callable("moe_ffn", args, {"limit": 2.0}, name="grouped", ctx=views)
    whole = fn(*args, limit=2.0)
    _check(whole, ref_ffn(*args, limit=2.0), args)
    for rows in (1, 25, 100):  # one expert a part, a few, about half
        monkeypatch.setattr(moe, "PART_ROWS", rows)
        assert len(moe._parts([(e, a, b) for e, (a, b) in enumerate(zip(offsets[:-1].tolist(), offsets[1:].tolist()))
                               if a < b])) > 1
        assert torch.equal(fn(*args, limit=2.0), whole), rows


def test_moe_ffn_decode_native_takes_both_dtypes_and_any_width():
    """Where the CPU has a kernel, the C call takes fp32 and bf16 decode steps and widths that are not
    multiples of the vector length, and gives the same result on 1-4 threads (each token's sum runs
    in assignment order). (Every instruction set and shape: test_native_moe.)"""
    if not native.moe_decode_available(torch.float32):
        pytest.skip("the C MoE needs AVX2 + FMA or AVX-512F")
    g = torch.Generator().manual_seed(5)
    w13, w2, shared = _weights(g, torch.bfloat16)
    h = torch.randn(8, 1, D, generator=g).to(torch.bfloat16)
    routing = ref_router(h, torch.randn(E, D, generator=g).to(torch.bfloat16), torch.zeros(E), topk=K, scaling=1.5)
    fp32 = (h.float(), *routing, w13.float(), w2.float(), *[s.float() for s in shared])
    narrow = (h, *routing, w13[:, :42].contiguous(), w2[:, :, :21].contiguous())
    args = (h, *routing, w13, w2, *shared)
    for case in (fp32, narrow, args):
        assert chosen("moe_ffn", *case, limit=2.0) == "native-decode"
        _check(run("moe_ffn", *case, limit=2.0), ref_ffn(*case, limit=2.0), case)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run("moe_ffn", *args, limit=2.0)
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            assert torch.equal(run("moe_ffn", *args, limit=2.0), one), threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_ffn_decode_repeated_expert_and_idle_rank(dtype):
    """A hash table row may name an expert twice (two rows for one expert from one token), and a
    rank can hold no assignment at all (then only the shared expert, or zeros)."""
    g = torch.Generator().manual_seed(3)
    w13, w2, shared = _weights(g, dtype)
    h = torch.randn(1, 1, D, generator=g).to(dtype)
    table = torch.tensor([[3, 7, 3, 1]], dtype=torch.int32)
    idx, w, perm, offsets = ref_router(h, torch.randn(E, D, generator=g).to(dtype), table,
                                       torch.zeros(1, 1, dtype=torch.long), hash=True, scaling=1.5)
    args = (h, idx, w, perm, offsets, w13, w2, *shared)
    _check(run("moe_ffn", *args, limit=2.0), ref_ffn(*args, limit=2.0), args)
    idx, w, perm, offsets = ep_select(idx, w, experts=(8, 12))
    assert int(offsets[-1]) == 0
    for sh in (shared, []):
        args = (h, idx, w, perm, offsets, w13[8:12], w2[8:12], *sh)
        got = run("moe_ffn", *args, limit=2.0)
        if sh:
            _check(got, ref_ffn(*args, limit=2.0), args)
        else:  # no assignment and no shared expert: zeros
            assert got.shape == h.shape and (got == 0).all()


def test_moe_ffn_decode_rejects_unsorted_offsets():
    g = torch.Generator().manual_seed(7)
    w13, w2, shared = _weights(g, torch.float32)
    h = torch.randn(1, 1, D, generator=g)
    idx, w, perm, offsets = ref_router(h, torch.randn(E, D, generator=g), torch.zeros(E), topk=K, scaling=1.5)
    offsets = offsets.clone()
    offsets[3] = 50
    with pytest.raises(ValueError, match="moe_ffn: expert offsets must be non-decreasing"):
        run("moe_ffn", h, idx, w, perm, offsets, w13, w2, *shared, limit=2.0)


@pytest.mark.parametrize("tokens", [1, 24])  # a decode step, a prefill
def test_moe_ffn_quantised_experts_take_the_general_path(tokens):
    g = torch.Generator().manual_seed(4)
    w13, w2, shared = _weights(g, torch.float32)
    q13 = [quantize_fp8_block(w13[e]) for e in range(E)]
    q2 = [quantize_fp8_block(w2[e]) for e in range(E)]
    w13q = QuantizedWeight("f8e4m3", torch.stack([d for d, _ in q13]), torch.stack([s for _, s in q13]))
    w2q = QuantizedWeight("f8e4m3", torch.stack([d for d, _ in q2]), torch.stack([s for _, s in q2]))
    h = torch.randn(1, tokens, D, generator=g)
    routing = ref_router(h, torch.randn(E, D, generator=g), torch.zeros(E), topk=K, scaling=1.5)
    args = (h, *routing, w13q, w2q, *shared)
    want = ref_ffn(*args, limit=2.0)
    # the quantised C path (native/quant.c, tests/test_native_quant.py) where it runs, any phase
    quant_c = native.quant_available()
    assert chosen("moe_ffn", *args, limit=2.0) == ("native-quant" if quant_c else "per-expert")
    assert torch.allclose(run("moe_ffn", *args, limit=2.0), want, rtol=1e-5, atol=1e-5)
    # the quantised product differs from the plain one: the weights really went through weights.linear
    assert not torch.allclose(ref_ffn(h, *routing, w13, w2, *shared, limit=2.0), want, rtol=1e-4, atol=1e-4)


def test_weight_views_are_made_once_per_model_within_its_budget():
    views, other = WeightViews(), WeightViews(budget=0)
    w, a, b = torch.randn(4, 3, 2), torch.randn(3, 2), torch.randn(5, 2)
    t = views.transposed(w)
    assert views.transposed(w) is t and all(torch.equal(v, w[e].T) for e, v in enumerate(t))
    assert torch.equal(views.transposed(a), a.T)
    both = views.rows_concat_t(a, b)
    assert views.rows_concat_t(a, b) is both and torch.equal(both, torch.cat((a, b)).T)
    assert views.rows_concat_t(a, torch.randn(5, 2)) is None  # `a` is already paired with `b`
    assert views.concat_bytes == both.nbytes
    # another model's views: its own entries and budget, whatever this one holds
    assert other.rows_concat_t(a, b) is None and other.concat_bytes == 0
    assert other.transposed(w) is not t
    with pytest.raises(ValueError, match="expected a 2-D or stacked 3-D weight"):
        views.transposed(torch.zeros(2, 2, 2, 2))
    ref = weakref.ref(views)
    del views, t, both
    gc.collect()
    assert ref() is None  # nothing global holds a model's views


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 37])
def test_linear_rms_norm_equals_reference_bitwise(dtype, rows):
    """Not MoE, but the other per-layer op of a decode step this file's module set covers."""
    from v4c.graph.registry import get_op
    from v4c.backends.cpu.linear_norm import linear_rms_norm
    assert CPU.impl("linear_rms_norm", "torch").fn is linear_rms_norm
    ref = get_op("linear_rms_norm").ref
    g = torch.Generator().manual_seed(5)
    x = torch.randn(rows, 1, 96, generator=g).to(dtype)
    w, nw = torch.randn(40, 96, generator=g).to(dtype), torch.rand(40, generator=g).to(dtype)
    assert torch.equal(linear_rms_norm(x, w, nw, eps=1e-6), ref(x, w, nw, eps=1e-6))
    data, scale = quantize_fp8_block(torch.randn(40, 96, generator=g))
    qw = QuantizedWeight("f8e4m3", data, scale)  # through weights.linear, as the reference
    assert torch.equal(linear_rms_norm(x, qw, nw, eps=1e-6), ref(x, qw, nw, eps=1e-6))
