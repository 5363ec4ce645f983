"""A prefill call's compressor in C (``compressor``'s ``native-prefill``: native/compress.c's ring and pooling,
token after token, then the reference's RMSNorm, RoPE and store of every closed window at once) against the
reference's ``compress``: calls starting at 0 (the first CSA window with no predecessor) and after earlier
calls, rows of different lengths (padding), CSA and HCA windows, fp32 / bf16 / fp16 activations, plain and
packed stores; a window pools the same bits whether its tokens came in one call, several, or one decode step
at a time; the raw op's errors by name."""
import pytest
import torch

from v4c.backends.cpu import compressor as cpu_compressor
from v4c.backends.cpu import native
from v4c.graph.ops.attention import compress
from impls import chosen

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C library on this machine")

YARN = (16.0, 64, 32.0, 1.0)
ATTRS = dict(eps=1e-6, rope_dim=16, theta=160000.0)


def _states(b, ratio, overlap, d, rows_dtype, n_rows=80):
    c = 2 if overlap else 1
    return [torch.zeros(b, n_rows, d, dtype=rows_dtype), torch.zeros(b, c * ratio, c * d),
            torch.zeros(b, c * ratio, c * d)]


def _inputs(g, b, t, ratio, overlap, d, dtype):
    c = 2 if overlap else 1
    kv = torch.randn(b, t, c * d, generator=g).to(dtype)
    gate = (torch.randn(b, t, c * d, generator=g) * 2).to(dtype)
    ape = torch.randn(ratio, c * d, generator=g)
    norm_w = torch.rand(d, generator=g) + 0.5
    return kv, gate, ape, norm_w


def _pool_c(kv, gate, ape, norm_w, states, pos, ratio, overlap, store=None, yarn=None):
    """``compressor_prefill`` after its products (the identity products: kv and gate given)."""
    eye = torch.eye(kv.shape[-1], dtype=kv.dtype)
    h = torch.cat([kv, gate], dim=-1)
    wkv, wgate = torch.cat([eye, 0 * eye], dim=1), torch.cat([0 * eye, eye], dim=1)
    return cpu_compressor.compressor_prefill(h, wkv, wgate, ape, norm_w, *states, pos, ratio=ratio, overlap=overlap,
                                             store=store, yarn=yarn, **ATTRS)


def _positions(starts, lengths, t):
    pos = torch.full((len(starts), t), -1, dtype=torch.int64)
    for i, (s, n) in enumerate(zip(starts, lengths)):
        pos[i, :n] = torch.arange(s, s + n)
    return pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("ratio,overlap", [(4, True), (8, False), (16, True), (128, False), (1, False)])
def test_prefill_pooling_equals_the_reference(dtype, ratio, overlap):
    """Three calls of 1-3 rows: a first chunk from position 0 (rows of different lengths), a second continuing
    from where each row stopped, a third of a few tokens; rings and rows against the reference after each."""
    g = torch.Generator().manual_seed(ratio * 2 + overlap)
    d, b = 24, 3
    rows_dtype = dtype if dtype != torch.float16 else torch.bfloat16
    ref_states = _states(b, ratio, overlap, d, rows_dtype, n_rows=300 // ratio + 2)
    c_states = [s.clone() for s in ref_states]
    done = [0, 0, 0]
    for lengths in ([37, 2 * ratio + 1, 0], [50, 3, 4 * ratio], [1, 5, 2]):
        t = max(lengths)
        kv, gate, ape, norm_w = _inputs(g, b, t, ratio, overlap, d, dtype)
        pos = _positions(done, lengths, t)
        want = compress(kv, gate, ape, norm_w, *ref_states, pos, ratio=ratio, overlap=overlap, yarn=YARN, **ATTRS)
        got = _pool_c(kv, gate, ape, norm_w, c_states, pos, ratio, overlap, yarn=YARN)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # the rings: the same fp32 values
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)
        tol = 1e-5 if rows_dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=tol, atol=tol)
        done = [s + n for s, n in zip(done, lengths)]
    assert (c_states[0] != 0).any()


@pytest.mark.parametrize("store", ["fp8", "mxfp4"])
def test_packed_stores_equal_the_reference(store):
    g = torch.Generator().manual_seed(11)
    ratio, overlap, d = 4, True, 64
    from v4c.graph.storage import stored_width
    rows = torch.zeros(2, 40, stored_width(d, store, 16), dtype=torch.uint8)
    states = [rows, torch.zeros(2, 8, 2 * d), torch.zeros(2, 8, 2 * d)]
    ref_states = [s.clone() for s in states]
    kv, gate, ape, norm_w = _inputs(g, 2, 70, ratio, overlap, d, torch.bfloat16)
    pos = _positions([0, 9], [70, 61], 70)
    want = compress(kv, gate, ape, norm_w, *ref_states, pos, ratio=ratio, overlap=overlap, store=store, **ATTRS)
    got = _pool_c(kv, gate, ape, norm_w, states, pos, ratio, overlap, store=store)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    differ = (got[0] != want[0]).float().mean()
    assert differ < 0.01, f"{float(differ):.3%} of the stored bytes differ"  # (pooling sums in another order)


