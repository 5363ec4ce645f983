"""MoE kernels (templates/moe.py) against the IR references of ``moe_router`` and ``moe_ffn``.

Router: the chosen experts must equal the reference's as a set per token, with the same weights
(compared as (expert, weight) pairs sorted by expert: the order within a token is the kernel's own),
the permutation must be the stable sort of the kernel's own ``idx``, and the offsets exact.
FFN: fed the reference router's outputs, with gate/up values well past the clamp limit and experts
that receive no token. Tolerances (max error over max |reference|): fp32 1e-5; fp16 2e-3 and bf16
2e-2, where the reference rounds every intermediate to the activation dtype and the kernel keeps
fp32 until the end, so for half types the kernel must also be no farther from a float64 evaluation
than the reference is.
"""
import itertools
import warnings

import pytest
import torch

from v4c.codegen.templates import moe
from v4c.graph import get_op

warnings.filterwarnings("ignore", message="overflow encountered in exp")  # interpreter's sigmoid(-large)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FFN_TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-2}
# a half-precision logit can land one ulp apart when the fp32 sums straddle a rounding boundary
WEIGHT_TOL = {"fp32": 1e-5, "fp16": 2e-3, "bf16": 2e-3}
TOKENS = [(1, 1), (1, 5), (3, 11)]  # 1, 5 and 33 tokens: ragged against every BLOCK_M
LIMIT = 10.0
SCALING = 1.5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _router_inputs(B, T, D, E, K, hash, dtype, seed=0, vocab=50):
    g = _gen(seed)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    w = (torch.randn(E, D, generator=g) / D ** 0.5).to(dtype)
    if hash:
        table = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(vocab)])
        ids = torch.randint(-1, vocab, (B, T), generator=g)  # -1 (padding) clamps to row 0
        return (h, w, table, ids), {"scaling": SCALING, "hash": True}
    bias = torch.randn(E, generator=g) * 0.3
    return (h, w, bias), {"scaling": SCALING, "hash": False, "topk": K}


def _pairs(idx, wts):
    """(experts, weights) per token, sorted by expert."""
    order = idx.argsort(-1)
    return idx.gather(-1, order), wts.gather(-1, order)


def _check_router(got, want, E, wtol):
    idx, wts, perm, offsets = got
    ridx, rwts, _, roffsets = want
    e_got, w_got = _pairs(idx, wts)
    e_want, w_want = _pairs(ridx, rwts)
    assert torch.equal(e_got, e_want)
    torch.testing.assert_close(w_got, w_want, rtol=0, atol=wtol)
    torch.testing.assert_close(wts.sum(-1), torch.full(wts.shape[:-1], SCALING), rtol=0, atol=1e-5)
    assert torch.equal(perm.reshape(-1), torch.sort(idx.reshape(-1), stable=True).indices)
    assert torch.equal(offsets, roffsets)
    assert offsets.shape == (E + 1,)


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("B,T", TOKENS)
@pytest.mark.parametrize("E,K,hash", [(8, 2, False), (8, 2, True), (6, 3, False), (6, 3, True)])
def test_router_matches_reference(E, K, hash, B, T, dt):
    args, attrs = _router_inputs(B, T, 136, E, K, hash, DTYPES[dt])
    got = moe.moe_router(*args, **attrs)
    want = get_op("moe_router").ref(*args, **attrs)
    _check_router(got, want, E, WEIGHT_TOL[dt])


def _ffn_weights(D, E, I, S, dtype, seed=1, shared=True):
    """Weights scaled up so that gate and up go well past LIMIT (the clamps are exercised)."""
    g = _gen(seed)
    w13 = (torch.randn(E, 2 * I, D, generator=g) * 6 / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype)
    if not shared:
        return w13, w2
    sg = (torch.randn(S, D, generator=g) * 6 / D ** 0.5).to(dtype)
    su = (torch.randn(S, D, generator=g) * 6 / D ** 0.5).to(dtype)
    sd = (torch.randn(D, S, generator=g) / S ** 0.5).to(dtype)
    return w13, w2, sg, su, sd


def _routed(h, E, K, hash, seed=2):
    """Reference routing for ``h``: (idx, weights, perm, offsets)."""
    B, T, D = h.shape
    args, attrs = _router_inputs(B, T, D, E, K, hash, h.dtype, seed=seed)
    return get_op("moe_router").ref(h, *args[1:], **attrs)


