"""The router's selection in C (native/route.c, ``moe_router``'s ``native-decode`` / ``native-quant`` decode
paths) against the reference's PyTorch steps: the same experts per token (as a set: the reference's
top-k leaves their order unspecified), weights to fp32 rounding, the stable grouping by expert and
the offsets exactly; the hash table's rows exactly; clear errors for ids and table entries out of
range."""
import pytest
import torch

from v4c.backends.cpu import native
from v4c.backends.cpu.router import moe_router_c, moe_router_step
from v4c.graph.ops.fused import moe_router as ref_router
from impls import chosen, run

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no native library: {native.why()}")


def _ref_select(scores, bias, k, scaling):
    idx = torch.topk(scores + bias, k, dim=-1).indices
    wts = scores.gather(-1, idx)
    return idx, wts.div_(wts.sum(-1, keepdim=True).add_(1e-20)).mul_(scaling)


def _grouping(idx, E):
    experts, perm = torch.sort(idx.reshape(-1), stable=True)
    return perm.view_as(idx), torch.searchsorted(experts, torch.arange(E + 1))


@pytest.mark.parametrize("E,k", [(8, 1), (16, 4), (64, 6), (256, 8), (7, 7), (384, 6)])
@pytest.mark.parametrize("lead", [(1,), (8,), (3, 5), (2, 1, 4)])
def test_top_k_selection_equals_the_reference(E, k, lead):
    g = torch.Generator().manual_seed(E * 31 + k + sum(lead))
    scores = torch.nn.functional.softplus(torch.randn(*lead, E, generator=g)).sqrt_()
    bias = torch.randn(E, generator=g) * 0.3
    idx, wts, perm, offsets = native.moe_route(scores, bias, None, None, k, 1.5)
    want_idx, want_wts = _ref_select(scores, bias, k, 1.5)
    assert idx.shape == wts.shape == perm.shape == (*lead, k) and offsets.shape == (E + 1,)
    assert idx.dtype == perm.dtype == offsets.dtype == torch.int64 and wts.dtype == torch.float32
    assert torch.equal(idx.sort(-1).values, want_idx.sort(-1).values)
    order, want_order = idx.argsort(-1), want_idx.argsort(-1)
    torch.testing.assert_close(wts.gather(-1, order), want_wts.gather(-1, want_order), rtol=1e-6, atol=0)  # (sums of k in another order)
    # each token's experts best first (by score + bias)
    biased = (scores + bias).gather(-1, idx)
    assert bool((biased[..., :-1] >= biased[..., 1:]).all())
    want_perm, want_offsets = _grouping(idx, E)
    assert torch.equal(perm, want_perm) and torch.equal(offsets, want_offsets)


def test_ties_and_nan_pick_as_topk_would():
    scores = torch.tensor([[0.5, 0.9, 0.9, 0.1, 0.9], [0.2, float("nan"), 0.3, 0.4, 0.1]])
    idx, *_ = native.moe_route(scores, torch.zeros(5), None, None, 2, 1.0)
    assert idx[0].tolist() == [1, 2]  # equal scores: the lower expert first
    assert idx[1, 0] == 1  # NaN counts as the largest, as torch.topk orders it


