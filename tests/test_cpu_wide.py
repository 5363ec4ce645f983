"""A bf16 prefill's products widened to fp32 (``v4c/backends/cpu/wide.py``): bound for bf16 prefill calls
only, and each op at least as close to an fp32 evaluation of its reference as the reference's own bf16
evaluation is (the same arithmetic: bf16 inputs, fp32 sums, one rounding; another order of the sums)."""
import pytest
import torch

import v4c
from v4c.backends import call_on, choose
from v4c.backends.cpu import moe, native, wide
from v4c.graph.registry import get_op
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from impls import CPU, chosen, run

BF = torch.bfloat16
B, T = 2, 24  # 48 tokens: a prefill call


@pytest.fixture(autouse=True)
def plain_avx2(monkeypatch):
    """As on a CPU without bf16 arithmetic (this machine's), whatever CPU runs the tests."""
    monkeypatch.setattr(wide, "native_bf16", lambda: None)


def _copy(args, up=False):
    """Fresh copies (states are written in place), floats widened with ``up``."""
    return [(a.float() if up and a.is_floating_point() else a).clone() if isinstance(a, torch.Tensor) else a
            for a in args]


def _err(x, truth):
    return float((x.float() - truth.float()).abs().max() / truth.float().abs().max())


def _as_close_as_reference(op, args, attrs, got=None, pick=lambda y: y):
    """``got`` (default: the cpu backend's bound call) is within one bf16 step of the reference's error."""
    ref = get_op(op).ref
    got = pick(run(op, *_copy(args), **attrs) if got is None else got)
    want = pick(ref(*_copy(args), **attrs))
    truth = pick(ref(*_copy(args, up=True), **attrs))
    assert got.dtype == want.dtype and got.shape == want.shape
    assert _err(got, truth) <= _err(want, truth) + 2 ** -8, (op, _err(got, truth), _err(want, truth))


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _r(g, *shape, scale=0.2):
    return (torch.randn(*shape, generator=g) * scale).to(BF)


def test_bound_for_bf16_prefill_calls_only():
    g = _g()
    x, w = _r(g, B, T, 64), _r(g, 48, 64)
    assert chosen("linear", x, w, phase="prefill") == "wide-prefill"
    for args, phase, why in (((x.float(), w.float()), "prefill", "activations are f32"),
                             ((x, w.float()), "prefill", "a weight is f32, not the activations' bf16"),
                             ((x, w), "decode", "made for prefill calls")):
        call = call_on("linear", args, {}, phase)
        assert choose(CPU, call).impl.name != "wide-prefill"
        assert why in CPU.impl("linear", "wide-prefill").declines(call)


def test_not_bound_where_the_cpu_has_bf16_arithmetic(monkeypatch):
    monkeypatch.setattr(wide, "native_bf16", lambda: "avx512_bf16")
    g = _g()
    call = call_on("linear", (_r(g, B, T, 64), _r(g, 48, 64)), {}, "prefill")
    assert choose(CPU, call).impl.name != "wide-prefill"
    assert CPU.impl("linear", "wide-prefill").declines(call) == \
        "this CPU has avx512_bf16: PyTorch's bf16 GEMM is the faster one"


def test_linear_widens_only_calls_with_enough_rows():
    g = _g(1)
    w = _r(g, 48, 64)
    for rows in (1, wide.WIDE_ROWS - 1, wide.WIDE_ROWS, 100):
        x = _r(g, rows, 64)
        got = wide.linear(x, w)
        want = torch.nn.functional.linear(x, w) if rows < wide.WIDE_ROWS else \
            torch.nn.functional.linear(x.float(), w.float()).to(BF)
        assert torch.equal(got, want), rows
    _as_close_as_reference("linear", (_r(g, B, T, 64), w), {})