def _check_ffn(h, route, weights, dt):
    ref = get_op("moe_ffn").ref
    got = moe.moe_ffn(h, *route, *weights, limit=LIMIT)
    want = ref(h, *route, *weights, limit=LIMIT)
    assert got.shape == want.shape and got.dtype == want.dtype
    scale = want.float().abs().max()
    err = ((got.float() - want.float()).abs().max() / scale).item()
    assert err <= FFN_TOL[dt], f"error {err:.2e} over max |ref| {scale:.3g}"
    if dt != "fp32":  # no farther from the float64 evaluation than the reference is
        exact = ref(h.double(), *route, *(w.double() for w in weights), limit=LIMIT)
        ours, theirs = ((x.double() - exact).abs().max().item() for x in (got, want))
        assert ours <= 1.05 * theirs + 1e-6 * exact.abs().max().item(), (ours, theirs)
    return got


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("B,T", TOKENS)
@pytest.mark.parametrize("E,K,hash", [(8, 2, False), (6, 3, True)])
def test_ffn_matches_reference(E, K, hash, B, T, dt):
    dtype = DTYPES[dt]
    D, I, S = 96, 48, 80  # ragged against every BLOCK_N/BLOCK_K, and a shared width != I
    h = torch.randn(B, T, D, generator=_gen(3)).to(dtype)
    route = _routed(h, E, K, hash)
    weights = _ffn_weights(D, E, I, S, dtype)
    _check_ffn(h, route, weights, dt)
    if B * T == 1:
        assert (route[3].diff() == 0).sum() == E - K  # experts with zero tokens
    # the clamps are exercised: gate above LIMIT and |up| above LIMIT somewhere
    gu = torch.einsum("btd,efd->btef", h.float(), weights[0].float())
    assert (gu[..., :I] > LIMIT).any() and (gu[..., I:].abs() > LIMIT).any()


@pytest.mark.parametrize("dt", ["fp32", "fp16"])
def test_ffn_tiny_model_shape(dt):
    """The tiny model's sizes: hidden 256, 8 experts top-2 of width 128, shared expert of width 128."""
    dtype = DTYPES[dt]
    h = torch.randn(3, 11, 256, generator=_gen(4)).to(dtype)
    _check_ffn(h, _routed(h, 8, 2, False), _ffn_weights(256, 8, 128, 128, dtype), dt)


def test_ffn_many_empty_experts_without_shared():
    """Hash routing into experts {1, 4, 5} only (0, 2, 3 empty), no shared expert, fp32 weights with
    fp16 activations (the reference casts the weights to the activation dtype)."""
    B, T, D, E, K, I = 1, 33, 64, 6, 3, 40
    g = _gen(5)
    h = torch.randn(B, T, D, generator=g).half()
    w = torch.randn(E, D, generator=g) / 8
    table = torch.tensor([1, 4, 5]).repeat(7, 1)
    ids = torch.randint(0, 7, (B, T), generator=g)
    route = get_op("moe_router").ref(h, w, table, ids, scaling=SCALING, hash=True)
    assert (route[3].diff() == 0).tolist() == [True, False, True, True, False, False]
    _check_ffn(h, route, _ffn_weights(D, E, I, 0, torch.float32, shared=False), "fp16")
    # and the router kernel agrees on the same inputs
    _check_router(moe.moe_router(h, w, table, ids, scaling=SCALING, hash=True), route, E, WEIGHT_TOL["fp16"])


def test_decode_step_views():
    """A decode step sees the T=1 column of bigger buffers: strided ids and hidden-state views."""
    E, K, D, I, S = 8, 2, 64, 32, 32
    args, attrs = _router_inputs(2, 6, D, E, K, True, torch.float32, seed=9)
    h, ids = args[0][:, 4:5], args[3][:, 4:5]
    assert not ids.is_contiguous() and not h.is_contiguous()
    args = (h, args[1], args[2], ids)
    want = get_op("moe_router").ref(*args, **attrs)
    _check_router(moe.moe_router(*args, **attrs), want, E, WEIGHT_TOL["fp32"])
    _check_ffn(h, want, _ffn_weights(D, E, I, S, torch.float32), "fp32")


