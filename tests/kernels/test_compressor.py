"""Compressor kernels (v4c/codegen/templates/compressor.py) against the IR references, in Triton's interpreter.

Every test drives a *schedule*: a list of calls, each giving the number of valid tokens per batch row
(0 = a row with only padding).  Rows, pending kv and pending gates are compared after the whole
schedule with the kernel and the reference each run call by call, and against the reference run on the
whole sequence in one call (the result must not depend on how the sequence was chunked).

Tolerances (max abs error on RMS-normalised rows of magnitude ~1, and on the pending buffers):
  fp32 activations 2e-5 (seen: 2.4e-6); fp16 5e-3 and bf16 3e-2: the projections are rounded to the
  activation dtype as ``linear`` does, and a rounding flip from another summation order moves a pending
  value by one ulp (seen: 2e-3 on fp16 pending gates of magnitude ~4; bf16 rows 7e-7).
Encoded rows:
  fp8_ds / fp8 / mxfp4 bytes are compared BIT-EXACTLY with the reference encoder (v4c.graph.quant)
  applied to the kernel's own fp32 rows (same schedule, store=None): that checks the Triton encoders
  exactly.  Against the full reference the pooled fp32 values differ by a few ulps (summation order), so
  a value on an fp8/fp4 rounding boundary may land on the neighbouring code: there the rows are compared
  after decoding, within one quantisation step of the row's largest value (1/14 of it for e4m3, 1/3 of
  the 32-block amax for e2m1), and at least 97% of the bytes must be identical.  (In practice every byte
  of every test here matches the reference, also at V4 size: 584-byte rows, d=512, ratio 128 and 4.)
"""
import pytest
import torch

from v4c.codegen.templates import compressor as K
from v4c.graph import get_op, quant
from v4c.graph.storage import decode, encode, stored_width

THETA, YARN = 160000.0, (16.0, 64, 32.0, 1.0)
TOL = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
SMALL_META = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "BLOCK_S": 8, "BLOCK_C": 128}

# chunked prefill (5, 3, 11, 1, 17 tokens) with rows of different lengths, one row idle in some calls
CHUNKS = [[5, 3, 0], [3, 0, 2], [11, 7, 0], [1, 1, 1], [17, 9, 0]]
DECODE = [[6, 9, 0]] + [[1, 1, 1]] * 9          # short prefill, then single-token decode steps


