"""Bit-exact tests of v4c.graph.quant against references written here in numpy / plain Python."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from v4c.graph import quant as Q

# --------------------------------------------------------------------------------------------- references


def _e4m3_positive_grid():
    """Values of the e4m3fn codes 0..126 (0x7F is NaN), decoded by hand; increasing with the code."""
    vals = []
    for code in range(127):
        exp, man = code >> 3, code & 7
        vals.append(man / 8 * 2.0 ** -6 if exp == 0 else (1 + man / 8) * 2.0 ** (exp - 7))
    grid = np.array(vals)
    assert np.all(np.diff(grid) > 0) and grid[-1] == 448.0
    return grid


E4M3_GRID = _e4m3_positive_grid()
E2M1_GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _rne_codes(a, grid):
    """Index of the nearest grid value to each a >= 0 (ties to the even index; saturates at the top)."""
    a = np.minimum(np.asarray(a, dtype=np.float64), grid[-1])
    hi = np.clip(np.searchsorted(grid, a, side="left"), 1, len(grid) - 1)
    lo = hi - 1
    dlo, dhi = a - grid[lo], grid[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    return np.where(pick_hi, hi, lo)


def ref_e4m3_bytes(y):
    y = np.asarray(y, dtype=np.float64)
    return (_rne_codes(np.abs(y), E4M3_GRID) | np.where(np.signbit(y), 0x80, 0)).astype(np.uint8)


def ref_e4m3_value(b):
    b = np.asarray(b, dtype=np.int64)
    return np.where(b & 0x80, -1.0, 1.0) * E4M3_GRID[b & 0x7F]


def ref_e2m1_nibbles(y):
    y = np.asarray(y, dtype=np.float64)
    return (_rne_codes(np.abs(y), E2M1_GRID) | np.where(np.signbit(y), 8, 0)).astype(np.uint8)


def ref_pow2_exponent(amax, qmax):
    """Smallest e with 2**e >= amax/qmax, exactly (Fractions); 0 for amax == 0."""
    if amax == 0:
        return 0
    target = Fraction(float(amax)) / qmax
    e = math.frexp(float(amax) / qmax)[1]  # first guess, then exact correction
    while Fraction(2) ** e < target:
        e += 1
    while Fraction(2) ** (e - 1) >= target:
        e -= 1
    return e


def ref_bf16_bytes(x):
    """float32 -> bf16 by hand (round to nearest even on the bit pattern), little-endian bytes."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    return np.frombuffer(rounded.tobytes(), dtype=np.uint8).reshape(rounded.shape + (2,))


def ref_bf16_value(x):
    b = ref_bf16_bytes(x).astype(np.uint32)
    return ((b[..., 0] | (b[..., 1] << 8)) << 16).view(np.float32).astype(np.float64)


