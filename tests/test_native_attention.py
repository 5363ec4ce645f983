"""The C attention (``native.attention``, used by the torch backend for plain caches) against the
op's reference at prefill and decode sizes: every kind, fp32 and bf16, a wrapped ring holding a
stale row, padding, positions that are not consecutive (the scan path) and CSA picks with gaps.
The PyTorch paths it replaces are checked on the same cases with the C helpers switched off."""
import pytest
import torch

from v4c.graph.registry import get_op
from impls import CPU, chosen, run
from v4c.backends.cpu import native

H, D, W = 4, 32, 16  # heads, head dim, window (= ring rows)
pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C helpers unavailable: {native.why()}")


def _positions(case, t):
    if case == "prefill":  # two sequences continuing at different points
        return torch.stack([torch.arange(t) + 5, torch.arange(t) + 40])
    if case == "padded":  # a shorter second row, -1 after its end
        pos = torch.stack([torch.arange(t) + 3, torch.arange(t) + 70])
        pos[1, t // 2:] = -1
        return pos
    if case == "gaps":  # not consecutive: a gap, a repeat and a hole in the middle (every token scanned)
        p = torch.arange(t) + 9
        p[t // 3:] += 5
        p[t // 2] = p[t // 2 - 1]
        q = torch.arange(t) + 30
        q[t // 4] = -1
        return torch.stack([p, q])
    if case == "decode":
        return torch.tensor([[57], [4]])
    raise AssertionError(case)


def _case(kind, dtype, case, t=23, seed=0, D=D, heads=H):
    g = torch.Generator().manual_seed(seed)
    pos = _positions(case, t)
    b, t = pos.shape
    ring = torch.randn(b, W, D, generator=g).to(dtype)
    start = pos.clamp_min(0).min(dim=1).values
    ring_pos = torch.full((b, W), -1)
    for i in range(b):  # the ring as a cache holds it, plus one stale row from the future
        for p in range(max(0, int(start[i]) - W), int(start[i])):
            ring_pos[i, p % W] = p
        ring_pos[i, (int(start[i]) + 3) % W] = int(start[i]) + 500
    q = torch.randn(b, t, heads, D, generator=g).to(dtype)
    kv = torch.randn(b, t, D, generator=g).to(dtype)
    sinks = torch.randn(heads, generator=g)
    extra, attrs = (), dict(kind=kind, window=W, scale=D ** -0.5)
    if kind != "sliding":
        ratio, n = (4, 30) if kind == "csa" else (8, 12)
        rows = torch.randn(b, n, D, generator=g).to(dtype)
        attrs["ratio"] = ratio
        extra = (rows,)
        if kind == "csa":
            idx = torch.full((b, t, 5), -1)
            for i in range(b):
                for j in range(t):
                    nvis = min(n, max(0, (int(pos[i, j]) + 1) // ratio))
                    pick = torch.randperm(nvis, generator=g)[:4]
                    idx[i, j, 1:1 + len(pick)] = pick  # a -1 first: picks need not be packed
            extra = (rows, idx)
    return (q, kv, ring, ring_pos, sinks, pos, *extra), attrs


@pytest.mark.parametrize("case", ["prefill", "padded", "gaps", "decode"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_native_attention_equals_reference(kind, dtype, case):
    args, attrs = _case(kind, dtype, case)
    ref = get_op("attention").ref
    pos = args[5]
    assert chosen("attention", *args, **attrs) == "native"
    want = ref(*args, **attrs)
    got = native.attention(*args, **attrs)
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    else:  # one rounding of the output (bf16, fp16) apart at most, against an fp32 evaluation
        _assert_bf16_close(got, args, attrs)
    if case == "padded":
        assert (got[1][pos[1] < 0] == 0).all()  # a padding query sees nothing but the sink
    # the op through the cpu backend takes this path; its PyTorch paths agree with it
    assert torch.equal(run("attention", *args, **attrs), got)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16, fp16: one rounding step of the output
    paths = ["blocked"] + (["decode"] if case == "decode" else [])
    for path in paths:
        assert torch.allclose(run("attention", *args, impl=path, **attrs).float(), got.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_native_attention_any_head_dim(kind):
    """A head dim that is not a multiple of 8 or 32: the dot products' tails, the per-key sums."""
    args, attrs = _case(kind, torch.float32, "prefill", D=36)
    assert torch.allclose(native.attention(*args, **attrs), get_op("attention").ref(*args, **attrs), rtol=1e-5,
                          atol=1e-5)
    args, attrs = _case(kind, torch.bfloat16, "prefill", D=36)  # (not a multiple of 16: fp32 products)
    _assert_bf16_close(native.attention(*args, **attrs), args, attrs)


def _assert_bf16_close(got, args, attrs):
    """At most one rounding step of the dtype (bf16 2^-8, fp16 2^-11) further from an fp32 evaluation than the
    reference is."""
    ref = get_op("attention").ref
    truth = ref(*[a.float() if a.is_floating_point() else a for a in args], **attrs)
    err_got = float((got.float() - truth).abs().max() / truth.abs().max())
    err_want = float((ref(*args, **attrs).float() - truth).abs().max() / truth.abs().max())
    step = torch.finfo(got.dtype).eps / 2
    assert err_got <= err_want + step, f"{got.dtype} error {err_got:.2e} vs the reference's {err_want:.2e}"


_PAIRS = "avx512bf16"  # attention_bf16.c: bf16 pairs multiplied by vdpbf16ps
needs_pairs = pytest.mark.skipif(_PAIRS not in native.dot_isas(torch.bfloat16),
                                 reason="this CPU (or compiler) has no AVX512-BF16")


@needs_pairs
@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
@pytest.mark.parametrize("heads,D", [(16, 128), (20, 64), (8, 48), (3, 16), (1, 32)])
@pytest.mark.parametrize("case", ["prefill", "gaps", "decode"])
def test_bf16_pair_products_equal_the_reference(kind, heads, D, case):
    """The AVX512-BF16 products at model sizes and odd ones: a second block of 16 head lanes (20),
    fewer heads than lanes, head dims of one to eight vectors, odd key counts (the last pair half
    empty), against the reference and the fp32 products of the same call."""
    args, attrs = _case(kind, torch.bfloat16, case, t=37, D=D, heads=heads)
    got = native.attention(*args, **attrs)
    assert torch.equal(got, native.attention(*args, **attrs, isa=_PAIRS))  # the default on this CPU
    _assert_bf16_close(got, args, attrs)
    fp32 = native.attention(*args, **attrs, isa=native.dot_isas(torch.bfloat16)[-1])
    assert not torch.equal(got, fp32)  # another path indeed ...
    assert torch.allclose(got.float(), fp32.float(), rtol=2e-2, atol=2e-2)  # ... within bf16 steps of it


@needs_pairs
@pytest.mark.parametrize("kind", ["sliding", "csa"])
def test_bf16_pair_products_do_not_depend_on_the_rest_of_the_call(kind):
    """A sequence's rows are the same bits alone, beside other sequences, and on 1 to 3 threads."""
    args, attrs = _case(kind, torch.bfloat16, "prefill", t=29, D=64, heads=16)
    both = native.attention(*args, **attrs)
    alone = native.attention(*[a[1:] if a.dim() > 1 else a for a in args], **attrs)
    assert torch.equal(both[1:], alone)
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            assert torch.equal(native.attention(*args, **attrs), both), threads
    finally:
        torch.set_num_threads(before)


def test_attention_names_the_instruction_sets_it_takes():
    args, attrs = _case("sliding", torch.bfloat16, "decode")
    with pytest.raises(ValueError, match="unknown instruction set 'sse9'"):
        native.attention(*args, **attrs, isa="sse9")
    if _PAIRS not in native.dot_isas(torch.float32):  # bf16 pairs take bf16 operands only
        with pytest.raises(RuntimeError, match="no avx512bf16 kernel for Float"):
            native.attention(*_case("sliding", torch.float32, "decode")[0], **attrs, isa=_PAIRS)


@pytest.mark.parametrize("kind", ["sliding", "csa"])
def test_native_attention_splits_a_rows_heads_across_threads(kind):
    """With fewer query rows than threads (a batch-1 decode step) each row's heads are split into
    groups, evenly or not; every head's result is the same as on one thread, bit for bit."""
    args, attrs = _case(kind, torch.bfloat16, "decode")
    args = tuple(a[:1] if a.dim() > 1 else a for a in args)  # one sequence: one query row
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.attention(*args, **attrs)
        for threads in (2, 3, 4):
            torch.set_num_threads(threads)
            assert torch.equal(native.attention(*args, **attrs), one), threads
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(one.float(), get_op("attention").ref(*args, **attrs).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads", [8, 12, 20])
@pytest.mark.parametrize("kind", ["sliding", "csa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_softmax_exponentials_eight_heads_a_vector(dtype, kind, heads):
    """The softmax takes its exponentials eight heads at a time (a vector exp, attention.c's softmax_exp):
    whole vectors and a rest of 4, fp32 and bf16 with fp32 products, logits spread wide (scale x 8: numerators
    down to ~e^-50); the reference's result, and each head the same bits however the heads are grouped
    across threads."""
    args, attrs = _case(kind, dtype, "prefill", heads=heads, seed=3)
    attrs = {**attrs, "scale": attrs["scale"] * 8}
    isa = native.dot_isas(dtype)[-1] if native.dot_isas(dtype) else None  # fp32 products for bf16 too
    got = native.attention(*args, **attrs, isa=isa)
    if dtype == torch.float32:
        assert torch.allclose(got, get_op("attention").ref(*args, **attrs), rtol=1e-5, atol=1e-5)
    else:
        _assert_bf16_close(got, args, attrs)
    q, kv, ring, ring_pos, sinks, pos, *extra = args  # one query of the first sequence: a decode-sized call
    one = (q[:1, -1:], kv[:1, -1:], ring[:1], ring_pos[:1], sinks, pos[:1, -1:], *[e[:1] for e in extra][:1],
           *[e[:1, -1:] for e in extra][1:])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = native.attention(*one, **attrs, isa=isa)
        for threads in (2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(native.attention(*one, **attrs, isa=isa), alone), threads
    finally:
        torch.set_num_threads(before)


def test_native_attention_declines_what_it_does_not_take():
    args, attrs = _case("csa", torch.bfloat16, "prefill")
    q, kv, ring, ring_pos, sinks, pos, rows, idx = args
    assert chosen("attention", *args, **attrs) == "native"
    with pytest.raises(ValueError, match="stored as fp8_ds"):  # a packed cache
        CPU.callable("attention", args, {**attrs, "kv_format": "fp8_ds"}, name="native")
    with pytest.raises(ValueError, match="kv is f32, neither the activations' bf16 nor the cache's bf16"):
        CPU.callable("attention", (q, kv.float(), *args[2:]), attrs, name="native")
    assert chosen("attention", q, kv.float(), *args[2:], **attrs) == "blocked"
    with pytest.raises(ValueError, match="a cache is f32, not the activations' bf16"):  # ring and rows apart
        CPU.callable("attention", (q, kv, ring, ring_pos, sinks, pos, rows.float(), idx), attrs, name="native")
    with pytest.raises(ValueError, match="a cache is bf16, not its format's f16"):
        CPU.callable("attention", args, {**attrs, "kv_format": "f16"}, name="native")
    # a strided query is made contiguous for the C call, not passed as it lies
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(run("attention", qt, *args[1:], impl="native", **attrs), run("attention", *args, **attrs))
    with pytest.raises(ValueError, match="attention: kind 'hca' with ratio 0"):
        native.attention(q, kv, ring, ring_pos, sinks, pos, rows, kind="hca", window=W, ratio=0, scale=1.0)


@pytest.mark.parametrize("case", ["prefill", "decode"])
@pytest.mark.parametrize("qdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["sliding", "hca", "csa"])
def test_queries_over_a_cache_of_another_dtype(kind, qdtype, case):
    """An fp32 or fp16 model over a bf16 cache (``kv_format`` "bf16": the ring and compressed rows bf16, this
    call's rows in the model's dtype, stored as bf16): the C attention widens queries and keys each from its own
    dtype; the fused op (attention, ring append, de-rotation; one C call for a decode call) equals the
    reference's, and appends the rows as the cache holds them."""
    from v4c.graph.ops.attention import window_append
    args, attrs = _case(kind, torch.bfloat16, case)
    q, kv, ring, ring_pos, sinks, pos, *extra = args
    g = torch.Generator().manual_seed(7)  # values bf16 cannot hold: the call's rows are rounded as they are stored
    q, kv = torch.randn(q.shape, generator=g).to(qdtype), torch.randn(kv.shape, generator=g).to(qdtype)
    attrs = {**attrs, "kv_format": "bf16"}
    call = (q, kv, ring, ring_pos, sinks, pos, *extra)
    assert chosen("attention", *call, **attrs) == "native"
    want = get_op("attention").ref(*call, **attrs)
    got = run("attention", *call, **attrs)
    assert got.dtype == want.dtype == qdtype
    if qdtype == torch.float32:
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        _assert_bf16_close(got, call, attrs)
    rope = dict(rope_dim=16, theta=10000.0, yarn=None)
    ref_o, ref_ring, ref_pos = get_op("sparse_attention").ref(*[a.clone() if isinstance(a, torch.Tensor) else a
                                                                for a in call], **attrs, **rope)
    if case == "decode":  # (a prefill call runs the op's PyTorch append)
        o, r, rp = run("sparse_attention", *[a.clone() if isinstance(a, torch.Tensor) else a for a in call], **attrs,
                       **rope)
        assert torch.equal(r, ref_ring) and torch.equal(rp, ref_pos)
        assert torch.allclose(o.float(), ref_o.float(), rtol=2e-3, atol=2e-3)
    want_ring, _ = window_append(ring.clone(), ring_pos.clone(), kv, pos, kv_format="bf16")
    assert torch.equal(want_ring, ref_ring)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,rope_dim", [((2, 5, 16, 128), 64), ((1, 1, 8, 64), 64), ((3, 7, 96), 32),
                                            ((1, 130, 4, 48), 48), ((2, 3, 6, 10), 2)])
@pytest.mark.parametrize("inverse", [False, True])
def test_rope_alone_in_c_equals_the_reference_bit_for_bit(dtype, shape, rope_dim, inverse):
    """``rope_`` (which takes the C RoPE for contiguous fp32 / bf16 tensors) against ``apply_rope``, the
    op reference's real arithmetic, at positions past any table's first size; the head dims before
    the rotated tail untouched."""
    from v4c.backends.cpu.rope import rope_
    from v4c.graph.ops.core import apply_rope, rope_cos_sin
    g = torch.Generator().manual_seed(shape[1] * rope_dim + inverse)
    x = torch.randn(*shape, generator=g).to(dtype)
    pos = torch.randint(0, 9000, shape[:2], generator=g)
    cos, sin = rope_cos_sin(pos, rope_dim, 10000.0, None)
    want = apply_rope(x, cos, -sin if inverse else sin)
    got = rope_(x.clone(), pos, rope_dim, 10000.0, None, inverse=inverse)
    assert torch.equal(got, want)
    assert torch.equal(got[..., :-rope_dim], x[..., :-rope_dim])


def test_rope_alone_needs_its_rotations():
    with pytest.raises(ValueError, match=r"norm_rope_: without the norm, rot is needed"):
        native.norm_rope_(torch.randn(1, 2, 16), None, 0.0, 8, None, norm=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("t", [1, 3, 16])
def test_ring_append_in_c_equals_the_reference(dtype, t):
    """``native.ring_append_`` against the ``window_append`` reference: rows at different positions,
    a call that wraps around the ring's end, a ring that already holds rows; any element type (the
    fp8 row format is bytes)."""
    from v4c.graph.ops.attention import window_append
    g = torch.Generator().manual_seed(t)
    b, w, d = 3, 16, 24
    ring = (torch.randn(b, w, d, generator=g) * 20).to(dtype)
    ring_pos = torch.randint(0, 40, (b, w), generator=g)
    kv = (torch.randn(b, t, d, generator=g) * 20).to(dtype)
    pos = torch.stack([torch.arange(t) + s for s in (0, 14, 37)])  # the second row wraps from slot 14
    want_ring, want_pos = window_append(ring.clone(), ring_pos.clone(), kv, pos)
    got_ring, got_pos = ring.clone(), ring_pos.clone()
    native.ring_append_(got_ring, got_pos, kv, pos)
    assert torch.equal(got_ring, want_ring) and torch.equal(got_pos, want_pos)


def test_ring_append_refuses_padding_and_overflow_with_clear_errors():
    ring, ring_pos = torch.zeros(1, 4, 8), torch.full((1, 4), -1)
    with pytest.raises(ValueError, match=r"ring_append_: positions must be >= 0 \(no padding\)"):
        native.ring_append_(ring, ring_pos, torch.ones(1, 2, 8), torch.tensor([[5, -1]]))
    assert torch.equal(ring, torch.zeros(1, 4, 8)) and bool((ring_pos == -1).all())  # nothing written
    with pytest.raises(ValueError, match=r"ring_append_: 5 tokens per row do not fit a ring of 4 slots"):
        native.ring_append_(ring, ring_pos, torch.ones(1, 5, 8), torch.arange(5).view(1, 5))
    with pytest.raises(TypeError, match=r"ring_append_: kv must have the ring's dtype"):
        native.ring_append_(ring, ring_pos, torch.ones(1, 2, 8, dtype=torch.bfloat16), torch.tensor([[5, 6]]))