def _problem(hidden, d, ratio, overlap, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    c = 2 if overlap else 1
    w = lambda *s: (torch.randn(*s, generator=g) * hidden ** -0.5)  # noqa: E731
    return {"wkv": w(c * d, hidden).to(dtype), "wgate": w(c * d, hidden).to(dtype),
            "ape": torch.randn(ratio, c * d, generator=g) * 0.5, "norm_w": torch.rand(d, generator=g) + 0.5,
            "gen": g, "hidden": hidden, "d": d, "c": c, "ratio": ratio, "dtype": dtype}


def _states(p, schedule, store):
    B = len(schedule[0])
    total = max(sum(call[b] for call in schedule) for b in range(B))
    n_rows = total // p["ratio"] + 1
    c, d, m = p["c"], p["d"], p["ratio"]
    plain = store in (None, "f32", "bf16", "f16")
    rdt = {"bf16": torch.bfloat16, "f16": torch.float16}.get(store, torch.float32) if plain else torch.uint8
    rows = torch.zeros(B, n_rows, stored_width(d, store, p["rope"]), dtype=rdt)
    return [rows, torch.zeros(B, c * m, c * d), torch.zeros(B, c * m, c * d)]


def _calls(p, schedule, seed=1):
    """(h, pos) per call; padding tokens get garbage activations."""
    g = torch.Generator().manual_seed(seed)
    B = len(schedule[0])
    total = [sum(call[b] for call in schedule) for b in range(B)]
    seq = torch.randn(B, max(total) + 1, p["hidden"], generator=g).to(p["dtype"])
    done = [0] * B
    out = []
    for call in schedule:
        T = max(max(call), 1) + 1  # always one padding column
        h = torch.randn(B, T, p["hidden"], generator=g).to(p["dtype"]) * 7
        pos = torch.full((B, T), -1, dtype=torch.int64)
        for b, n in enumerate(call):
            h[b, :n] = seq[b, done[b]:done[b] + n]
            pos[b, :n] = torch.arange(done[b], done[b] + n)
            done[b] += n
        out.append((h, pos))
    return out


def _attrs(p, store):
    return {"ratio": p["ratio"], "overlap": p["c"] == 2, "eps": 1e-6, "rope_dim": p["rope"], "theta": THETA,
            "yarn": YARN, "store": store}


def _run(fn, p, schedule, store, meta=None, one_call=False):
    st = _states(p, schedule, store)
    calls = _calls(p, schedule)
    if one_call:  # the whole sequence in one call
        B = len(schedule[0])
        T = max(sum(call[b] for call in schedule) for b in range(B)) + 1
        h = torch.zeros(B, T, p["hidden"], dtype=p["dtype"])
        pos = torch.full((B, T), -1, dtype=torch.int64)
        n = [0] * B
        for hc, pc in calls:
            for b in range(B):
                k = int((pc[b] >= 0).sum())
                h[b, n[b]:n[b] + k], pos[b, n[b]:n[b] + k] = hc[b, :k], pc[b, :k]
                n[b] += k
        calls = [(h, pos)]
    kw = {} if meta is None else {"meta": meta}
    for h, pos in calls:
        st = list(fn(h, p["wkv"], p["wgate"], p["ape"], p["norm_w"], *st, pos, **_attrs(p, store), **kw))
    return st


def _kernel(p, schedule, store, meta=SMALL_META):
    return _run(K.compressor, p, schedule, store, meta=meta)


def _ref(p, schedule, store, one_call=False):
    return _run(get_op("compressor").ref, p, schedule, store, one_call=one_call)


def _written(p, schedule):
    """Per batch row, the number of compressed rows written by the schedule."""
    return [sum(call[b] for call in schedule) // p["ratio"] for b in range(len(schedule[0]))]


def _close(a, b, tol, what):
    err = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def _check_plain(p, schedule, got, ref, tol):
    for name, a, b in zip(("rows", "pend_kv", "pend_gate"), got, ref):
        _close(a, b, tol, name)


def tiny_attn(ratio, overlap, dtype=torch.float32, seed=0):
    p = _problem(256, 64, ratio, overlap, dtype, seed)
    p["rope"] = 16
    return p


# --------------------------------------------------------------------------------------------- plain rows

@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 16)], ids=["csa", "hca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_chunked_prefill_plain(overlap, ratio, dtype):
    p = tiny_attn(ratio, overlap, dtype)
    got = _kernel(p, CHUNKS, None)
    ref = _ref(p, CHUNKS, None)
    _check_plain(p, CHUNKS, got, ref, TOL[dtype])
    one = _ref(p, CHUNKS, None, one_call=True)  # chunking must not matter
    _check_plain(p, CHUNKS, got, one, TOL[dtype])
    assert all(n > 0 for n in _written(p, CHUNKS)[:2])
    assert got[0].abs().sum() > 0


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 16)], ids=["csa", "hca"])
def test_decode_steps_bf16(overlap, ratio):
    p = tiny_attn(ratio, overlap, torch.bfloat16, seed=3)
    got = _kernel(p, DECODE, None)
    ref = _ref(p, DECODE, None)
    _check_plain(p, DECODE, got, ref, TOL[torch.bfloat16])
    _check_plain(p, DECODE, got, _ref(p, DECODE, None, one_call=True), TOL[torch.bfloat16])


@pytest.mark.parametrize("overlap,ratio,d,rope,hidden", [(True, 3, 40, 8, 48), (False, 5, 24, 8, 40)],
                         ids=["csa-odd", "hca-odd"])