def test_a_window_pools_the_same_bits_in_one_call_in_chunks_or_step_by_step():
    """The C prefill runs the decode step's ring and pooling token after token: one call of 45 tokens, calls
    of 7, and the C decode step one token at a time (after the first two windows) give the same rings and
    the same pooled rows."""
    g = torch.Generator().manual_seed(5)
    ratio, overlap, d = 4, True, 32
    kv, gate, ape, norm_w = _inputs(g, 1, 45, ratio, overlap, d, torch.bfloat16)
    whole = _states(1, ratio, overlap, d, torch.float32)
    _pool_c(kv, gate, ape, norm_w, whole, _positions([0], [45], 45), ratio, overlap)
    chunks = _states(1, ratio, overlap, d, torch.float32)
    for a in range(0, 45, 7):
        n = min(7, 45 - a)
        _pool_c(kv[:, a:a + n], gate[:, a:a + n], ape, norm_w, chunks, _positions([a], [n], n), ratio, overlap)
    for got, want in zip(chunks, whole):
        assert torch.equal(got, want)
    rings = [torch.zeros(1, 2 * ratio, 2 * d) for _ in range(2)]
    pooled, win = native.compress_prefill_(kv.contiguous(), gate.contiguous(), ape, *rings, _positions([0], [45], 45),
                                           ratio, overlap)
    assert win[0].tolist() == list(range(11)) + [-1] and torch.equal(rings[0], whole[1])
    steps = [torch.zeros(1, 2 * ratio, 2 * d) for _ in range(2)]
    native.compress_prefill_(kv[:, :8].contiguous(), gate[:, :8].contiguous(), ape, *steps, _positions([0], [8], 8),
                             ratio, overlap)
    for p in range(8, 45):
        one = native.compress_step_(kv[:, p:p + 1].contiguous(), gate[:, p:p + 1].contiguous(), ape, *steps,
                                    torch.tensor([[p]]), ratio, overlap)
        if (p + 1) % ratio == 0:
            assert torch.equal(one[0], pooled[0, p // ratio]), p
    assert torch.equal(steps[0], rings[0]) and torch.equal(steps[1], rings[1])


def test_pooling_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(9)
    ratio, overlap, d = 4, True, 40
    kv, gate, ape, norm_w = _inputs(g, 2, 300, ratio, overlap, d, torch.bfloat16)
    pos = _positions([0, 13], [300, 250], 300)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            rings = [torch.zeros(2, 2 * ratio, 2 * d) for _ in range(2)]
            outs.append((*native.compress_prefill_(kv, gate, ape, *rings, pos, ratio, overlap), *rings))
    finally:
        torch.set_num_threads(before)
    valid = outs[0][1] >= 0  # (pooled past a row's last window is not written)
    for pooled, win, ring_kv, ring_gate in outs[1:]:
        assert torch.equal(win, outs[0][1]) and torch.equal(pooled[valid], outs[0][0][valid])
        assert torch.equal(ring_kv, outs[0][2]) and torch.equal(ring_gate, outs[0][3])


def test_backend_binds_the_c_prefill():
    g = torch.Generator().manual_seed(2)
    d, ratio = 16, 4
    h = torch.randn(1, 20, 40, generator=g).bfloat16()
    wkv, wgate = [(torch.randn(2 * d, 40, generator=g) * 0.2).bfloat16() for _ in range(2)]
    ape, norm_w = torch.randn(ratio, 2 * d, generator=g).bfloat16(), torch.rand(d, generator=g).bfloat16()
    states = _states(1, ratio, True, d, torch.bfloat16)
    pos = torch.arange(20)[None]
    attrs = dict(ratio=ratio, overlap=True, **ATTRS)
    name = chosen("compressor", h, wkv, wgate, ape, norm_w, *states, pos, phase="prefill", **attrs)
    assert name in ("native-prefill", "native-wide-prefill")
    bf16_pending = [states[0], states[1].bfloat16(), states[2].bfloat16()]
    assert chosen("compressor", h, wkv, wgate, ape, norm_w, *bf16_pending, pos, phase="prefill", **attrs) not in \
        ("native-prefill", "native-wide-prefill")  # bf16 pending slots: the reference's pooling


def test_the_raw_op_refuses_bad_operands_by_name():
    kv, gate = torch.zeros(1, 6, 8), torch.zeros(1, 6, 8)
    ape, ring = torch.zeros(4, 8), torch.zeros(1, 8, 8)
    pos = torch.arange(6)[None]
    with pytest.raises(ValueError, match="compress_prefill_: a row's positions must run on from its first, padding "
                                         "\\(negative\\) after them"):
        native.compress_prefill_(kv, gate, ape, ring.clone(), ring.clone(), torch.tensor([[0, 1, 3, 4, 5, 6]]), 4,
                                 True)
    with pytest.raises(ValueError, match="compress_prefill_: a row's positions"):
        native.compress_prefill_(kv, gate, ape, ring.clone(), ring.clone(), torch.tensor([[0, 1, -1, 3, 4, 5]]), 4,
                                 True)
    with pytest.raises(ValueError, match=r"compress_prefill_: the pending slots must be \[B, 8, C\] = \[1, 8, 8\]"):
        native.compress_prefill_(kv, gate, ape, torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), pos, 4, True)
    with pytest.raises(TypeError, match="compress_prefill_: gate must be Float, got BFloat16"):
        native.compress_prefill_(kv, gate.bfloat16(), ape, ring.clone(), ring.clone(), pos, 4, True)
    with pytest.raises(ValueError, match=r"compress_prefill_: pos must hold"):
        native.compress_prefill_(kv, gate, ape, ring.clone(), ring.clone(), pos[:, :5], 4, True)
