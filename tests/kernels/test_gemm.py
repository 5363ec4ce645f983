"""GEMM template (linear, linear_rms_norm, q_proj, kv_proj, o_proj) against the IR ops' references,
run through Triton's interpreter on the tiny model's shapes."""
import itertools

import pytest
import torch

from v4c.codegen.templates import gemm
from v4c.graph import get_op

# error relative to the reference's largest magnitude; 16-bit outputs may differ by an ulp or two
# where the kernel and the reference round a sum differently, and the norm / RoPE stages carry that on
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
DTYPES = list(TOL)
TOKENS = [1, 5, 13]  # ragged: none a multiple of the row block
YARN = [16.0, 64, 32.0, 1.0]  # the tiny model's compressed-layer YaRN
HIDDEN, HEADS, HEAD_DIM, ROPE, Q_LORA, O_GROUPS, O_RANK = 256, 8, 64, 16, 128, 2, 64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed)) * scale).to(dtype)


def _positions(t, seed=0):
    """Batch 2: row 0 from 0, row 1 at a later offset with leading padding (-1)."""
    pos = torch.stack([torch.arange(t), torch.arange(t) + 37 + seed])
    if t > 1:
        pos[1, : t // 2] = -1
    return pos


def _close(got, want, dtype):
    assert got.dtype == want.dtype and got.shape == want.shape
    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err <= TOL[dtype], f"relative error {err:.3g} > {TOL[dtype]}"


def _inputs(op, t, dtype, yarn=None, seed=0):
    """(tensors, attrs) for ``op`` at the tiny model's sizes, batch 2 and ``t`` tokens."""
    if op == "linear":
        return [_randn(2, t, HIDDEN, dtype=dtype, seed=seed), _randn(96, HIDDEN, dtype=dtype, seed=seed + 1,
                                                                     scale=HIDDEN ** -0.5)], {}
    if op == "linear_rms_norm":
        return [_randn(2, t, HIDDEN, dtype=dtype, seed=seed), _randn(Q_LORA, HIDDEN, dtype=dtype, seed=seed + 1,
                                                                     scale=HIDDEN ** -0.5),
                1 + _randn(Q_LORA, seed=seed + 2, scale=0.2)], {"eps": 1e-6}
    rope = {"rope_dim": ROPE, "theta": 160000.0 if yarn else 10000.0, "yarn": yarn}
    if op == "q_proj":
        return [_randn(2, t, Q_LORA, dtype=dtype, seed=seed),
                _randn(HEADS * HEAD_DIM, Q_LORA, dtype=dtype, seed=seed + 1, scale=Q_LORA ** -0.5),
                _positions(t, seed)], {"shape": ["B", "T", HEADS, HEAD_DIM], "eps": 1e-6, **rope}
    if op == "kv_proj":
        return [_randn(2, t, HIDDEN, dtype=dtype, seed=seed),
                _randn(HEAD_DIM, HIDDEN, dtype=dtype, seed=seed + 1, scale=HIDDEN ** -0.5),
                1 + _randn(HEAD_DIM, seed=seed + 2, scale=0.2), _positions(t, seed)], {"eps": 1e-6, **rope}
    if op == "o_proj":
        kg = HEADS * HEAD_DIM // O_GROUPS
        return [_randn(2, t, HEADS, HEAD_DIM, dtype=dtype, seed=seed),
                _randn(O_GROUPS * O_RANK, kg, dtype=dtype, seed=seed + 1, scale=kg ** -0.5),
                _randn(HIDDEN, O_GROUPS * O_RANK, dtype=dtype, seed=seed + 2, scale=(O_GROUPS * O_RANK) ** -0.5)], \
            {"shape": ["B", "T", O_GROUPS, kg], "groups": O_GROUPS, "out_shape": ["B", "T", O_GROUPS * O_RANK]}
    raise KeyError(op)


def _run(op, tensors, attrs, meta=None):
    return gemm.KERNELS[op](*tensors, meta=meta or {}, **attrs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("op", ["linear", "linear_rms_norm", "o_proj"])
def test_projection_matches_reference(op, t, dtype):
    tensors, attrs = _inputs(op, t, dtype)
    _close(_run(op, tensors, attrs), get_op(op).ref(*tensors, **attrs), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("yarn", [None, YARN], ids=["plain", "yarn"])
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("op", ["q_proj", "kv_proj"])
def test_rope_projection_matches_reference(op, t, yarn, dtype):
    tensors, attrs = _inputs(op, t, dtype, yarn)
    _close(_run(op, tensors, attrs), get_op(op).ref(*tensors, **attrs), dtype)


@pytest.mark.parametrize("op", ["q_proj", "kv_proj"])
def test_rope_at_long_context_positions(op):
    """Positions up to 1M (fp32): the in-kernel angle reduction keeps cos/sin accurate; YaRN matters."""
    tensors, attrs = _inputs(op, 13, torch.float32, YARN)
    tensors[-1] = torch.randint(0, 1_000_000, (2, 13), generator=_gen(3))
    tensors[-1][0, :4] = -1
    want = get_op(op).ref(*tensors, **attrs)
    _close(_run(op, tensors, attrs), want, torch.float32)
    plain = get_op(op).ref(*tensors, **{**attrs, "yarn": None})
    assert (plain - want).abs().max() > 0.1  # the YaRN frequencies are really in play


def test_padding_positions_rotate_as_position_zero():
    tensors, attrs = _inputs("kv_proj", 5, torch.float32, YARN)
    pos = tensors[-1]
    pos[:] = -1
    got = _run("kv_proj", tensors, attrs)
    tensors[-1] = torch.zeros_like(pos)
    torch.testing.assert_close(got, _run("kv_proj", tensors, attrs), rtol=0, atol=0)


def test_weights_are_cast_to_the_activation_dtype():
    """The reference multiplies ``w.to(x.dtype)``: fp32 weights with fp16 activations."""
    x, w = _inputs("linear", 5, torch.float16)[0]
    w = w.float() + 1e-4  # not representable in fp16
    _close(_run("linear", [x, w], {}), get_op("linear").ref(x, w), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", ["linear_rms_norm", "q_proj", "kv_proj"])
def test_norm_groups_of_any_width(op, dtype):
    """Norm groups (heads, whole rows) that are not powers of two: 48-wide, so the tile is padded to 64 and
    the padding is masked out of the mean, the RoPE tail and the stores; three heads side by side."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 5, 96, generator=g).to(dtype)
    rope = {"rope_dim": 16, "theta": 10000.0, "yarn": None}
    if op == "linear_rms_norm":
        tensors, attrs = [x, (torch.randn(48, 96, generator=g) * 0.1).to(dtype), 1 + 0.2 * torch.randn(48, generator=g)], \
            {"eps": 1e-6}
    elif op == "q_proj":
        tensors, attrs = [x, (torch.randn(3 * 48, 96, generator=g) * 0.1).to(dtype), _positions(5)], \
            {"shape": ["B", "T", 3, 48], "eps": 1e-6, **rope}
    else:
        tensors, attrs = [x, (torch.randn(48, 96, generator=g) * 0.1).to(dtype), 1 + 0.2 * torch.randn(48, generator=g),
                          _positions(5)], {"eps": 1e-6, **rope}
    _close(_run(op, tensors, attrs), get_op(op).ref(*tensors, **attrs), dtype)


def _meta_sample(op, n=4):
    """The default plus ``n`` deterministic picks from META's grid that ``constraints`` accepts."""
    space = gemm.META[op]
    keys = list(space)
    grid = list(itertools.product(*(space[k] for k in keys)))
    picks = [dict(zip(keys, grid[i])) for i in torch.randperm(len(grid), generator=_gen(7)).tolist()]
    tensors, attrs = _inputs(op, 13, torch.float16, YARN if op in ("q_proj", "kv_proj") else None)
    shapes = {"inputs": [tuple(t.shape) for t in tensors], "attrs": attrs}
    ok = [m for m in picks if gemm.constraints(op, m, shapes) is None]
    return [dict(gemm.DEFAULT_META[op])] + ok[:n], tensors, attrs


@pytest.mark.parametrize("op", list(gemm.KERNELS))
def test_meta_candidates_agree(op):
    metas, tensors, attrs = _meta_sample(op)
    assert len(metas) == 5
    want = get_op(op).ref(*tensors, **attrs)
    outs = [_run(op, tensors, attrs, m) for m in metas]
    for m, got in zip(metas, outs):
        _close(got, want, torch.float16)
    for got in outs[1:]:  # and with each other (tiles only change the fp32 summation order)
        _close(got, outs[0], torch.float16)


def test_constraints():
    c = gemm.constraints
    # the norm tile must be the norm group: the head for q_proj, the whole row for kv_proj
    q_real = {"inputs": [(1, 1, 1024), (64 * 512, 1024), (1, 1)], "attrs": {"shape": ["B", "T", 64, 512],
                                                                             "rope_dim": 64}}
    assert c("q_proj", {}, q_real) is None  # the default takes the group width
    assert c("q_proj", {"BLOCK_N": 512}, q_real) is None
    assert "group width 512" in c("q_proj", {"BLOCK_N": 256}, q_real)
    assert c("q_proj", {"BLOCK_N": 64}, [(2, 5, 128), (512, 128), (2, 5), (2, 5, 8, 64)]) is None
    assert "group width 64" in c("kv_proj", {"BLOCK_N": 128}, [(2, 5, 256), (64, 256), (64,), (2, 5)])
    assert c("kv_proj", {}, [(2, 5, 256), (96, 256), (96,), (2, 5)]) is None  # any width: the tile is padded
    assert "odd" in c("kv_proj", {}, {"inputs": [(2, 5, 256), (95, 256), (95,), (2, 5)], "attrs": {"rope_dim": 16}})
    assert "rope_dim" in c("kv_proj", {}, {"inputs": [(2, 5, 256), (64, 256), (64,), (2, 5)],
                                           "attrs": {"rope_dim": 80}})
    # real-size defaults fit an H200 (V4-Flash: q_lora 1024, heads 64 x 512, kv 512, o 8 x 1024)
    assert c("linear_rms_norm", {}, [(1, 1, 4096), (1024, 4096), (1024,)]) is None
    assert c("kv_proj", {}, [(1, 1, 4096), (512, 4096), (512,), (1, 1)]) is None
    assert c("o_proj", {}, [(1, 1, 64, 512), (8192, 4096), (4096, 8192)]) is None
    assert c("linear", {}, [(1, 1, 4096), (1024, 4096)]) is None
    # shared memory and registers
    assert "shared memory" in c("linear_rms_norm", {"BLOCK_K": 128, "num_stages": 4},
                                [(1, 1, 4096), (1024, 4096), (1024,)])
    assert "registers" in c("linear", {"BLOCK_M": 128, "BLOCK_N": 256, "num_warps": 4, "BLOCK_K": 32},
                            [(1, 1, 4096), (1024, 4096)])
    assert "power of two" in c("linear", {"BLOCK_M": 24}, [(1, 1, 4096), (1024, 4096)])
    with pytest.raises(ValueError, match="group width"):
        tensors, attrs = _inputs("q_proj", 1, torch.float32)
        _run("q_proj", tensors, attrs, {"BLOCK_N": 128})


def test_template_contract():
    assert set(gemm.KERNELS) == {"linear", "linear_rms_norm", "q_proj", "kv_proj", "o_proj"}
    for op in gemm.KERNELS:
        assert set(gemm.DEFAULT_META[op]) == set(gemm.META[op])
        for k, v in gemm.DEFAULT_META[op].items():
            assert v in gemm.META[op][k] or (k == "BLOCK_N" and v is None)