@pytest.mark.parametrize("table_dtype", [torch.int32, torch.int64])
def test_hashed_rows_equal_the_reference(table_dtype):
    g = torch.Generator().manual_seed(4)
    E, k, V = 32, 6, 100
    table = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(V)]).to(table_dtype)
    ids = torch.randint(0, V, (4, 3), generator=g)
    ids[-1, -1] = -1  # a padding token's id: row 0, as the reference's clamp
    scores = torch.rand(4, 3, E, generator=g) + 0.1
    idx, wts, perm, offsets = native.moe_route(scores, None, table, ids, k, 2.0)
    want_idx = table[ids.clamp_min(0)].long()
    assert torch.equal(idx, want_idx)
    want_wts = scores.gather(-1, want_idx)
    want_wts = want_wts.div_(want_wts.sum(-1, keepdim=True).add_(1e-20)).mul_(2.0)
    torch.testing.assert_close(wts, want_wts, rtol=1e-6, atol=0)  # (sums of k in another order)
    assert all(torch.equal(a, b) for a, b in zip((perm, offsets), _grouping(want_idx, E)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hashed", [False, True])
def test_the_op_on_its_decode_path_equals_the_reference_op(dtype, hashed):
    if not native.moe_decode_available(dtype):
        pytest.skip(f"no C products for {dtype} here")
    from v4c.backends.cpu import dense
    g = torch.Generator().manual_seed(9)
    E, D, k = 24, 96, 3
    h = torch.randn(8, 1, D, generator=g).to(dtype)
    w = (torch.randn(E, D, generator=g) * 0.2).to(dtype)
    if hashed:
        args, attrs = (h, w, torch.randint(0, E, (50, k), generator=g, dtype=torch.int32),
                       torch.randint(0, 50, (8, 1), generator=g)), dict(hash=True, scaling=1.5)
    else:
        args, attrs = (h, w, torch.randn(E, generator=g)), dict(topk=k, scaling=1.5)
    assert chosen("moe_router", *args, phase="decode", **attrs) == "native-decode"
    got, want = moe_router_c(*args, **attrs, lin=dense.gemv), ref_router(*args, **attrs)
    assert torch.equal(got[0].sort(-1).values, want[0].sort(-1).values) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[1].gather(-1, got[0].argsort(-1)), want[1].gather(-1, want[0].argsort(-1)),
                               rtol=1e-6, atol=1e-7)
    assert torch.equal(got[2], _grouping(got[0], E)[0])
    # the registry's decode path: the three calls as one C call (router_step), the same bits
    one = run("moe_router", *args, phase="decode", **attrs)
    assert all(torch.equal(a, b) for a, b in zip(one, got))
    if not hashed:  # a bf16 bias is widened as moe_router_c widens it
        same = moe_router_step(h, w, args[2].to(dtype), **attrs)
        assert all(torch.equal(a, b) for a, b in zip(same, moe_router_c(h, w, args[2].to(dtype), **attrs,
                                                                         lin=dense.gemv)))


def test_bad_operands_are_refused_by_name():
    s = torch.rand(2, 8)
    table = torch.randint(0, 8, (10, 2))
    with pytest.raises(IndexError, match=r"token 1's id 10 is outside the hash table's 10 rows"):
        native.moe_route(s, None, table, torch.tensor([3, 10]), 2, 1.0)
    bad = table.clone()
    bad[3, 1] = 8
    with pytest.raises(IndexError, match=r"hash table entry \[3, 1\] names no expert of 0..7"):
        native.moe_route(s, None, bad, torch.tensor([0, 3]), 2, 1.0)
    with pytest.raises(ValueError, match="give either bias or table"):
        native.moe_route(s, torch.zeros(8), table, torch.tensor([0, 1]), 2, 1.0)
    with pytest.raises(ValueError, match=r"k must lie in 1..8, got 9"):
        native.moe_route(s, torch.zeros(8), None, None, 9, 1.0)
    with pytest.raises(ValueError, match=r"table must be \[V, k = 3\]"):
        native.moe_route(s, None, table, torch.tensor([0, 1]), 3, 1.0)
    with pytest.raises(TypeError, match="scores must be Float"):
        native.moe_route(s.double(), torch.zeros(8), None, None, 2, 1.0)


def test_sqrt_softplus_in_c_equals_pytorchs_to_an_ulp_and_checks_its_operand():
    x = torch.cat([torch.linspace(-30, 30, 4001), torch.tensor([-100.0, 19.999, 20.0, 20.001, 88.0, 0.0, -0.0])])
    got = native.sqrt_softplus_(x.clone())
    want = torch.nn.functional.softplus(x.double()).sqrt().float()
    normal = x > -80  # (below, e^x is subnormal in fp32 and keeps a few bits: checked in absolute terms)
    ulp = want.abs() * 2.0 ** -23
    assert float(((got - want).abs() / ulp)[normal].max()) <= 1.0
    assert float((got - want)[~normal].abs().max()) < 1e-20
    # PyTorch's threshold: x itself above 20 (its sqrt correctly rounded: through fp64, as torch's fp32
    # sqrt is not on every CPU)
    assert torch.equal(got[x > 20], x[x > 20].double().sqrt().float())
    with pytest.raises(TypeError, match="sqrt_softplus_: x must be Float"):
        native.sqrt_softplus_(x.bfloat16())
    with pytest.raises(RuntimeError, match="sqrt_softplus_: x must be contiguous"):
        native.sqrt_softplus_(x[::2])


@pytest.mark.parametrize("E", [8, 16, 64])
def test_a_tokens_routing_does_not_depend_on_the_call(E):
    """Bit for bit the same weights alone and beside other rows: F.softplus gave a row of 16 scores other
    bits beside a second row on an AVX-512 CPU, which took a bf16 speculative decode off plain decoding's
    tokens (the decode router scores in C now)."""
    g = torch.Generator().manual_seed(E)
    h, w, bias = torch.randn(64, 1, 96, generator=g), torch.randn(E, 96, generator=g), torch.randn(E, generator=g)
    lin = lambda x, w: native.linear(x.contiguous(), w)  # noqa: E731
    for r in range(0, 64, 2):
        alone = moe_router_c(h[r:r + 1], w, bias, scaling=1.5, topk=4, lin=lin)
        pair = moe_router_c(h[r:r + 2], w, bias, scaling=1.5, topk=4, lin=lin)
        assert torch.equal(alone[0][0], pair[0][0]) and torch.equal(alone[1][0], pair[1][0]), r