def _sample(op, n, seed):
    """``n`` META candidates for ``op`` that satisfy constraints(), the default first."""
    keys = list(moe.META[op])
    combos = list(itertools.product(*(moe.META[op][k] for k in keys)))
    order = torch.randperm(len(combos), generator=_gen(seed)).tolist()
    out = [moe.DEFAULT_META[op]]
    for i in order:
        meta = dict(zip(keys, combos[i]))
        if moe.constraints(op, meta, None) is None and meta not in out:
            out.append(meta)
        if len(out) == n:
            break
    return out


def test_router_meta_candidates_agree():
    """Small blocks force several router blocks and several sort chunks per block."""
    args, attrs = _router_inputs(3, 11, 136, 6, 3, False, torch.float16)
    want = get_op("moe_router").ref(*args, **attrs)
    metas = _sample("moe_router", 4, 6) + [{"BLOCK_M": 16, "BLOCK_K": 32, "SORT_BLOCK": 32, "num_warps": 4,
                                            "num_stages": 2}]
    base = moe.moe_router(*args, **attrs, meta=metas[0])
    _check_router(base, want, 6, WEIGHT_TOL["fp16"])
    for meta in metas[1:]:
        got = moe.moe_router(*args, **attrs, meta=meta)
        for a, b in zip(got, base):
            assert torch.equal(a, b), meta


def test_ffn_meta_candidates_agree():
    D, E, K, I, S = 96, 6, 3, 48, 80
    h = torch.randn(3, 11, D, generator=_gen(7))
    route = _routed(h, E, K, False)
    weights = _ffn_weights(D, E, I, S, torch.float32)
    want = get_op("moe_ffn").ref(h, *route, *weights, limit=LIMIT)
    for meta in _sample("moe_ffn", 5, 8):
        got = moe.moe_ffn(h, *route, *weights, limit=LIMIT, meta=meta)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err <= FFN_TOL["fp32"], (meta, err)


def test_meta_contract_and_constraints():
    flash = {"moe_router": [(1, 1, 4096), (256, 4096), (256,)],
             "moe_ffn": [(1, 1, 4096), (1, 1, 6), (1, 1, 6), (1, 1, 6), (257,), (256, 4096, 4096),
                         (256, 4096, 2048)]}
    pro = {"moe_router": [(1, 1, 7168), (384, 7168), (384,)],
           "moe_ffn": [(1, 1, 7168), (1, 1, 6), (1, 1, 6), (1, 1, 6), (385,), (384, 6144, 7168),
                       (384, 7168, 3072)]}
    assert set(moe.KERNELS) == set(moe.META) == set(moe.DEFAULT_META) == {"moe_router", "moe_ffn"}
    for op, meta in moe.DEFAULT_META.items():
        assert set(meta) == set(moe.META[op])
        assert all(v in moe.META[op][k] for k, v in meta.items())
        for shapes in (flash[op], pro[op], {"inputs": pro[op], "dtype": "f32"}):
            assert moe.constraints(op, meta, shapes) is None, (op, shapes)
    big = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    assert "registers" in moe.constraints("moe_ffn", big, flash["moe_ffn"])
    # both experts' loops are one pipelined loop: 3 stages of (64 + 2 * 128) x 128 bf16 tiles fit sm90...
    assert moe.constraints("moe_ffn", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8,
                                       "num_stages": 3}, flash["moe_ffn"]) is None
    # ... 4 stages of fp32 ones do not
    assert "shared memory" in moe.constraints(
        "moe_ffn", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4},
        {"inputs": flash["moe_ffn"], "dtype": "f32"})
    wide = {"BLOCK_M": 64, "BLOCK_K": 64, "SORT_BLOCK": 64, "num_warps": 4, "num_stages": 2}
    assert "router tile" in moe.constraints("moe_router", wide, pro["moe_router"])
    assert "sort rank matrix" in moe.constraints("moe_router", {**moe.DEFAULT_META["moe_router"], "SORT_BLOCK": 256},
                                                 flash["moe_router"])


def test_ffn_mixed_weight_dtypes():
    """Routed experts in bf16 and a shared expert in fp32: both reach the kernels in one (wider) dtype, as
    the kernels pick one weight pointer before their K loop."""
    D, E, K, I, S = 64, 4, 2, 32, 48
    h = torch.randn(1, 5, D, generator=_gen(12))
    route = _routed(h, E, K, False)
    w13, w2, sg, su, sd = _ffn_weights(D, E, I, S, torch.float32, seed=13)
    weights = (w13.bfloat16(), w2.bfloat16(), sg, su, sd)
    _check_ffn(h, route, weights, "fp32")
