"""The compressor's decode step in C (native/compress.c + norm_rope.c, ``compressor``'s ``native-decode``
path): the pending rings and the pooled rows against the reference's ``compress`` over many window
closes, in bf16 (fp32 and packed stores: tests/test_torch_decode_attention.py), with YaRN RoPE;
the C step is what runs (not the general path) wherever it can; the raw op's errors by name."""
import pytest
import torch

from v4c.backends.cpu import compressor as cpu_compressor
from v4c.backends.cpu import native
from v4c.graph.registry import get_op
from impls import chosen, run

pytestmark = pytest.mark.skipif(not native.moe_decode_available(torch.float32),
                                reason="the C products need AVX2 + FMA or AVX-512F")

YARN = (16.0, 64, 32.0, 1.0)


def _case(g, b, ratio, overlap, dtype, hid=48, d=32, slots_rows=40):
    c = 2 if overlap else 1
    w = [(torch.randn(c * d, hid, generator=g) * 0.2).to(dtype) for _ in range(2)]
    ape = torch.randn(ratio, c * d, generator=g).to(dtype)
    norm_w = (torch.rand(d, generator=g) + 0.5).to(dtype)
    states = [torch.zeros(b, slots_rows, d, dtype=dtype), torch.zeros(b, c * ratio, c * d),
              torch.zeros(b, c * ratio, c * d)]
    return w, ape, norm_w, states


@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False), (8, True)])
def test_bf16_decode_steps_equal_the_reference(ratio, overlap, monkeypatch):
    g = torch.Generator().manual_seed(ratio + overlap)
    start = [3, 0, 17, 17]
    (wkv, wgate), ape, norm_w, states = _case(g, len(start), ratio, overlap, torch.bfloat16)
    fast = [t.clone() for t in states]
    attrs = dict(ratio=ratio, overlap=overlap, eps=1e-6, rope_dim=16, theta=160000.0, yarn=YARN)
    ref = get_op("compressor").ref
    c_steps = []
    step_c, one_call = native.compress_step_, native.compress_decode_  # (the products inside: one C call)
    monkeypatch.setattr(native, "compress_step_", lambda *a: c_steps.append(a[5].reshape(-1).tolist()) or step_c(*a))
    monkeypatch.setattr(native, "compress_decode_",
                        lambda *a: c_steps.append(a[6].reshape(-1).tolist()) or one_call(*a))
    hid = wkv.shape[1]
    for step in range(4 * ratio + 3):
        pos = torch.tensor(start)[:, None] + step
        h = torch.randn(len(start), 1, hid, generator=g).bfloat16()
        assert chosen("compressor", h, wkv, wgate, ape, norm_w, *fast, pos, phase="decode", **attrs) == "native-decode"
        want = ref(h, wkv, wgate, ape, norm_w, *states, pos, **attrs)
        got = run("compressor", h, wkv, wgate, ape, norm_w, *fast, pos, impl="native-decode", **attrs)
        for i in (1, 2):  # the rings: kv / gate + ape in fp32, from products summed in another order
            torch.testing.assert_close(got[i], want[i], rtol=1e-2, atol=1e-2, msg=f"step {step} state {i}")
        # pooled rows in bf16: at most a rounding step apart where the products' sums differ
        torch.testing.assert_close(got[0].float(), want[0].float(), rtol=2 ** -6, atol=2 ** -6,
                                   msg=f"step {step} rows")
    assert (states[0] != 0).any()
    # the C step ran on every call except those closing a CSA window with no predecessor
    first_csa = [p for p in range(4 * ratio + 3) if overlap and any(s + p == ratio - 1 for s in start)]
    assert len(c_steps) == 4 * ratio + 3 - len(first_csa)


