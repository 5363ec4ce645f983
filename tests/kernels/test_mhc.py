"""mHC kernels (v4c/codegen/templates/mhc.py) against the IR ops' references, in Triton's interpreter.

Shapes: n in {4, 2} streams, hidden D in {256, 128, 200} (200 is not a multiple of the 64 / 32
column chunks), T in {1, 7, 9} with B = 2 (14 and 18 tokens leave the last 16-token block
ragged), Sinkhorn iters 20 and 1. Activations fp32 / fp16 / bf16; mHC parameters fp32.
"""
import itertools
import random

import pytest
import torch

from v4c.codegen.templates import mhc
from v4c.graph import get_op

EPS, HC_EPS = 1e-6, 1e-6
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# activations (h, the new streams): the kernel rounds where the reference does, so what is left is
# fp32 summation order flipping a rounding now and then: one ulp of the dtype (fp16 2^-10, bf16 2^-7).
ACT_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-3, rtol=2e-3),
           torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2)}
# post / comb are fp32 outputs computed in fp32 from the same (rounded) stream values
WEIGHT_TOL = dict(atol=2e-5, rtol=2e-5)

# (n, D, T, iters)
SHAPES = [(4, 256, 7, 20), (4, 256, 1, 20), (2, 128, 7, 20), (2, 128, 1, 1), (4, 200, 9, 1)]
SHAPE_IDS = [f"n{n}-D{d}-T{t}-it{i}" for n, d, t, i in SHAPES]


def _params(n, d, rows, seed):
    """fn / base / scale like a trained layer's: logits of order one, non-zero biases, and a norm weight."""
    g = torch.Generator().manual_seed(seed)
    fn = torch.randn(rows, n * d, generator=g) / (n * d) ** 0.5
    base = 0.5 * torch.randn(rows, generator=g)
    scale = torch.tensor([0.7, 1.1, 1.5][: 3 if rows > n else 1])
    norm_w = 1 + 0.1 * torch.randn(d, generator=g)
    return fn, base, scale, norm_w


def _streams(n, d, t, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, t, n, d, generator=g) * 2).to(dtype)


