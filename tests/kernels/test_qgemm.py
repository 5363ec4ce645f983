"""Quantised-weight kernels (templates/qgemm.py) under Triton's interpreter, against references built from
``v4c/graph/weight_formats.py``: the activation is quantised per 1x128 and dequantised there, the weights
are dequantised there, and the product is taken by the unquantised ops' IR references (or in float64).

The kernel and its reference then differ only in the order of fp32 sums, so the tolerances are those of
the unquantised GEMM tests (error over max |reference|): fp32 1e-5, fp16 2e-3, bf16 2e-2. The act-quant
kernel must agree bit for bit. Shapes are ragged against every block: N and K not multiples of 128, token
counts not multiples of BLOCK_M, experts that receive no token.
"""
import pytest
import torch

from v4c.codegen.templates import qgemm
from v4c.graph import get_op
from v4c.graph.weight_formats import (dequantize_fp8_block, dequantize_mxfp4, quantize_act_fp8,
                                      quantize_fp8_block, quantize_mxfp4)

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
LIMIT = 10.0


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


def _dq_act(x):
    """The activation as the GEMM sees it: quantised per 1x128 and dequantised (float64)."""
    q, s = quantize_act_fp8(x)
    return q.double() * s.double().repeat_interleave(128, -1)[..., :x.shape[-1]]


def _fp8(n, k, seed):
    return quantize_fp8_block(_randn(n, k, seed=seed, scale=k ** -0.5))


def _close(got, want, dtype, tol=None):
    assert got.dtype == want.dtype == dtype and got.shape == want.shape
    err = ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()
    assert err <= (tol or TOL[dtype]), f"relative error {err:.3g}"
    return err