def ref_kv_row(row, r, block):
    """One packed row (bytes) and its exact dequantised values, from a float32 numpy row."""
    d = row.shape[0]
    n = d - r
    codes, scales, deq = [], [], []
    for j in range(n // block):
        blk = row[j * block:(j + 1) * block].astype(np.float64)
        e = ref_pow2_exponent(np.abs(blk).max(), 448)
        b = ref_e4m3_bytes(blk / 2.0 ** e)
        codes.append(b)
        scales.append(e + 127)
        deq.append(ref_e4m3_value(b) * 2.0 ** e)
    body = np.concatenate(codes + [ref_bf16_bytes(row[n:]).reshape(-1), np.array(scales, dtype=np.uint8)])
    total = (len(body) + 7) // 8 * 8
    packed = np.concatenate([body, np.zeros(total - len(body), dtype=np.uint8)])
    return packed, np.concatenate(deq + [ref_bf16_value(row[n:])])


def ref_index_fp8(row):
    row = row.astype(np.float64)
    e = ref_pow2_exponent(np.abs(row).max(), 448)
    b = ref_e4m3_bytes(row / 2.0 ** e)
    sb = np.frombuffer(np.array([2.0 ** e], dtype="<f4").tobytes(), dtype=np.uint8)
    return np.concatenate([b, sb]), ref_e4m3_value(b) * 2.0 ** e


def ref_index_fp4(row):
    row = row.astype(np.float64)
    nibs, scales, deq = [], [], []
    for j in range(len(row) // 32):
        blk = row[32 * j:32 * (j + 1)]
        e = ref_pow2_exponent(np.abs(blk).max(), 6)
        nb = ref_e2m1_nibbles(blk / 2.0 ** e)
        nibs.append(nb)
        scales.append(e + 127)
        deq.append(np.where(nb & 8, -1.0, 1.0) * E2M1_GRID[nb & 7] * 2.0 ** e)
    nb = np.concatenate(nibs)
    packed = (nb[0::2] | (nb[1::2] << 4)).astype(np.uint8)
    return np.concatenate([packed, np.array(scales, dtype=np.uint8)]), np.concatenate(deq)


def random_rows(shape, block, seed):
    """Gaussian rows with per-block magnitudes spread over many binades, some zero blocks and rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    nblk = shape[-1] // block
    mags = torch.randint(-20, 21, shape[:-1] + (nblk,), generator=g).to(torch.float32).exp2()
    x = (x.reshape(shape[:-1] + (nblk, block)) * mags.unsqueeze(-1)).reshape(shape)
    flat = x.reshape(-1, shape[-1])
    flat[0, :block] = 0.0  # a zero block
    flat[-1] = 0.0  # a zero row
    if flat.shape[0] > 2:
        flat[1, block:2 * block] = -0.0
    return x


SEEDS = [0, 1, 2]
KV_CASES = [((3, 5, 512), 64), ((2, 7, 64), 16)]


# --------------------------------------------------------------------------------------------- sizes


def test_sizes():
    assert Q.kv_block(512, 64) == 64
    assert Q.kv_row_bytes(512, 64) == 584
    assert Q.kv_row_bytes(512, 64, 64) == 584
    assert Q.kv_block(64, 16) == 16
    assert Q.kv_row_bytes(64, 16) == 88  # 48 + 32 + 3 = 83 -> 88
    assert Q.kv_row_bytes(64, 16, 48) == 88  # 48 + 32 + 1 = 81 -> 88
    assert Q.kv_block(128, 64) == 64 and Q.kv_block(96, 16) == 16 and Q.kv_block(100, 4) == 32
    assert Q.index_key_bytes(128, "fp8") == 132
    assert Q.index_key_bytes(128, "fp4") == 68
    assert Q.index_key_bytes(128, "bf16") == 256
    assert Q.index_key_bytes(128, "f32") == 512
    assert Q.index_key_bytes(32, "fp8") == 36 and Q.index_key_bytes(32, "fp4") == 17
    x = torch.randn(2, 512)
    assert Q.quantize_kv_rows(x, 64).shape == (2, 584)
    assert Q.quantize_index_fp8(torch.randn(2, 3, 128)).shape == (2, 3, 132)
    assert Q.quantize_index_fp4(torch.randn(2, 3, 128)).shape == (2, 3, 68)
    assert Q.quantize_index_fp4(torch.randn(5, 32)).shape == (5, 17)
    for bad in [lambda: Q.index_key_bytes(128, "int8"), lambda: Q.index_key_bytes(48, "fp4"),
                lambda: Q.kv_row_bytes(64, 16, 32), lambda: Q.kv_row_bytes(64, 80)]:
        with pytest.raises(ValueError):
            bad()


# --------------------------------------------------------------------------------------------- scales


@pytest.mark.parametrize("fn,qmax", [(Q.e4m3_pow2_scale, 448), (Q.e2m1_pow2_scale, 6)])
def test_pow2_scales(fn, qmax):
    g = torch.Generator().manual_seed(5)
    amax = (torch.rand(4000, generator=g) * 2 ** torch.randint(-40, 40, (4000,), generator=g)).to(torch.float32)
    edge = torch.tensor([qmax, qmax * 2.0, qmax / 4, 1.0, np.nextafter(np.float32(qmax), np.float32(1e9)),
                         np.nextafter(np.float32(qmax), np.float32(0))], dtype=torch.float32)
    amax = torch.cat([amax, edge])
    s, b = fn(amax)
    assert s.dtype == torch.float32 and b.dtype == torch.uint8
    for a, sv, bv in zip(amax.tolist(), s.tolist(), b.tolist()):
        e = ref_pow2_exponent(a, qmax)
        assert bv == e + 127 and sv == 2.0 ** e
        if a > 0:
            assert a / sv <= qmax and a / sv > qmax / 2
    s0, b0 = fn(torch.zeros(3))
    assert s0.tolist() == [1.0] * 3 and b0.tolist() == [127] * 3
    # exact edges: amax == qmax * 2^k gives 2^k; one ulp more gives 2^(k+1)
    assert fn(torch.tensor([float(qmax)]))[0].item() == 1.0
    assert fn(edge[4:5])[0].item() == 2.0


# --------------------------------------------------------------------------------------------- KV rows


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape,r", KV_CASES)
def test_kv_rows_bit_exact(shape, r, seed):
    d = shape[-1]
    block = Q.kv_block(d, r)
    x = random_rows(shape, block, seed)
    packed = Q.quantize_kv_rows(x, r)
    assert packed.dtype == torch.uint8 and packed.shape == shape[:-1] + (Q.kv_row_bytes(d, r),)
    deq = Q.dequantize_kv_rows(packed, d, r)
    assert deq.dtype == torch.float32 and deq.shape == shape
    xr = x.reshape(-1, d).numpy()
    pr = packed.reshape(-1, packed.shape[-1]).numpy()
    dr = deq.reshape(-1, d).numpy().astype(np.float64)
    for i in range(xr.shape[0]):
        exp_packed, exp_deq = ref_kv_row(xr[i], r, block)
        np.testing.assert_array_equal(pr[i], exp_packed)
        np.testing.assert_array_equal(dr[i], exp_deq)
    # the zero block stores scale byte 127 and zero codes; the -0.0 block keeps the sign bit
    n = d - r
    assert pr[0, n + 2 * r] == 127 and not pr[0, :block].any()
    assert (pr[1, block:2 * block] == 0x80).all()


def test_kv_rows_layout_v4():
    """Field positions for V4: 448 B codes | 128 B bf16 rope | 7 B scales | 1 B zero pad."""
    x = torch.zeros(512)
    x[:64] = 448.0 * 4  # block 0: scale 4
    x[64:128] = -1.0  # block 1: scale 2^-8  -> -1 = -256 * 2^-8 -> code 0xF8
    x[448:] = torch.arange(64, dtype=torch.float32) * 0.5 - 3
    p = Q.quantize_kv_rows(x, 64)
    assert p.shape == (584,)
    assert (p[:64] == 0x7E).all() and (p[64:128] == 0xF8).all() and (p[128:448] == 0).all()
    rope = p[448:576].numpy().view("<u2").view(np.uint16)
    np.testing.assert_array_equal(rope, x[448:].to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16))
    assert p[576:583].tolist() == [129, 119, 127, 127, 127, 127, 127] and p[583] == 0
    np.testing.assert_array_equal(Q.dequantize_kv_rows(p, 512, 64).numpy(), x.numpy())


def test_kv_rows_explicit_block_and_dtypes():
    x = random_rows((4, 64), 16, 3)
    p = Q.quantize_kv_rows(x, 16, block=48)
    assert p.shape == (4, 88)
    for i in range(4):
        exp_packed, exp_deq = ref_kv_row(x[i].numpy(), 16, 48)
        np.testing.assert_array_equal(p[i].numpy(), exp_packed)
        np.testing.assert_array_equal(Q.dequantize_kv_rows(p, 64, 16, block=48)[i].numpy().astype(np.float64),
                                      exp_deq)
    # bf16 / fp16 inputs quantise exactly like their float32 values; dtype= sets the output dtype
    xb = x.to(torch.bfloat16)
    assert torch.equal(Q.quantize_kv_rows(xb, 16), Q.quantize_kv_rows(xb.float(), 16))
    assert Q.dequantize_kv_rows(Q.quantize_kv_rows(xb, 16), 64, 16, dtype=torch.bfloat16).dtype == torch.bfloat16
    # round trip is idempotent: dequantised values re-quantise to the same bytes
    deq = Q.dequantize_kv_rows(p, 64, 16, block=48)
    assert torch.equal(Q.quantize_kv_rows(deq, 16, block=48), p)
    # non-contiguous input
    xt = torch.randn(64, 5).t()
    assert torch.equal(Q.quantize_kv_rows(xt, 16), Q.quantize_kv_rows(xt.contiguous(), 16))


def test_kv_rows_error_bound():
    x = random_rows((6, 9, 512), 64, 11)
    deq = Q.dequantize_kv_rows(Q.quantize_kv_rows(x, 64), 512, 64)
    nope, dn = x[..., :448].reshape(6, 9, 7, 64), deq[..., :448].reshape(6, 9, 7, 64)
    err = (nope - dn).abs()
    amax = nope.abs().amax(-1, keepdim=True)
    s = Q.e4m3_pow2_scale(amax)[0]
    assert (err <= nope.abs() * 2 ** -4 + s * 2 ** -10).all()  # half an ulp: normal / subnormal e4m3 codes
    assert (err <= amax * 2 ** -4).all()
    rel_rope = ((x[..., 448:] - deq[..., 448:]).abs() <= x[..., 448:].abs() * 2 ** -8)
    assert rel_rope.all()


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_raises(bad):
    x = torch.randn(2, 512)
    x[1, 7] = bad
    with pytest.raises(ValueError):
        Q.quantize_kv_rows(x, 64)
    y = torch.randn(3, 128)
    y[2, 100] = bad
    with pytest.raises(ValueError):
        Q.quantize_index_fp8(y)
    with pytest.raises(ValueError):
        Q.quantize_index_fp4(y)
    with pytest.raises(ValueError):
        Q.e4m3_pow2_scale(torch.tensor([1.0, bad]))


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        Q.quantize_kv_rows(torch.randn(2, 64), 16, block=32)  # 32 does not divide 48
    with pytest.raises(ValueError):
        Q.dequantize_kv_rows(torch.zeros(2, 583, dtype=torch.uint8), 512, 64)
    with pytest.raises(ValueError):
        Q.dequantize_kv_rows(torch.zeros(2, 584), 512, 64)  # not uint8
    with pytest.raises(ValueError):
        Q.quantize_index_fp4(torch.randn(2, 48))
    with pytest.raises(ValueError):
        Q.dequantize_index_fp8(torch.zeros(2, 131, dtype=torch.uint8), 128)
    with pytest.raises(ValueError):
        Q.quantize_kv_rows(torch.ones(2, 64, dtype=torch.int32), 16)


# --------------------------------------------------------------------------------------------- e4m3 rounding


def test_e4m3_every_midpoint_and_code():
    """A scale-1 row (amax exactly 448) carrying every grid value, every midpoint and their negatives."""
    mids = (E4M3_GRID[:-1] + E4M3_GRID[1:]) / 2  # all exactly representable in float32
    vals = np.concatenate([E4M3_GRID, mids, -E4M3_GRID, -mids, [0.0009, -0.0009, 440.0, 447.9]])
    vals = vals.astype(np.float32)
    pad = (-len(vals)) % 127
    vals = np.concatenate([vals, np.zeros(pad, np.float32)]).reshape(-1, 127)
    rows = np.concatenate([np.full((vals.shape[0], 1), 448.0, np.float32), vals], axis=1)  # D = 128
    x = torch.from_numpy(rows)
    p = Q.quantize_index_fp8(x)
    assert (p[:, 128:].numpy().view("<f4") == 1.0).all()
    np.testing.assert_array_equal(p[:, :128].numpy(), ref_e4m3_bytes(rows))
    # spot checks of ties: 232 is between 224 (0x76) and 240 (0x77) -> even 0x76; 2^-9 * 1.5 -> code 2
    q = Q.quantize_index_fp8(torch.tensor([448.0, 232.0, 1.5 * 2 ** -9, 0.5 * 2 ** -9, -17.0] + [0.0] * 123))
    assert q[:5].tolist() == [0x7E, 0x76, 0x02, 0x00, 0xD8]  # -17 ties between -16 and -18 -> -16
    np.testing.assert_array_equal(Q.dequantize_index_fp8(p, 128).numpy().astype(np.float64),
                                  ref_e4m3_value(ref_e4m3_bytes(rows)))


# --------------------------------------------------------------------------------------------- indexer keys


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(3, 5, 128), (4, 32)])
def test_index_fp8_bit_exact(shape, seed):
    x = random_rows(shape, 32, seed)
    p = Q.quantize_index_fp8(x)
    D = shape[-1]
    assert p.shape == shape[:-1] + (D + 4,)
    deq = Q.dequantize_index_fp8(p, D)
    xr, pr, dr = x.reshape(-1, D).numpy(), p.reshape(-1, D + 4).numpy(), deq.reshape(-1, D).numpy()
    for i in range(xr.shape[0]):
        ep, ed = ref_index_fp8(xr[i])
        np.testing.assert_array_equal(pr[i], ep)
        np.testing.assert_array_equal(dr[i].astype(np.float64), ed)
    assert pr[-1, D:].view("<f4")[0] == 1.0  # zero row -> scale 1
    err = (x - deq).abs()
    amax = x.abs().amax(-1, keepdim=True)
    s = Q.e4m3_pow2_scale(amax)[0]
    assert (err <= x.abs() * 2 ** -4 + s * 2 ** -10).all()
    assert (err <= amax * 2 ** -4).all()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(3, 5, 128), (4, 32)])
def test_index_fp4_bit_exact(shape, seed):
    x = random_rows(shape, 32, seed)
    p = Q.quantize_index_fp4(x)
    D = shape[-1]
    nb = D // 2 + D // 32
    assert p.shape == shape[:-1] + (nb,)
    deq = Q.dequantize_index_fp4(p, D)
    xr, pr, dr = x.reshape(-1, D).numpy(), p.reshape(-1, nb).numpy(), deq.reshape(-1, D).numpy()
    for i in range(xr.shape[0]):
        ep, ed = ref_index_fp4(xr[i])
        np.testing.assert_array_equal(pr[i], ep)
        np.testing.assert_array_equal(dr[i].astype(np.float64), ed)
    assert (pr[-1, D // 2:] == 127).all()
    xb, db = x.reshape(-1, D // 32, 32), deq.reshape(-1, D // 32, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    assert ((xb - db).abs() <= amax / 4).all()


E2M1_TABLE = [
    (0.0, 0.0), (0.1, 0.0), (0.25, 0.0), (0.26, 0.5), (0.5, 0.5), (0.75, 1.0), (1.0, 1.0), (1.25, 1.0),
    (1.5, 1.5), (1.75, 2.0), (2.0, 2.0), (2.5, 2.0), (2.51, 3.0), (3.0, 3.0), (3.5, 4.0), (4.0, 4.0),
    (4.99, 4.0), (5.0, 4.0), (5.01, 6.0), (5.5, 6.0), (6.0, 6.0),
]


def test_e2m1_rounding_table():
    vals = [v for v, _ in E2M1_TABLE]
    want = [w for _, w in E2M1_TABLE]
    x = torch.zeros(64)  # two blocks, each with amax 6 -> scale 1
    x[:len(vals)] = torch.tensor(vals)
    x[31] = 6.0
    x[32:32 + len(vals)] = -torch.tensor(vals)
    x[63] = -6.0
    p = Q.quantize_index_fp4(x)
    assert p[32:].tolist() == [127, 127]
    deq = Q.dequantize_index_fp4(p, 64)
    assert deq[:len(vals)].tolist() == want
    assert deq[32:32 + len(vals)].tolist() == [-w for w in want]
    # nibble encoding: low nibble = even element; sign bit 8; -0.1 rounds to negative zero (0x8)
    y = torch.tensor([0.5, -3.0, 6.0, 0.0, -0.1, 1.75] + [0.0] * 26)
    q = Q.quantize_index_fp4(y)
    assert q[0].item() == (0x8 | 5) << 4 | 1
    assert q[1].item() == 0 << 4 | 7
    assert q[2].item() == 4 << 4 | 0x8
    assert q[16].item() == 127
    d = Q.dequantize_index_fp4(q, 32)
    assert d[4].item() == 0.0 and math.copysign(1.0, d[4].item()) == -1.0
    # amax 7 -> scale 2: 7/2 = 3.5 -> 4 (tie to even), 5/2 = 2.5 -> 2, 1/2 = 0.5 -> 0.5
    z = torch.tensor([7.0, 5.0, 1.0] + [0.0] * 29)
    assert Q.dequantize_index_fp4(Q.quantize_index_fp4(z), 32)[:3].tolist() == [8.0, 4.0, 1.0]


# --------------------------------------------------------------------------------------------- Hadamard


def _sylvester(n):
    h = np.array([[1.0]])
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / math.sqrt(n)


@pytest.mark.parametrize("n", [1, 2, 8, 32, 128])
def test_hadamard_matches_sylvester(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 4, n, dtype=torch.float64, generator=g)
    y = Q.hadamard(x)
    np.testing.assert_allclose(y.numpy(), x.numpy() @ _sylvester(n), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(Q.hadamard(y).numpy(), x.numpy(), rtol=1e-12, atol=1e-12)  # self-inverse
    eye = Q.hadamard(torch.eye(n, dtype=torch.float64))
    np.testing.assert_allclose((eye @ eye.T).numpy(), np.eye(n), atol=1e-12)  # orthogonal


def test_hadamard_dot_products_dim_and_dtypes():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 128, generator=g), torch.randn(7, 128, generator=g)
    torch.testing.assert_close(Q.hadamard(q) @ Q.hadamard(k).T, q @ k.T, rtol=1e-5, atol=1e-4)
    x = torch.randn(4, 16, 3, generator=g)
    torch.testing.assert_close(Q.hadamard(x, dim=1), Q.hadamard(x.transpose(1, 2)).transpose(1, 2))
    xb = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    yb = Q.hadamard(xb)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb, Q.hadamard(xb.float()).to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(ValueError):
        Q.hadamard(torch.randn(2, 48))


def test_fp4_indexer_scores_after_hadamard():
    """Hadamard spreads outliers, so FP4 scores of rotated q/k track the exact scores."""
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(4, 128, generator=g), torch.randn(64, 128, generator=g)
    k[:, 3] *= 20  # an outlier channel
    kq = Q.dequantize_index_fp4(Q.quantize_index_fp4(Q.hadamard(k)), 128)
    qq = Q.dequantize_index_fp4(Q.quantize_index_fp4(Q.hadamard(q)), 128)
    exact = q @ k.T
    approx = qq @ kq.T
    assert ((approx - exact).norm() / exact.norm()).item() < 0.25


def test_empty_and_zero_rows():
    assert Q.quantize_kv_rows(torch.zeros(0, 3, 64), 16).shape == (0, 3, 88)
    assert Q.dequantize_kv_rows(torch.zeros(0, 88, dtype=torch.uint8), 64, 16).shape == (0, 64)
    z = Q.quantize_kv_rows(torch.zeros(2, 512), 64)
    assert (z[:, :576] == 0).all() and (z[:, 576:583] == 127).all() and (z[:, 583] == 0).all()
    assert (Q.dequantize_kv_rows(z, 512, 64) == 0).all()
    assert Q.quantize_index_fp8(torch.zeros(128))[128:].tolist() == list(np.array([1.0], "<f4").view(np.uint8))
    assert Q.quantize_index_fp4(torch.zeros(128)).tolist() == [0] * 64 + [127] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    x = random_rows((3, 5, 512), 64, 7)
    k = random_rows((3, 128), 32, 8)
    for f, inp in ((lambda t: Q.quantize_kv_rows(t, 64), x), (Q.quantize_index_fp8, k), (Q.quantize_index_fp4, k)):
        cpu, gpu = f(inp), f(inp.cuda())
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu)
    p = Q.quantize_kv_rows(x, 64)
    assert torch.equal(Q.dequantize_kv_rows(p.cuda(), 512, 64).cpu(), Q.dequantize_kv_rows(p, 512, 64))
    p4 = Q.quantize_index_fp4(k)
    assert torch.equal(Q.dequantize_index_fp4(p4.cuda(), 128).cpu(), Q.dequantize_index_fp4(p4, 128))
    torch.testing.assert_close(Q.hadamard(k.cuda()).cpu(), Q.hadamard(k))