def _sublayer(n, d, t, dtype, seed):
    """A sublayer output y and the (post, comb) of a real pre-mix, as hc_post_pre / hc_head receive them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(2, t, d, generator=g).to(dtype)
    x = _streams(n, d, t, torch.float32, seed + 1)
    _, post, comb = get_op("hc_pre").ref(x, *_params(n, d, (n + 2) * n, seed + 2), n=n, eps=EPS, hc_eps=HC_EPS,
                                         iters=20)
    return y, post, comb


def _close(out, ref, tol, what):
    assert out.dtype == ref.dtype and out.shape == ref.shape, (what, out.dtype, ref.dtype, out.shape, ref.shape)
    torch.testing.assert_close(out.float(), ref.float(), **tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d", [(4, 256), (2, 200)])
def test_hc_expand(n, d, dtype):
    x = torch.randn(2, 7, d).to(dtype)
    ref = get_op("hc_expand").ref(x, n=n)
    for meta in ({}, {"BLOCK_T": 1, "BLOCK_D": 128}, {"BLOCK_T": 32, "BLOCK_D": 1024, "num_warps": 8}):
        assert torch.equal(mhc.hc_expand(x, n=n, meta=meta), ref), meta


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,t,iters", SHAPES, ids=SHAPE_IDS)
def test_hc_pre(n, d, t, iters, dtype):
    x = _streams(n, d, t, dtype, seed=1)
    params = _params(n, d, (n + 2) * n, seed=2)
    attrs = dict(n=n, eps=EPS, hc_eps=HC_EPS, iters=iters)
    h, post, comb = mhc.hc_pre(x, *params, **attrs)
    rh, rpost, rcomb = get_op("hc_pre").ref(x, *params, **attrs)
    _close(h, rh, ACT_TOL[dtype], "h")
    _close(post, rpost, WEIGHT_TOL, "post")
    _close(comb, rcomb, WEIGHT_TOL, "comb")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,t,iters", SHAPES, ids=SHAPE_IDS)
def test_hc_post_pre(n, d, t, iters, dtype):
    x = _streams(n, d, t, dtype, seed=3)
    y, post, comb = _sublayer(n, d, t, dtype, seed=4)
    params = _params(n, d, (n + 2) * n, seed=5)
    attrs = dict(n=n, eps=EPS, hc_eps=HC_EPS, iters=iters)
    outs = mhc.hc_post_pre(x, y, post, comb, *params, **attrs)
    refs = get_op("hc_post_pre").ref(x, y, post, comb, *params, **attrs)
    for what, o, r, tol in zip(("x'", "h", "post", "comb"), outs, refs,
                               (ACT_TOL[dtype], ACT_TOL[dtype], WEIGHT_TOL, WEIGHT_TOL)):
        _close(o, r, tol, what)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,d,t", [(4, 256, 7), (2, 128, 1), (4, 200, 9)], ids=["n4-D256-T7", "n2-D128-T1",
                                                                                  "n4-D200-T9"])
def test_hc_head(n, d, t, dtype):
    x = _streams(n, d, t, dtype, seed=6)
    y, post, comb = _sublayer(n, d, t, dtype, seed=7)
    params = _params(n, d, n, seed=8)
    h = mhc.hc_head(x, y, post, comb, *params, eps=EPS, hc_eps=HC_EPS)
    _close(h, get_op("hc_head").ref(x, y, post, comb, *params, eps=EPS, hc_eps=HC_EPS), ACT_TOL[dtype], "h")


def _meta_sample(op, shapes, k=3, seed=0):
    """``k`` valid META candidates other than the default, drawn reproducibly."""
    keys = list(mhc.META[op])
    valid = [dict(zip(keys, vals)) for vals in itertools.product(*(mhc.META[op][key] for key in keys))]
    valid = [m for m in valid if mhc.constraints(op, m, shapes) is None and m != mhc.DEFAULT_META[op]]
    return random.Random(seed).sample(valid, k)


@pytest.mark.parametrize("op", ["hc_pre", "hc_post_pre", "hc_head"])
def test_meta_candidates_agree(op):
    """A sample of meta-parameter choices (block sizes, warps, stages, dot precision) gives the default's
    answer on a ragged shape: 18 tokens, D = 200."""
    n, d, t = 4, 200, 9
    x = _streams(n, d, t, torch.float32, seed=9)
    y, post, comb = _sublayer(n, d, t, torch.float32, seed=10)
    params = _params(n, d, n if op == "hc_head" else (n + 2) * n, seed=11)
    args = (x, *params) if op == "hc_pre" else (x, y, post, comb, *params)
    attrs = dict(eps=EPS, hc_eps=HC_EPS) if op == "hc_head" else dict(n=n, eps=EPS, hc_eps=HC_EPS, iters=20)
    launch = mhc.KERNELS[op]
    base = launch(*args, **attrs)
    base = base if isinstance(base, tuple) else (base,)
    samples = _meta_sample(op, [tuple(a.shape) for a in args])
    samples += [{"BLOCK_T": 64, "BLOCK_D": 16}, {"BLOCK_T": 16, "BLOCK_D": 128, "DOT_PRECISION": "ieee"}]
    for meta in samples:
        outs = launch(*args, **attrs, meta=meta)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for o, b in zip(outs, base):
            torch.testing.assert_close(o, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{meta}: {m}")


def test_constraints():
    real = [(1, 8, 4, 4096), (24, 16384), (24,), (3,), (4096,)]
    for op in mhc.KERNELS:
        assert mhc.constraints(op, mhc.DEFAULT_META[op], real) is None, op
        assert set(mhc.DEFAULT_META[op]) == set(mhc.META[op]), op
        assert all(mhc.DEFAULT_META[op][k] in v for k, v in mhc.META[op].items()), op
    assert "power of two" in mhc.constraints("hc_pre", {"BLOCK_D": 48}, real)
    assert "16 rows" in mhc.constraints("hc_pre", {"BLOCK_T": 8}, real)
    assert "tf32x3" in mhc.constraints("hc_head", {"DOT_PRECISION": "tf32"}, real)
    assert "shared memory" in mhc.constraints("hc_post_pre", {"BLOCK_T": 256, "BLOCK_D": 256, "num_stages": 4},
                                              real)
    assert mhc.constraints("hc_expand", {"BLOCK_T": 1}, [(1, 8, 4096)]) is None
    # the autotuner's dict forms: named sizes, or inputs + attrs
    for shapes in ({"n": 4, "M": 8}, {"inputs": real, "attrs": {"n": 4}}, {}):
        assert mhc.constraints("hc_pre", mhc.DEFAULT_META["hc_pre"], shapes) is None, shapes


def test_zero_tokens():
    x = torch.zeros(2, 0, 4, 128)
    h, post, comb = mhc.hc_pre(x, *_params(4, 128, 24, seed=0), n=4, eps=EPS, hc_eps=HC_EPS, iters=20)
    assert h.shape == (2, 0, 128) and post.shape == (2, 0, 4) and comb.shape == (2, 0, 4, 4)