def test_padding_and_several_tokens_take_the_general_path(monkeypatch):
    g = torch.Generator().manual_seed(5)
    (wkv, wgate), ape, norm_w, states = _case(g, 2, 4, True, torch.float32)
    fast = [t.clone() for t in states]
    attrs = dict(ratio=4, overlap=True, eps=1e-6, rope_dim=8, theta=10000.0)
    monkeypatch.setattr(native, "compress_step_", lambda *a: pytest.fail("the C step ran"))
    monkeypatch.setattr(native, "compress_decode_", lambda *a: pytest.fail("the C step ran"))
    from v4c.graph.ops.core import linear
    for pos in (torch.tensor([[9], [-1]]), torch.tensor([[0, 1], [5, 6]])):
        h = torch.randn(2, pos.shape[1], wkv.shape[1], generator=g)
        want = get_op("compressor").ref(h, wkv, wgate, ape, norm_w, *states, pos, **attrs)
        got = cpu_compressor.compressor_c(h, wkv, wgate, ape, norm_w, *fast, pos, **attrs, lin=linear, one_call=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_the_raw_op_refuses_bad_operands_by_name():
    kv = torch.randn(2, 1, 8)
    ape, ring = torch.randn(4, 8), lambda: torch.zeros(2, 8, 8)  # noqa: E731
    ok = dict(ratio=4, overlap=True)
    with pytest.raises(ValueError, match="a position is negative, or closes a CSA window that has no predecessor"):
        native.compress_step_(kv, kv.clone(), ape, ring(), ring(), torch.tensor([[3], [1]]), **ok)
    with pytest.raises(ValueError, match="a position is negative"):
        native.compress_step_(kv, kv.clone(), ape, ring(), ring(), torch.tensor([[5], [-1]]), **ok)
    with pytest.raises(ValueError, match=r"the pending slots must be \[B, 8, C\] = \[2, 8, 8\], got shape \[2, 4, 8\]"):
        native.compress_step_(kv, kv.clone(), ape, torch.zeros(2, 4, 8), ring(), torch.tensor([[9], [9]]), **ok)
    with pytest.raises(TypeError, match="gate must be BFloat16"):
        native.compress_step_(kv.bfloat16(), kv, ape, ring(), ring(), torch.tensor([[9], [9]]), **ok)
    with pytest.raises(ValueError, match=r"ape must hold \[ratio, C\] = 32 elements"):
        native.compress_step_(kv, kv.clone(), ape[:2], ring(), ring(), torch.tensor([[9], [9]]), **ok)
    ring_kv, ring_gate = ring(), ring()
    pooled = native.compress_step_(kv, kv.clone(), ape, ring_kv, ring_gate, torch.tensor([[9], [6]]), **ok)
    assert pooled.shape == (2, 4) and torch.equal(ring_kv[:, [1, 6]].diagonal().T, kv[:, 0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("ratio,yarn", [(4, YARN), (128, None), (8, None)])
def test_closing_windows_in_one_call_equal_the_epilogue_op_by_op(dtype, ratio, yarn):
    """``compress_close_`` against what it replaced: the closing rows gathered, ``norm_rope_`` with the table's
    rotations, the store's ``.to(dtype)`` and an indexed write; rows that close no window are left alone."""
    from v4c.backends.cpu.rope import rotations_at, table
    g = torch.Generator().manual_seed(ratio)
    d, rope_dim, theta, n = 48, 16, 160000.0, 40
    pos = torch.tensor([[ratio - 1], [3 * ratio - 1], [5], [7 * ratio - 1], [2 * ratio]])
    pooled = torch.randn(len(pos), d, generator=g) * 3
    norm_w = (torch.rand(d, generator=g) + 0.5).to(dtype if dtype != torch.float16 else torch.float32)
    rows = torch.randn(len(pos), n, d, generator=g).to(dtype)
    vals = pos.reshape(-1).tolist()
    closing = [i for i, v in enumerate(vals) if (v + 1) % ratio == 0]
    want, x = rows.clone(), pooled.index_select(0, torch.tensor(closing))[:, None].clone()
    win = [vals[i] // ratio for i in closing]
    native.norm_rope_(x, norm_w, 1e-6, rope_dim, rotations_at([w * ratio for w in win], rope_dim, theta, yarn, "cpu")
                      [:, None])
    want[torch.tensor(closing), torch.tensor(win)] = x[:, 0].to(dtype)
    got = rows.clone()
    native.compress_close_(pooled.clone(), pos, ratio, norm_w, 1e-6, rope_dim,
                           table(rope_dim, theta, yarn, "cpu", max(vals) + 1), got)
    assert torch.equal(got, want) and not torch.equal(got, rows)


def test_compress_close_refuses_bad_operands_by_name():
    from v4c.backends.cpu.rope import table
    t = table(8, 10000.0, None, "cpu", 64)
    pooled, pos = torch.randn(2, 16), torch.tensor([[3], [7]])
    with pytest.raises(ValueError, match=r"window 1 of row 1 is past the store's 1 rows"):
        native.compress_close_(pooled, pos, 4, torch.ones(16), 1e-6, 8, t, torch.zeros(2, 1, 16))
    with pytest.raises(ValueError, match=r"position 4 is past the table's 4 rotations"):
        native.compress_close_(pooled, pos, 4, torch.ones(16), 1e-6, 8, t[:4], torch.zeros(2, 4, 16))
    with pytest.raises(TypeError, match="rows must be a plain floating-point store, got Byte"):
        native.compress_close_(pooled, pos, 4, torch.ones(16), 1e-6, 8, t, torch.zeros(2, 4, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"table must be \[P, rope_dim / 2\] = \[P, 4\]"):
        native.compress_close_(pooled, pos, 4, torch.ones(16), 1e-6, 8, t[:, :2], torch.zeros(2, 4, 16))
    with pytest.raises(TypeError, match="pooled must be Float"):
        native.compress_close_(pooled.bfloat16(), pos, 4, torch.ones(16), 1e-6, 8, t, torch.zeros(2, 4, 16))


# ---- the indexer's selection (native/indexer.c) ------------------------------------------------------

def _isas(dtype):
    """Each way this CPU scores: with bf16 pairs (avx512bf16, bf16 only) and with fp32 products."""
    return native.dot_isas(dtype) or (None,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,t,h,d,n,topk,ratio", [(1, 1, 16, 128, 512, 256, 4), (3, 2, 4, 64, 40, 16, 4),
                                                  (2, 5, 8, 32, 3000, 64, 4), (1, 1, 2, 8, 9, 32, 128),
                                                  (2, 40, 16, 128, 300, 64, 4), (1, 19, 20, 64, 100, 24, 4),
                                                  (1, 17, 5, 6, 50, 4, 4)])
def test_indexer_selection_equals_the_reference_as_a_set(dtype, b, t, h, d, n, topk, ratio):
    """Decode calls (each query's rows split across threads) and prefill ones (more queries than threads:
    the queries split), 1 to 20 heads (two blocks of 16 lanes for the bf16 pairs), every way this CPU
    scores (``isa``)."""
    for isa in _isas(dtype):
        _check_selection(dtype, b, t, h, d, n, topk, ratio, isa)


def _check_selection(dtype, b, t, h, d, n, topk, ratio, isa):
    from v4c.backends.cpu.attention import indexer_topk_c, indexer_topk_c_prefill
    g = torch.Generator().manual_seed(n + t)
    q, w = torch.randn(b, t, h, d, generator=g).to(dtype), torch.randn(b, t, h, generator=g).to(dtype)
    keys = torch.randn(b, n, d, generator=g).to(dtype)
    # rows at different depths: none visible yet, fewer visible than picks, many; a padding query (-1)
    last = torch.tensor([min(n * ratio + 7, 50_000), 5, 2 * topk * ratio + 3])[:b]
    pos = last[:, None] - torch.arange(t - 1, -1, -1)[None]
    pos[0, 0] = -1 if t > 1 else pos[0, 0]
    attrs = dict(topk=topk, ratio=ratio, score_scale=d ** -0.5, weight_scale=h ** -0.5)
    got = native.indexer_topk(q, w, keys, pos, topk, ratio, attrs["score_scale"] * attrs["weight_scale"], isa=isa)
    if isa == _isas(dtype)[0]:  # the ops' default
        assert torch.equal(indexer_topk_c(q, w, keys, pos, **attrs), got)
        assert torch.equal(indexer_topk_c_prefill(q, w, keys, pos, **attrs), got)
    want = get_op("indexer_topk").ref(q, w, keys, pos, **attrs)
    assert got.shape == want.shape == (b, t, topk) and got.dtype == torch.int64
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    # best first: the scores of the picks do not increase
    sc = torch.einsum("bthd,bsd->bths", q.float(), keys.float()).relu() * attrs["score_scale"]
    total = (sc * (w.float() * attrs["weight_scale"])[..., None]).sum(2)
    picked = torch.where(got >= 0, total.gather(-1, got.clamp_min(0)), torch.full_like(total[..., :1], -1e30))
    assert bool((picked[..., :-1] >= picked[..., 1:] - 1e-4).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("topk", [64, 150, 300, 400])
def test_indexer_ties_go_to_the_lower_row(dtype, topk):
    """Keys that repeat three distinct rows score in three groups of exact ties: the picks are the best
    group's rows, lowest first, then the next group's, and -1 past the visible rows (the reference's top-k
    leaves ties unordered; the C selection's radix passes must keep rows ascending within a score)."""
    g = torch.Generator().manual_seed(11)
    n, h, d = 300, 8, 64
    base = torch.randn(3, d, generator=g)
    keys = base[torch.arange(n) % 3][None].to(dtype)
    q, w = torch.randn(1, 2, h, d, generator=g).to(dtype), torch.rand(1, 2, h, generator=g).to(dtype)
    pos = torch.tensor([[4 * n + 10, 4 * 200 - 1]])  # every row visible; 200 visible
    sc = torch.einsum("thd,sd->ths", q[0].float(), base.to(dtype).float()).relu()
    group = (sc * w[0].float()[..., None]).sum(1)  # [t, 3] the groups' scores
    for isa in _isas(dtype):
        got = native.indexer_topk(q, w, keys, pos, topk, 4, 0.01, isa=isa)[0]
        for t, vis in enumerate((n, 200)):
            rows = torch.arange(vis)
            want = torch.cat([rows[rows % 3 == grp] for grp in group[t].argsort(descending=True).tolist()])
            want = torch.cat([want, torch.full((max(0, topk - vis),), -1)])[:topk]
            assert torch.equal(got[t], want), (isa, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_querys_selection_does_not_depend_on_the_call(dtype):
    """A query scored alone (its rows split across 1-3 threads) picks the same rows in the same order as
    within a 37-query prefill call (the queries split) and beside another sequence, every way of scoring."""
    g = torch.Generator().manual_seed(3)
    b, t, h, d, n = 2, 37, 16, 64, 400
    q, w = torch.randn(b, t, h, d, generator=g).to(dtype), torch.randn(b, t, h, generator=g).to(dtype)
    keys = torch.randn(b, n, d, generator=g).to(dtype)
    pos = torch.arange(t)[None] + torch.tensor([[1500], [900]])
    before = torch.get_num_threads()
    try:
        for isa in _isas(dtype):
            call = native.indexer_topk(q, w, keys, pos, 64, 4, 0.01, isa=isa)
            for threads in (1, 2, 3):  # and however many threads share a decode query's rows
                torch.set_num_threads(threads)
                for i, j in ((0, 0), (1, 20), (0, 36)):
                    one = native.indexer_topk(q[i:i + 1, j:j + 1].contiguous(), w[i:i + 1, j:j + 1].contiguous(),
                                              keys[i:i + 1].contiguous(), pos[i:i + 1, j:j + 1].contiguous(), 64,
                                              4, 0.01, isa=isa)
                    assert torch.equal(one[0, 0], call[i, j]), (isa, threads, i, j)
            torch.set_num_threads(before)
    finally:
        torch.set_num_threads(before)


def test_a_bf16_prefill_takes_the_c_scoring_where_it_pays():
    """bf16 queries and keys on an AVX512-BF16 CPU: the C selection (bf16 pairs); fp32 or other CPUs: PyTorch's
    blocked GEMMs, faster than the C scoring with fp32 products."""
    from impls import chosen, run
    g = torch.Generator().manual_seed(5)
    q, w, keys = torch.randn(1, 40, 8, 64, generator=g), torch.randn(1, 40, 8, generator=g), torch.randn(1, 30, 64)
    pos = torch.arange(40)[None] + 60
    attrs = dict(topk=8, ratio=4, score_scale=0.125, weight_scale=0.5)
    pairs = "avx512bf16" in native.dot_isas(torch.bfloat16)
    assert chosen("indexer_topk", q, w, keys, pos, phase="prefill", **attrs) == "blocked"
    b16 = (q.bfloat16(), w.bfloat16(), keys.bfloat16(), pos)
    assert chosen("indexer_topk", *b16, phase="prefill", **attrs) == ("native-prefill" if pairs else "blocked")
    assert chosen("indexer_topk", *b16[:2], keys, pos, phase="prefill", **attrs) == "blocked"  # fp32 keys
    got = run("indexer_topk", *b16, phase="prefill", **attrs)
    want = get_op("indexer_topk").ref(*b16, **attrs)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)


def test_indexer_packed_keys_take_the_pytorch_path(monkeypatch):
    from v4c.backends.cpu.attention import indexer_topk_c
    monkeypatch.setattr(native, "indexer_topk", lambda *a: pytest.fail("the C selection ran"))
    q, w = torch.randn(1, 1, 4, 64), torch.randn(1, 1, 4)
    from v4c.graph.storage import encode
    keys = encode(torch.randn(1, 20, 64), "fp8")
    pos = torch.tensor([[79]])
    attrs = dict(topk=8, ratio=4, score_scale=0.125, weight_scale=0.5, key_format="fp8")
    want = get_op("indexer_topk").ref(q, w, keys, pos, **attrs)
    assert torch.equal(indexer_topk_c(q, w, keys, pos, **attrs).sort(-1).values, want.sort(-1).values)


def test_the_indexer_op_refuses_bad_operands_by_name():
    q, w, keys, pos = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4), torch.randn(1, 10, 8), torch.tensor([[39]])
    with pytest.raises(ValueError, match=r"keys must be \[B, N, D\] = \[1, N, 8\], got shape \[1, 10, 6\]"):
        native.indexer_topk(q, w, keys[..., :6].contiguous(), pos, 4, 4, 1.0)
    with pytest.raises(TypeError, match="w must be Float"):
        native.indexer_topk(q, w.bfloat16(), keys, pos, 4, 4, 1.0)
    with pytest.raises(ValueError, match="topk and ratio must be >= 1, got 0 and 4"):
        native.indexer_topk(q, w, keys, pos, 0, 4, 1.0)