def test_odd_sizes(overlap, ratio, d, rope, hidden):
    """Odd ratio, d not a power of two (padded channel tiles), hidden not a multiple of BLOCK_K."""
    p = _problem(hidden, d, ratio, overlap, torch.float32, seed=5)
    p["rope"] = rope
    sched = [[7, 2, 0], [1, 5, 3], [4, 0, 11]]
    got = _kernel(p, sched, None)
    _check_plain(p, sched, got, _ref(p, sched, None), TOL[torch.float32])
    _check_plain(p, sched, got, _ref(p, sched, None, one_call=True), TOL[torch.float32])


def test_half_precision_rows():
    """store "bf16": the rows buffer holds bf16 values."""
    p = tiny_attn(4, True, torch.float16, seed=7)
    sched = CHUNKS[:3]
    got = _kernel(p, sched, "bf16")
    ref = _ref(p, sched, "bf16")
    assert got[0].dtype == torch.bfloat16
    _close(got[0], ref[0], 2e-2, "bf16 rows")


def test_unfused_compress():
    """The unfused ``compress`` op (projections given; ape added inside the kernels)."""
    p = tiny_attn(4, True, torch.float16, seed=9)
    st_k, st_r = _states(p, CHUNKS, None), _states(p, CHUNKS, None)
    for h, pos in _calls(p, CHUNKS):
        kv = torch.nn.functional.linear(h, p["wkv"])
        gate = torch.nn.functional.linear(h, p["wgate"])
        args = (p["ape"], p["norm_w"])
        st_k = list(K.compress(kv, gate, *args, *st_k, pos, **_attrs(p, None), meta={"BLOCK_S": 4}))
        st_r = list(get_op("compress").ref(kv, gate, *args, *st_r, pos, **_attrs(p, None)))
    _check_plain(p, CHUNKS, st_k, st_r, 2e-4)  # same fp16 projections on both sides


# --------------------------------------------------------------------------------------------- encoded rows