def test_projections_and_norms():
    g = _g(2)
    x, pos = _r(g, B, T, 64), torch.arange(T)[None].repeat(B, 1) + torch.tensor([[0], [77]])
    _as_close_as_reference("linear_rms_norm", (x, _r(g, 40, 64), torch.rand(40, generator=g) + 0.5), {"eps": 1e-6})
    assert chosen("linear_rms_norm", x, _r(g, 40, 64), torch.rand(40), phase="prefill") == "wide-prefill"
    heads, d = 4, 32
    rope = dict(eps=1e-6, rope_dim=16, theta=10000.0, yarn=(4.0, 64, 32, 1))
    wq, wkv, nw = _r(g, heads * d, 64), _r(g, d, 64), (torch.rand(d, generator=g) + 0.5).to(BF)
    if native.library() is not None:
        assert chosen("q_proj", x, wq, pos, phase="prefill", shape=(B, T, heads, d), **rope) == "wide-prefill"
        assert chosen("kv_proj", x, wkv, nw, pos, phase="prefill", **rope) == "wide-prefill"
    _as_close_as_reference("q_proj", (x, wq, pos), dict(shape=(B, T, heads, d), **rope))
    _as_close_as_reference("kv_proj", (x, wkv, nw, pos), rope)
    groups, r = 2, 24
    o, wa, wb = _r(g, B, T, heads, d), _r(g, groups * r, heads * d // groups), _r(g, 64, groups * r)
    attrs = dict(shape=(B, T, groups, heads * d // groups), groups=groups, out_shape=(B, T, groups * r))
    assert chosen("o_proj", o, wa, wb, phase="prefill", **attrs) == "wide-prefill"
    _as_close_as_reference("o_proj", (o, wa, wb), attrs)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (16, False)])
def test_compressor_prefill(ratio, overlap):
    g = _g(3)
    hid, d, c = 64, 16, 2 if overlap else 1
    h = _r(g, B, 40, hid)
    wkv, wgate = _r(g, c * d, hid), _r(g, c * d, hid)
    ape, norm_w = torch.randn(ratio, c * d, generator=g), torch.rand(d, generator=g) + 0.5
    pos = torch.arange(40)[None].repeat(B, 1) + torch.tensor([[0], [5]])
    states = lambda: [torch.zeros(B, 40, d), torch.zeros(B, c * ratio, c * d), torch.zeros(B, c * ratio, c * d)]  # noqa: E731
    attrs = dict(ratio=ratio, overlap=overlap, eps=1e-6, rope_dim=8, theta=10000.0)
    args = (h, wkv, wgate, ape, norm_w, *states(), pos)
    assert chosen("compressor", *args, phase="prefill", **attrs) == "native-wide-prefill"  # (the pooling in C)
    got = run("compressor", h, wkv, wgate, ape, norm_w, *states(), pos, **attrs)
    for i in range(3):  # the rows written, and both pending rings
        _as_close_as_reference("compressor", (h, wkv, wgate, ape, norm_w, *states(), pos), attrs, got=got,
                               pick=lambda y, i=i: y[i])


def test_moe_router_and_experts():
    g = _g(4)
    E, D, I, k, n = 16, 64, 32, 4, B * T
    h = _r(g, B, T, D)
    gate, bias = _r(g, E, D), torch.randn(E, generator=g) * 0.01
    ra = dict(scaling=1.5, topk=k)
    assert chosen("moe_router", h, gate, bias, phase="prefill", **ra) == "wide-prefill"
    got, want = run("moe_router", h, gate, bias, **ra), get_op("moe_router").ref(h, gate, bias, **ra)
    assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])  # the same experts (no ties here)
    assert torch.allclose(got[1], want[1], rtol=2 ** -7, atol=1e-6)
    idx, wts, perm, offsets = want
    # experts with many rows (widened) and with a few (not): a skewed routing
    counts = torch.diff(offsets)
    assert (counts >= wide.WIDE_ROWS).any() and ((counts > 0) & (counts < wide.WIDE_ROWS)).any(), counts
    w13, w2 = _r(g, E, 2 * I, D, scale=0.3), _r(g, E, D, I, scale=0.3)
    shared = [_r(g, I, D, scale=0.3), _r(g, I, D, scale=0.3), _r(g, D, I, scale=0.3)]
    args = (h, idx, wts, perm, offsets, w13, w2, *shared)
    want = "native-wide-prefill" if native.moe_decode_available(BF) else "wide-prefill"
    assert chosen("moe_ffn", *args, phase="prefill", limit=2.0) == want
    _as_close_as_reference("moe_ffn", args, {"limit": 2.0})
    from v4c.backends.cpu.weight_views import WeightViews
    got = moe.moe_grouped(*args, limit=2.0, views=WeightViews(), mm=wide.expert_mm, lin=wide.linear)
    _as_close_as_reference("moe_ffn", args, {"limit": 2.0}, got=got)  # the widened GEMMs themselves


@pytest.mark.skipif(not native.moe_decode_available(torch.float32), reason="no C MoE kernel on this CPU")
@pytest.mark.parametrize("dtype", [torch.float32, BF])
@pytest.mark.parametrize("limit_tokens", [10_000, 20])  # the C kernel takes the call / the GEMMs beyond it
def test_moe_prefill_through_the_c_kernel(monkeypatch, dtype, limit_tokens):
    """A prefill call of up to NATIVE_PREFILL_TOKENS tokens takes the C MoE kernel (fp32 within 1e-5 of the
    reference; bf16 as close to fp32 as the reference); a longer one the grouped GEMMs."""
    monkeypatch.setattr(moe, "NATIVE_PREFILL_TOKENS", limit_tokens)
    g = _g(6)
    E, D, I, k = 16, 64, 32, 4
    h = (torch.randn(B, T, D, generator=g) * 0.5).to(dtype)
    idx, wts, perm, offsets = get_op("moe_router").ref(h, (torch.randn(E, D, generator=g) * 0.2).to(dtype),
                                                       torch.randn(E, generator=g) * 0.01, scaling=1.5, topk=k)
    w13, w2 = [(torch.randn(*s, generator=g) * 0.3).to(dtype) for s in ((E, 2 * I, D), (E, D, I))]
    shared = [(torch.randn(*s, generator=g) * 0.3).to(dtype) for s in ((I, D), (I, D), (D, I))]
    args = (h, idx, wts, perm, offsets, w13, w2, *shared)
    name = chosen("moe_ffn", *args, phase="prefill", limit=2.0)
    assert name == ("native-wide-prefill" if dtype == BF else "native-prefill")
    got = run("moe_ffn", *args, phase="prefill", limit=2.0)
    if dtype == torch.float32:
        want = get_op("moe_ffn").ref(*args, limit=2.0)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    else:
        _as_close_as_reference("moe_ffn", args, {"limit": 2.0}, got=got)