# ---- activation quantisation ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_act_quant_is_bit_exact(dtype):
    x = _randn(3, 5, 300, seed=1, dtype=dtype)
    x[0, 0, :128] = 0  # an all-zero block: amax clamps to the minimum, codes are zeros
    x[1, 1] *= 1e-3
    x[2, 2, 130:140] = torch.tensor([31.5, -31.5, 0.0302, 448.0, -1e-30, 3.0, 240.0, 7.9, 1e6, -2e6]).to(dtype)
    got_q, got_s = qgemm.act_quant_fp8(x)
    want_q, want_s = quantize_act_fp8(x)
    assert got_q.dtype == torch.float8_e4m3fn and got_s.shape == (3, 5, 3)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(got_s, want_s)
    # a different kernel block must not change anything
    q2, s2 = qgemm.act_quant_fp8(x, meta={"BLOCK_M": 4, "num_warps": 1})
    assert torch.equal(q2.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(s2, want_s)


# ---- dense FP8 projections -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("t", [1, 13])
def test_fp8_linear(dtype, t):
    w, ws = _fp8(200, 300, seed=2)  # N, K: neither a multiple of 128
    x = _randn(2, t, 300, seed=3, dtype=dtype)
    want = get_op("linear").ref(_dq_act(x).to(dtype), dequantize_fp8_block(w, ws).to(dtype))
    _close(qgemm.fp8_linear(x, w, ws), want, dtype)


@pytest.mark.parametrize("mode", [0, 1, 2])
@pytest.mark.parametrize("meta", [{"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 1},
                                  {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}])
def test_fp8_linear_dot_modes_and_blocks(mode, meta):
    """fp32 / fp16 / native e4m3 dots agree; several K steps per scale block; a tile spanning two scale rows."""
    w, ws = _fp8(200, 300, seed=4)
    x = _randn(1, 7, 300, seed=5)
    want = _dq_act(x) @ dequantize_fp8_block(w, ws).double().T
    got = qgemm.fp8_linear(x, w, ws, meta={**meta, "DOT_MODE": mode})
    _close(got, want.float(), torch.float32)


def test_e4m3_decodes_are_exact():
    """Both register decodes of e4m3 bytes (fp16 for sm80/86, fp32 for the interpreter) give every code's
    exact value: normals, subnormals, zeros of both signs, NaN."""
    import triton
    import triton.language as tl

    @triton.jit
    def decode(code_ptr, half_ptr, full_ptr):
        c = tl.load(code_ptr + tl.arange(0, 256))
        tl.store(half_ptr + tl.arange(0, 256), qgemm._e4m3_operand(c, 1))
        tl.store(full_ptr + tl.arange(0, 256), qgemm._e4m3_operand(c, 0))

    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    half, full = torch.empty(256, dtype=torch.float16), torch.empty(256)
    decode[(1,)](codes, half, full)
    want = codes.view(torch.float8_e4m3fn).float()
    for got in (half.float(), full):
        assert torch.equal(got.isnan(), want.isnan())
        real = ~want.isnan()
        assert torch.equal(got[real], want[real])
        assert torch.equal(got[real].signbit(), want[real].signbit())  # -0.0 stays negative


class _Spy:
    """Stands in for a jitted kernel: records the dtypes of the tensors each launch receives."""

    def __init__(self, kernel, seen):
        self.kernel, self.seen = kernel, seen

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.seen.append(([a.dtype for a in args if isinstance(a, torch.Tensor)], kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def sm80(monkeypatch):
    """The launchers as they run on an A100: the module sees compute capability (8, 0), as during an AOT
    compile for sm80, and every kernel launch is recorded."""
    seen = []
    monkeypatch.setattr(qgemm, "_TARGET_CAPABILITY", (8, 0))
    for name in ("_fp8_gemm_kernel", "_qgate_up_kernel", "_qdown_kernel"):
        monkeypatch.setattr(qgemm, name, _Spy(getattr(qgemm, name), seen))
    return seen


def _fp8_free(seen):
    """Each recorded launch took DOT_MODE 1 (fp16 decode) and no fp8 tensor (sm80 has no fp8 type)."""
    assert seen
    for dtypes, kwargs in seen:
        assert torch.float8_e4m3fn not in dtypes and torch.uint8 in dtypes, dtypes
        assert kwargs["DOT_MODE"] == 1 and not kwargs.get("DOT_SCALED", False), kwargs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sm80_byte_decode_path(sm80, dtype):
    """What an sm80 build launches (weights and activation codes as uint8, decoded to fp16 in registers)
    matches the references: a dense GEMM, a norm + RoPE projection over two tiles, and the MoE, whose
    MXFP4 experts take the register unpack."""
    w, ws = _fp8(200, 300, seed=2)
    x = _randn(2, 3, 300, seed=3, dtype=dtype)
    want = get_op("linear").ref(_dq_act(x).to(dtype), dequantize_fp8_block(w, ws).to(dtype))
    _close(qgemm.fp8_linear(x, w, ws, meta={"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32}), want, dtype)
    (wkv, wkvs), norm_w = _fp8(64, 300, seed=6), 1 + _randn(64, seed=7, scale=0.2)
    attrs = {"eps": 1e-6, "rope_dim": 16, "theta": 10000.0, "yarn": None}
    want = get_op("kv_proj").ref(_dq_act(x).to(dtype), dequantize_fp8_block(wkv, wkvs).to(dtype), norm_w,
                                 _positions(3), **attrs)
    got = qgemm.fp8_kv_proj(x, wkv, wkvs, norm_w, _positions(3), **attrs, meta={"BLOCK_N": 32, "BLOCK_K": 32})
    _close(got, want, dtype)
    h, route, experts, shared = _moe_case(1, 5, 160, 6, 2, 96, 80, dtype)
    got = qgemm.moe_ffn_fp4(h, *route, *experts, *shared, limit=LIMIT)
    _close(got, _moe_reference(h, route, experts, shared), dtype)
    _fp8_free(sm80)


HIDDEN, Q_LORA, Q_IN, HEADS, HEAD_DIM, ROPE = 160, 256, 192, 4, 64, 16  # Q_IN: a ragged q_proj input


def _positions(t):
    pos = torch.stack([torch.arange(t), torch.arange(t) + 37])
    pos[1, : t // 2] = -1  # leading padding
    return pos


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["fp8_linear_rms_norm", "fp8_q_proj", "fp8_kv_proj"])
def test_fp8_norm_rope_epilogues(op, dtype):
    t = 5
    rope = {"rope_dim": ROPE, "theta": 160000.0, "yarn": [16.0, 64, 32.0, 1.0]}
    norm_w = 1 + _randn(HEAD_DIM if op == "fp8_kv_proj" else Q_LORA, seed=6, scale=0.2)
    if op == "fp8_linear_rms_norm":
        x, (w, ws) = _randn(2, t, HIDDEN, seed=7, dtype=dtype), _fp8(Q_LORA, HIDDEN, seed=8)
        args, ref_args, attrs = (norm_w,), (norm_w,), {"eps": 1e-6}
    elif op == "fp8_q_proj":
        x, (w, ws) = _randn(2, t, Q_IN, seed=7, dtype=dtype), _fp8(HEADS * HEAD_DIM, Q_IN, seed=8)
        args = ref_args = (_positions(t),)
        attrs = {"shape": ["B", "T", HEADS, HEAD_DIM], "eps": 1e-6, **rope}
    else:
        x, (w, ws) = _randn(2, t, HIDDEN, seed=7, dtype=dtype), _fp8(HEAD_DIM, HIDDEN, seed=8)
        args = ref_args = (norm_w, _positions(t))
        attrs = {"eps": 1e-6, **rope}
    want = get_op(op[4:]).ref(_dq_act(x).to(dtype), dequantize_fp8_block(w, ws).to(dtype), *ref_args, **attrs)
    _close(qgemm.KERNELS[op](x, w, ws, *args, **attrs), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op,group,block_n", [("fp8_linear_rms_norm", 192, 64), ("fp8_q_proj", 64, 16),
                                              ("fp8_kv_proj", 64, 32)])
def test_fp8_norm_groups_wider_than_the_tile(op, group, block_n, dtype):
    """A program normalises a whole norm group BLOCK_N columns at a time (the GEMM output parked in the output
    and read back): a group of 3 tiles that is no power of two (V4-Pro's q_a is 1536 = 3 x 512), and RoPE
    tails that start inside one tile and cover the next."""
    t, rope = 5, 48
    attrs = {"eps": 1e-6}
    x = _randn(2, t, HIDDEN, seed=40, dtype=dtype)
    if op == "fp8_linear_rms_norm":
        (w, ws), norm_w = _fp8(group, HIDDEN, seed=41), 1 + _randn(group, seed=42, scale=0.2)
        args = (norm_w,)
    else:
        attrs.update(rope_dim=rope, theta=10000.0, yarn=[16.0, 64, 32.0, 1.0])
        if op == "fp8_q_proj":
            (w, ws), args = _fp8(HEADS * group, HIDDEN, seed=41), (_positions(t),)
            attrs["shape"] = ["B", "T", HEADS, group]
        else:
            (w, ws), args = _fp8(group, HIDDEN, seed=41), (1 + _randn(group, seed=42, scale=0.2), _positions(t))
    want = get_op(op[4:]).ref(_dq_act(x).to(dtype), dequantize_fp8_block(w, ws).to(dtype), *args, **attrs)
    meta = {"BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": 32}
    assert qgemm._norm_block({**qgemm.DEFAULT_META[op], **meta}, group) < group  # the multi-tile path
    _close(qgemm.KERNELS[op](x, w, ws, *args, **attrs, meta=meta), want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fp8_o_proj(dtype):
    """Grouped GEMM with each group's input quantised on its own, the result rounded to the activation
    dtype and quantised again for the dense GEMM."""
    groups, rank, t = 2, 96, 5
    kg = HEADS * HEAD_DIM // groups  # 128 per group
    o = _randn(2, t, HEADS, HEAD_DIM, seed=9, dtype=dtype)
    wa, was = _fp8(groups * rank, kg, seed=10)
    wb, wbs = _fp8(HIDDEN, groups * rank, seed=11)
    attrs = {"shape": ["B", "T", groups, kg], "groups": groups, "out_shape": ["B", "T", groups * rank]}
    got = qgemm.fp8_o_proj(o, wa, was, wb, wbs, **attrs)
    xa = _dq_act(o.reshape(2, t, groups, kg))
    z = torch.einsum("btgk,grk->btgr", xa, dequantize_fp8_block(wa, was).double().view(groups, rank, kg))
    z = z.reshape(2, t, groups * rank).to(dtype)
    want = (_dq_act(z) @ dequantize_fp8_block(wb, wbs).double().T).to(dtype)
    _close(got, want, dtype)


# ---- grouped MXFP4 experts -----------------------------------------------------------------------

def _moe_case(B, T, D, E, K, I, S, dtype, hash=False, seed=20):
    g = _gen(seed)
    h = torch.randn(B, T, D, generator=g).to(dtype)
    router = torch.randn(E, D, generator=g) / D ** 0.5
    if hash:  # every token picks experts {1, 4}: the others get no token
        ids = torch.randint(0, 5, (B, T), generator=g)
        route = get_op("moe_router").ref(h, router, torch.tensor([[1, 4]] * 5), ids, scaling=1.5, hash=True)
    else:
        route = get_op("moe_router").ref(h, router, torch.randn(E, generator=g) * 0.3, scaling=1.5, hash=False,
                                         topk=K)
    # scaled up so that gate and up pass the clamp limit
    experts = [*quantize_mxfp4(torch.randn(E, 2 * I, D, generator=g) * 6 / D ** 0.5),
               *quantize_mxfp4(torch.randn(E, D, I, generator=g) / I ** 0.5)]
    shared = []
    if S:
        for n, k, sc in ((S, D, 6 / D ** 0.5), (S, D, 6 / D ** 0.5), (D, S, S ** -0.5)):
            shared += quantize_fp8_block(torch.randn(n, k, generator=g) * sc)
    return h, route, experts, shared


def _moe_reference(h, route, experts, shared):
    """Per token and chosen expert, in float64: dequantised activation and weights, clamped SwiGLU,
    the result rounded to the activation dtype and quantised per 1x128, the down GEMM, weighted sum."""
    idx, wts, _, _ = route
    D = h.shape[-1]
    x = _dq_act(h.reshape(-1, D))
    w13, w2 = dequantize_mxfp4(*experts[:2]).double(), dequantize_mxfp4(*experts[2:]).double()
    I = w13.shape[1] // 2

    def ffn(x, wg, wu, wd):
        act = torch.nn.functional.silu((x @ wg.T).clamp(max=LIMIT)) * (x @ wu.T).clamp(-LIMIT, LIMIT)
        return _dq_act(act.to(h.dtype)) @ wd.T

    out = torch.zeros_like(x)
    tok = torch.arange(len(x)).repeat_interleave(idx.shape[-1])
    flat_idx, flat_w = idx.reshape(-1), wts.reshape(-1).double()
    for e in flat_idx.unique().tolist():
        rows = flat_idx == e
        out.index_add_(0, tok[rows], flat_w[rows, None] * ffn(x[tok[rows]], w13[e, :I], w13[e, I:], w2[e]))
    if shared:
        out += ffn(x, *(dequantize_fp8_block(shared[i], shared[i + 1]).double() for i in (0, 2, 4)))
    return out.reshape(h.shape).to(h.dtype)


@pytest.mark.parametrize("dot_scaled", [False, True], ids=["unpack", "dot_scaled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_ffn_fp4(dtype, dot_scaled):
    """33 tokens top-2 of 6 experts; hidden 160 and widths 96 / 80: no dim a multiple of 128."""
    h, route, experts, shared = _moe_case(3, 11, 160, 6, 2, 96, 80, dtype)
    got = qgemm.moe_ffn_fp4(h, *route, *experts, *shared, limit=LIMIT, meta={"DOT_SCALED": dot_scaled})
    _close(got, _moe_reference(h, route, experts, shared), dtype)
    gate_up = _dq_act(h) @ dequantize_mxfp4(*experts[:2]).double().transpose(-1, -2)[:, None]
    assert (gate_up[..., :96] > LIMIT).any() and (gate_up[..., 96:].abs() > LIMIT).any()  # clamps exercised


def test_moe_ffn_fp4_empty_experts_no_shared_and_blocks():
    """Hash routing into experts 1 and 4 only, no shared expert; then other tile sizes agree."""
    h, route, experts, _ = _moe_case(1, 9, 64, 6, 2, 64, 0, torch.float32, hash=True, seed=21)
    assert (route[3].diff() == 0).sum() == 4  # four experts without a token
    want = _moe_reference(h, route, experts, [])
    base = qgemm.moe_ffn_fp4(h, *route, *experts, limit=LIMIT)
    _close(base, want, torch.float32, tol=1e-5)
    for meta in ({"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 32, "BLOCK_N_DOWN": 32},
                 {"BLOCK_M": 16, "BLOCK_K": 128, "DOT_SCALED": True}):
        _close(qgemm.moe_ffn_fp4(h, *route, *experts, limit=LIMIT, meta=meta), want, torch.float32, tol=1e-5)


# ---- contract and errors ---------------------------------------------------------------------------

# the call sites of V4-Flash and V4-Pro as the autotuner describes them (the IR op's input shapes and attributes)
_SITES = {
    "flash": {"fp8_linear_rms_norm": {"inputs": [(1, 1, 4096), (1024, 4096), (1024,)]},
              "fp8_q_proj": {"inputs": [(1, 1, 1024), (32768, 1024), (1, 1)],
                             "attrs": {"shape": ["B", "T", 64, 512], "rope_dim": 64}},
              "fp8_kv_proj": {"inputs": [(1, 1, 4096), (512, 4096), (512,), (1, 1)], "attrs": {"rope_dim": 64}},
              "fp8_o_proj": {"inputs": [(1, 1, 64, 512), (8192, 4096), (4096, 8192)], "attrs": {"groups": 8}},
              "moe_ffn_fp4": {"inputs": [(1, 1, 4096), (1, 1, 6), (1, 1, 6), (1, 1, 6), (257,), (256, 4096, 4096),
                                         (256, 4096, 2048), (2048, 4096), (2048, 4096), (4096, 2048)]}},
    "pro": {"fp8_linear_rms_norm": {"inputs": [(1, 1, 7168), (1536, 7168), (1536,)]},
            "fp8_q_proj": {"inputs": [(1, 1, 1536), (65536, 1536), (1, 1)],
                           "attrs": {"shape": ["B", "T", 128, 512], "rope_dim": 64}},
            "fp8_kv_proj": {"inputs": [(1, 1, 7168), (512, 7168), (512,), (1, 1)], "attrs": {"rope_dim": 64}},
            "fp8_o_proj": {"inputs": [(1, 1, 128, 512), (16384, 4096), (7168, 16384)], "attrs": {"groups": 16}},
            "moe_ffn_fp4": {"inputs": [(1, 1, 7168), (1, 1, 6), (1, 1, 6), (1, 1, 6), (385,), (384, 6144, 7168),
                                       (384, 7168, 3072), (3072, 7168), (3072, 7168), (7168, 3072)]}},
}
# sm80, sm86, sm89, sm90, sm100, sm120: the targets v4c compiles for (99 KiB of shared memory on 8.6/8.9/12.0)
_CAPABILITIES = (None, (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0))


def test_contract_and_constraints():
    assert set(qgemm.KERNELS) == set(qgemm.META) == set(qgemm.DEFAULT_META)
    for op in qgemm.KERNELS:
        assert qgemm.constraints(op, qgemm.DEFAULT_META[op], None) is None, op
        assert set(qgemm.DEFAULT_META[op]) == set(qgemm.META[op])
        assert all(v in qgemm.META[op][k] for k, v in qgemm.DEFAULT_META[op].items()), op
    why = qgemm.constraints("fp8_linear", {"BLOCK_K": 256}, None)
    assert "BLOCK_K=256 must divide the 128-wide scale block" in why
    assert "multiple of 128" in qgemm.constraints("moe_ffn_fp4", {"BLOCK_N": 64}, None)
    assert "MXFP4 block" in qgemm.constraints("moe_ffn_fp4", {}, [(2, 3, 100), (4, 8, 50)])
    assert "norm group width 96 is not a multiple" in qgemm.constraints(
        "fp8_q_proj", {"BLOCK_N": 64}, {"inputs": [(1, 192), (384, 192)], "attrs": {"shape": ["B", "T", 4, 96]}})


@pytest.mark.parametrize("model", list(_SITES))
def test_default_meta_fits_every_target(model):
    """DEFAULT_META runs every call site of the released models on every target: estimated registers under
    the spill budget, shared memory under each target's per-block limit (99 KiB on sm86/89/120)."""
    for op, shapes in _SITES[model].items():
        for cap in _CAPABILITIES:
            assert qgemm.constraints(op, qgemm.DEFAULT_META[op], {**shapes, "capability": cap}) is None, (op, cap)


def test_constraints_count_what_is_live():
    pro_q_a = _SITES["pro"]["fp8_linear_rms_norm"]
    # a norm group of 1536 is six 256-wide tiles (or three of 512), never 1024-wide ones
    assert qgemm.constraints("fp8_linear_rms_norm", {"BLOCK_N": 256, "num_warps": 8}, pro_q_a) is None
    assert "not a multiple" in qgemm.constraints("fp8_linear_rms_norm", {"BLOCK_N": 1024}, pro_q_a)
    # looping over a group's tiles costs registers that one tile per group does not
    wide = {"BLOCK_M": 32, "BLOCK_N": 512, "BLOCK_K": 32, "num_warps": 8}
    assert qgemm.constraints("fp8_q_proj", wide, _SITES["flash"]["fp8_q_proj"]) is None
    assert "registers" in qgemm.constraints("fp8_linear_rms_norm", wide, _SITES["flash"]["fp8_linear_rms_norm"])
    # large accumulators, wide decoded K steps and the MoE's paired accumulators are refused for registers
    assert "registers" in qgemm.constraints(
        "fp8_linear", {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 4}, None)
    assert "registers" in qgemm.constraints(
        "moe_ffn_fp4", {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8}, None)
    # shared memory is judged against the launch device's limit
    big = {"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 4}
    assert qgemm.constraints("fp8_linear", big, {"inputs": [], "capability": (9, 0)}) is None
    assert "shared memory" in qgemm.constraints("fp8_linear", big, {"inputs": [], "capability": (8, 6)})


def test_bad_scales_are_named():
    w, ws = _fp8(200, 300, seed=2)
    x = _randn(1, 2, 300)
    with pytest.raises(ValueError, match=r"fp8_linear: weight \(200, 300\) needs a 128x128-block scale of shape "
                                         r"\(2, 3\), got \(2, 2\)"):
        qgemm.fp8_linear(x, w, ws[:, :2])
    with pytest.raises(ValueError, match="FP8 weight must be float8_e4m3fn"):
        qgemm.fp8_linear(x, w.float(), ws)
    h, route, experts, _ = _moe_case(1, 2, 64, 4, 2, 32, 0, torch.float32, seed=22)
    with pytest.raises(ValueError, match=r"moe_ffn_fp4 \(w2\): experts \(4, 64, 16\) need a 1x32 scale"):
        qgemm.moe_ffn_fp4(h, *route, *experts[:3], experts[3][:, :32], limit=LIMIT)


# ---- the IR's ops with quantised params (v4c.graph.weights.QuantizedWeight) -------------------------

def test_quantized_launchers_match_the_ir_references():
    """QUANTIZED[op] takes the IR's quantised weight objects and agrees with the op's own reference, which
    multiplies tile by tile in ``v4c.graph.weights`` (an implementation independent of the kernels)."""
    from v4c.graph.weights import QuantizedWeight
    q8 = lambda n, k, seed: QuantizedWeight("f8e4m3", *_fp8(n, k, seed))  # noqa: E731
    x = _randn(2, 5, HIDDEN, seed=30)
    w = q8(200, HIDDEN, 31)
    _close(qgemm.QUANTIZED["linear"][0](x, w), get_op("linear").ref(x, w), torch.float32)

    attrs = {"eps": 1e-6, "rope_dim": ROPE, "theta": 10000.0, "yarn": None}
    args = (x, q8(HEAD_DIM, HIDDEN, 32), 1 + _randn(HEAD_DIM, seed=33, scale=0.2), _positions(5))
    _close(qgemm.QUANTIZED["kv_proj"][0](*args, **attrs), get_op("kv_proj").ref(*args, **attrs), torch.float32)

    h, route, experts, shared = _moe_case(3, 11, 160, 6, 2, 96, 80, torch.float32, seed=34)
    args = (h, *route, QuantizedWeight("mxfp4", *experts[:2]), QuantizedWeight("mxfp4", *experts[2:]),
            *(QuantizedWeight("f8e4m3", shared[i], shared[i + 1]) for i in (0, 2, 4)))
    _close(qgemm.QUANTIZED["moe_ffn"][0](*args, limit=LIMIT), get_op("moe_ffn").ref(*args, limit=LIMIT),
           torch.float32)
    with pytest.raises(ValueError, match="linear: expected a f8e4m3 quantised weight, got mxfp4"):
        qgemm.QUANTIZED["linear"][0](x, QuantizedWeight("mxfp4", *quantize_mxfp4(_randn(8, HIDDEN))))