def _check_encoded(p, sched, store, dtype_tol, step):
    got = _kernel(p, sched, store)
    plain = _kernel(p, sched, None)  # the kernel's own fp32 rows, before encoding
    ref = _ref(p, sched, store)
    d, r = p["d"], p["rope"]
    same_bytes, total_bytes = 0, 0
    for b, nw in enumerate(_written(p, sched)):
        if nw == 0:
            continue
        mine = got[0][b, :nw]
        # bit-exact: the Triton encoder vs the reference encoder on identical fp32 values
        assert torch.equal(mine, encode(plain[0][b, :nw], store, r)), f"{store}: encoder bytes differ (row {b})"
        # vs the reference: decoded values within one quantisation step
        a, e = decode(mine, store, d, r), decode(ref[0][b, :nw], store, d, r)
        scale = e.abs().amax(-1, keepdim=True) if store != "mxfp4" else \
            e.abs().view(*e.shape[:-1], -1, 32).amax(-1, keepdim=True).expand(*e.shape[:-1], -1, 32).reshape(e.shape)
        bad = (a - e).abs() > step * scale + dtype_tol
        assert not bad.any(), f"{store}: decoded rows differ by more than one step"
        same_bytes += int((mine == ref[0][b, :nw]).sum())
        total_bytes += mine.numel()
    assert same_bytes >= 0.97 * total_bytes, f"{store}: only {same_bytes}/{total_bytes} bytes match the reference"
    _close(got[1], ref[1], dtype_tol, "pend_kv")
    _close(got[2], ref[2], dtype_tol, "pend_gate")
    return got, plain


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 16)], ids=["csa", "hca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_fp8_ds_rows(overlap, ratio, dtype):
    p = tiny_attn(ratio, overlap, dtype, seed=13)
    got, _ = _check_encoded(p, CHUNKS, "fp8_ds", TOL[dtype], 1 / 14)
    assert got[0].shape[2] == quant.kv_row_bytes(64, 16)


def test_fp8_ds_odd_block():
    """d=40, rope 8: 32 nope dims in one scale block of 32, 56-byte rows with 7 bytes of padding."""
    p = _problem(48, 40, 3, True, torch.float32, seed=17)
    p["rope"] = 8
    _check_encoded(p, [[7, 2, 0], [1, 5, 3], [4, 0, 11]], "fp8_ds", TOL[torch.float32], 1 / 14)


def test_fp8_ds_rows_all_rope():
    """d = rope = 32 (partial_rotary_factor 1): no nope dims, so no scale blocks: 64 bf16 bytes a row."""
    p = _problem(48, 32, 3, True, torch.float32, seed=23)
    p["rope"] = 32
    got, _ = _check_encoded(p, [[7, 2, 0], [1, 5, 3]], "fp8_ds", TOL[torch.float32], 1 / 14)
    assert got[0].shape[2] == quant.kv_row_bytes(32, 32) == 64


@pytest.mark.parametrize("store,step", [("fp8", 1 / 14), ("mxfp4", 1 / 3)])
def test_index_keys(store, step):
    """The indexer's compressor (d=32, rope 16) writing fp8 or MXFP4 keys."""
    p = _problem(256, 32, 4, True, torch.float32, seed=19)
    p["rope"] = 16
    _check_encoded(p, CHUNKS, store, TOL[torch.float32], step)


# --------------------------------------------------------------------------------------------- meta-parameters

def test_meta_candidates_agree():
    """A sample of META points (incl. BLOCK_D < d: the two-pass RMSNorm) gives the same rows."""
    p = tiny_attn(4, True, torch.float32, seed=23)
    sched = CHUNKS[:3]
    ref = _ref(p, sched, "fp8_ds")
    base = None
    for meta in ({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "BLOCK_S": 2, "BLOCK_D": 16, "BLOCK_C": 256},
                 {"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "num_stages": 2, "BLOCK_S": 4, "BLOCK_D": 32,
                  "BLOCK_C": 128},
                 dict(K.DEFAULT_META["compressor"])):
        shapes = [(3, 12, 256), (128, 256), (128, 256), (4, 128), (64,), tuple(ref[0].shape),
                  (3, 8, 128), (3, 8, 128), (3, 12)]
        assert K.constraints("compressor", meta, shapes) is None, meta
        got = _kernel(p, sched, "fp8_ds", meta=meta)
        plain = _kernel(p, sched, None, meta=meta)
        _close(got[1], ref[1], 2e-4, "pend_kv")
        _close(plain[0].float(), _ref(p, sched, None)[0], 2e-4, f"rows {meta}")
        for b, nw in enumerate(_written(p, sched)):
            assert torch.equal(got[0][b, :nw], encode(plain[0][b, :nw], "fp8_ds", 16))
        if base is None:
            base = plain[0]
        _close(plain[0], base, 2e-5, "rows across metas")


def test_constraints():
    d, cd = 512, 1024
    shapes = [(1, 64, 4096), (cd, 4096), (cd, 4096), (4, cd), (d,), (1, 1024, 584), (1, 8, cd), (1, 8, cd), (1, 64)]
    attrs = {"store": "fp8_ds", "rope_dim": 64}
    assert K.constraints("compressor", K.DEFAULT_META["compressor"], shapes, attrs) is None
    assert K.constraints("compressor", {}, shapes) is None  # format inferred from the row width
    assert "tl.dot" in K.constraints("compressor", {"BLOCK_M": 8}, shapes, attrs)
    assert "shared memory" in K.constraints("compressor", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 128,
                                                           "num_stages": 8}, shapes, attrs)
    assert "registers" in K.constraints("compressor", {"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 4}, shapes, attrs)
    hca = [(1, 64, 4096), (d, 4096), (d, 4096), (128, d), (d,), (1, 1024, 584), (1, 128, d), (1, 128, d), (1, 64)]
    assert K.constraints("compressor", {"BLOCK_S": 16, "BLOCK_D": 512, "POOL_WARPS": 8}, hca, attrs) is None
    assert "pool tile" in K.constraints("compressor", {"BLOCK_S": 16, "BLOCK_D": 512}, hca, attrs)
    # CSA windows have 8 slots: a 16-slot step would only add masked rows, and launches as BLOCK_S=8
    assert "runs exactly as" in K.constraints("compressor", {"BLOCK_S": 16}, shapes, attrs)
    idx = [(1, 64, 4096), (256, 4096), (256, 4096), (4, 256), (128,), (1, 1024, 68), (1, 8, 256), (1, 8, 256),
           (1, 64)]
    assert K.constraints("compressor", {}, idx, {"store": "mxfp4", "rope_dim": 64}) is None
    # fp8 / mxfp4 rows are encoded whole: BLOCK_D does not apply, so only its first grid value is a candidate
    assert K._pool_block_d({"BLOCK_D": 64}, 128, "mxfp4") == 128
    assert "runs exactly as" in K.constraints("compressor", {"BLOCK_D": 128}, idx, {"store": "mxfp4", "rope_dim": 64})
    assert K.constraints("compress", {"BLOCK_S": 4}, [(1, 64, cd), (1, 64, cd), (4, cd), (d,), (1, 1024, 584)],
                         attrs) is None
    assert K.constraints("nope", {}, shapes) is not None
    for op in K.KERNELS:
        assert set(K.DEFAULT_META[op]) == set(K.META[op])
        assert all(K.DEFAULT_META[op][k] in K.META[op][k] for k in K.META[op])


def _site(h, d, ratio, overlap, width, store, rope, dtype="bf16", B=1, T=1, nc=1024):
    """The tuner's shapes dict for a compressor call site."""
    c = 2 if overlap else 1
    return {"inputs": [(B, T, h), (c * d, h), (c * d, h), (ratio, c * d), (d,), (B, nc, width), (B, c * ratio, c * d),
                       (B, c * ratio, c * d), (B, T)],
            "outputs": [(B, nc, width), (B, c * ratio, c * d), (B, c * ratio, c * d)],
            "attrs": {"ratio": ratio, "overlap": overlap, "eps": 1e-6, "rope_dim": rope, "theta": THETA,
                      "store": store}, "dtype": dtype}


V4_SITES = {  # the compressors of V4-Flash (hidden 4096) and V4-Pro (7168): CSA, HCA, the indexer's (MXFP4 keys)
    f"{name}-{h}": _site(h, d, ratio, overlap, width, store, 64)
    for h in (4096, 7168)
    for name, d, ratio, overlap, width, store in (("csa", 512, 4, True, 584, "fp8_ds"),
                                                  ("hca", 512, 128, False, 584, "fp8_ds"),
                                                  ("index", 128, 4, True, 68, "mxfp4"))
}
SMALL_SITES = {  # the tests' and the tiny preset's shapes: widths that are not powers of two, plain rows, fp32
    "tiny-csa": _site(256, 64, 4, True, 64, None, 16, "f32"),
    "tiny-hca": _site(256, 64, 16, False, 88, "fp8_ds", 16, "f16"),
    "tiny-index": _site(256, 32, 4, True, 20, "mxfp4", 16),
    "odd-csa": _site(48, 40, 3, True, 40, None, 8, "f32"),
    "odd-hca": _site(40, 24, 5, False, 24, "bf16", 8, "bf16"),
    "odd-fp8ds": _site(48, 40, 3, True, 56, "fp8_ds", 8),
    "index-fp8": _site(256, 32, 4, True, 36, "fp8", 16),
}


@pytest.mark.parametrize("name", list(V4_SITES) + list(SMALL_SITES))
def test_tuner_shapes_have_candidates(name):
    """The tuner's dict shapes: every site keeps candidates on every target; the defaults are valid at V4 sizes;
    parameters that change nothing at these shapes are not separate candidates."""
    from v4c.autotune.devices import device_for_target
    from v4c.autotune.space import candidates, grid
    shapes = {**V4_SITES, **SMALL_SITES}[name]
    assert len(grid(K, "compressor")) < 10000  # small enough to rank in well under a second
    if name in V4_SITES:
        assert K.constraints("compressor", {}, shapes) is None
    for target in ("sm80", "sm86", "sm90", "sm100", "cpu"):
        kept = candidates(K, "compressor", shapes, device_for_target(target))
        assert kept, f"{name}: no candidate on {target}"
        fp32 = shapes["dtype"] == "f32"
        assert fp32 or all(m["DOT_PRECISION"] == "ieee" for m in kept)  # only fp32 activations use it
        slots = (2 if shapes["attrs"]["overlap"] else 1) * shapes["attrs"]["ratio"]
        pools = {(K._pool_block_s(m, slots),
                  K._pool_block_d(m, shapes["inputs"][4][0], shapes["attrs"]["store"]), m["POOL_WARPS"])
                 for m in kept}
        n_pool = len({(m["BLOCK_S"], m["BLOCK_D"], m["POOL_WARPS"]) for m in kept})
        assert len(pools) == n_pool  # no two kept pooling configs launch the same kernel
    unfused = {"inputs": [shapes["inputs"][0][:2] + (shapes["inputs"][1][0],)] * 2 + shapes["inputs"][3:],
               "attrs": shapes["attrs"], "dtype": shapes["dtype"]}
    assert candidates(K, "compress", unfused, device_for_target("sm90"))


# --------------------------------------------------------------------------------------------- 64-bit offsets

def test_batch_offsets_past_2_31_elements():
    """Batch rows whose element offsets pass 2**31 (rows from batch row 15 of a 1M-token cache, kv of a long
    call): the kernels must form those offsets in 64 bits.  The buffers are views into sparse allocations of a
    few GB (only the touched pages are ever committed)."""
    p = tiny_attn(4, True, torch.float16, seed=29)
    B, T, cd, d = 3, 9, 128, 64
    width = stored_width(d, "fp8_ds", p["rope"])
    g = torch.Generator().manual_seed(31)
    kv_c = torch.randn(B, T, cd, generator=g).to(torch.float16)
    gate_c = torch.randn(B, T, cd, generator=g).to(torch.float16)
    pos = torch.arange(T).repeat(B, 1)
    pos[1, 7:] = -1
    # kv and gate interleaved per token (as the projection scratch is), batch stride 2**30 + 2*cd elements
    sb = (1 << 30) + 2 * cd
    big = torch.empty(2 * sb + T * 2 * cd, dtype=torch.float16)
    kv = big.as_strided((B, T, cd), (sb, 2 * cd, 1))
    gate = big.as_strided((B, T, cd), (sb, 2 * cd, 1), cd)
    kv.copy_(kv_c)
    gate.copy_(gate_c)
    nc = 4
    rb = (1 << 30) + width * nc
    rows_big = torch.empty(2 * rb + nc * width, dtype=torch.uint8)
    rows = rows_big.as_strided((B, nc, width), (rb, width, 1))
    rows.zero_()
    attrs = _attrs(p, "fp8_ds")
    st = [torch.zeros(B, 2 * 4, cd), torch.zeros(B, 2 * 4, cd)]
    K.compress(kv, gate, p["ape"], p["norm_w"], rows, *st, pos, **attrs, meta={"BLOCK_S": 8})
    ref_rows = torch.zeros(B, nc, width, dtype=torch.uint8)
    ref_st = [torch.zeros(B, 2 * 4, cd), torch.zeros(B, 2 * 4, cd)]
    get_op("compress").ref(kv_c, gate_c, p["ape"], p["norm_w"], ref_rows, *ref_st, pos, **attrs)
    for b in range(B):
        n = int((pos[b] >= 0).sum()) // 4
        a, e = decode(rows[b, :n], "fp8_ds", d, p["rope"]), decode(ref_rows[b, :n], "fp8_ds", d, p["rope"])
        assert n > 0 and (a - e).abs().max() <= e.abs().max() / 14 + 1e-6, f"batch row {b}"
    _close(st[0], ref_st[0], 2e-3, "pend_kv")
    _close(st[1], ref_st[1], 2e-3, "pend_gate")