def test_a_bf16_model_prefills_through_the_widened_products(tmp_path):
    """As close to the fp32 model (the same bf16 weights) as the reference backend's bf16 run: bf16 through
    every layer of a random model is far from fp32 either way (~24% at the worst logit, ~4% on average)."""
    cfg = tiny_config_dict()
    ck = write_random_checkpoint(cfg, tmp_path / "ck", seed=2, dtype="bf16")
    art = v4c.compile(ck, tmp_path / "art", target="cpu", dtype="bf16")
    fast = v4c.load(art, backend="cpu")
    bound = {(r["op"], r["phase"]): r["implementation"] for r in fast.implementations()}
    for op in ("linear", "moe_ffn", "moe_router", "compressor"):
        assert bound[(op, "prefill")].endswith("wide-prefill"), (op, bound[(op, "prefill")])
    ids = torch.randint(0, cfg["vocab_size"], (2, 40), generator=_g(5))

    def logits(model):
        return model.new_session(2, max_context=64).forward(ids).float()

    truth = logits(v4c.load(v4c.compile(ck, tmp_path / "f32", target="cpu", dtype="f32"), backend="reference"))
    got, want = logits(fast), logits(v4c.load(art, backend="reference"))
    for stat in (torch.amax, torch.mean):
        e_got, e_want = (float(stat((x - truth).abs()) / stat(truth.abs())) for x in (got, want))
        assert e_got <= 1.25 * e_want, (stat.__name__, e_got, e_want)


def test_fp16_prefills_widen_where_the_cpu_has_no_fp16_arithmetic(monkeypatch, tmp_path):
    """fp16 as bf16: bound for prefill calls on a CPU without fp16 arithmetic (F16C only converts), declined by
    name where it has some; the products as close to an fp32 evaluation as the reference's fp16 ones; an fp16
    model prefills through them (and the C MoE) and its logits stay as close to the fp32 model's as the
    reference backend's fp16 run."""
    monkeypatch.setattr(wide, "native_f16", lambda: None)
    g = _g(8)
    x, w = _r(g, B, T, 64).half(), _r(g, 48, 64).half()
    assert chosen("linear", x, w, phase="prefill") == "wide-prefill"
    got = wide.linear(x, w)
    assert got.dtype == torch.float16 and torch.equal(got, torch.nn.functional.linear(x.float(), w.float()).half())
    _as_close_as_reference("linear", (x, w), {})
    monkeypatch.setattr(wide, "native_f16", lambda: "avx512_fp16")
    call = call_on("linear", (x, w), {}, "prefill")
    assert CPU.impl("linear", "wide-prefill").declines(call) == \
        "this CPU has avx512_fp16: PyTorch's f16 GEMM is the faster one"
    monkeypatch.setattr(wide, "native_f16", lambda: None)
    cfg = tiny_config_dict()
    ck = write_random_checkpoint(cfg, tmp_path / "ck", seed=2, dtype="f16")
    art = v4c.compile(ck, tmp_path / "art", target="cpu", dtype="f16")
    fast = v4c.load(art, backend="cpu")
    bound = {(r["op"], r["phase"]): r["implementation"] for r in fast.implementations()}
    for op in ("linear", "moe_ffn", "moe_router", "compressor", "q_proj", "o_proj"):
        assert bound[(op, "prefill")].endswith("wide-prefill"), (op, bound[(op, "prefill")])
    if native.moe_decode_available(torch.float16):
        for op in ("linear", "moe_ffn", "q_proj", "o_proj", "sparse_attention"):
            assert bound[(op, "decode")] in ("native-decode", "native"), (op, bound[(op, "decode")])
    ids = torch.randint(0, cfg["vocab_size"], (2, 40), generator=_g(5))

    def logits(model):
        s = model.new_session(2, max_context=64)
        first = s.forward(ids).float()
        return torch.cat([first, s.forward(ids[:, :1]).float()], dim=1)  # a prefill, then a decode step

    truth = logits(v4c.load(v4c.compile(ck, tmp_path / "f32", target="cpu", dtype="f32"), backend="reference"))
    got, want = logits(fast), logits(v4c.load(art, backend="reference"))
    for stat in (torch.amax, torch.mean):
        e_got, e_want = (float(stat((x - truth).abs()) / stat(truth.abs())) for x in (got, want))
        assert e_got <= 1.25 * e_want, (stat.__name__, e_got, e_want)
