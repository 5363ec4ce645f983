"""The lightning ``indexer`` Triton kernels (interpreted on the CPU) against the IR op's reference.

Shapes are the tiny model's: indexer 16 heads x 32, q_lora 128, hidden 256.  Batch row 0 has a
long prefix (position 37), batch row 1 a short one (position 5) and, in prefill, two padding
tokens; in decode (T=1) row 1 is a padding token.

Index sets must match exactly (compared sorted; 16 heads avoid ties).  The FP8 q_b_proj launcher
(``QUANTIZED``) is checked the same way, in each of its e4m3 paths (``DOT_MODE``: the interpreter's exact
fp32, sm80/86's bytes decoded with integer ops, native fp8), forced here through the meta.
"""
import pytest
import torch
from kernel_cases import SDT, TDT, positions

from v4c.codegen.templates import indexer as I
from v4c.graph import get_op, storage
from v4c.graph.weight_formats import quantize_fp8_block
from v4c.graph.weights import QuantizedWeight

YARN = [16.0, 64, 32.0, 1.0]


# ---- indexer ------------------------------------------------------------------------------------

HI, DI, QL, HID = 16, 32, 128, 256


def index_case(T, dtype=torch.float32, fmt=None, *, p0=(37, 5), nc=20, topk=4, seed=0, hi=HI, di=DI, ql=QL, hid=HID,
               rope=16, yarn=YARN):
    g = torch.Generator().manual_seed(seed)
    HI, DI, QL, HID = hi, di, ql, hid
    B = len(p0)
    pos = positions(B, T, p0, pad_decode=True)
    cq = torch.randn(B, T, QL, generator=g).to(dtype)
    h = torch.randn(B, T, HID, generator=g).to(dtype)
    wq = torch.randn(HI * DI, QL, generator=g) * QL ** -0.5
    ww = torch.randn(HI, HID, generator=g) * HID ** -0.5
    kdt = TDT[storage.stored_dtype(fmt, SDT[dtype])]
    keys = storage.encode(torch.randn(B, nc, DI, generator=g), fmt, 0, kdt)
    attrs = dict(shape=["B", "T", HI, DI], rope_dim=rope, theta=160000.0, yarn=yarn, topk=topk, ratio=4,
                 score_scale=DI ** -0.5, weight_scale=HI ** -0.5)
    if fmt:
        attrs["key_format"] = fmt
    return [cq, h, wq, ww, keys, pos], attrs


def check_index(args, attrs, meta=None):
    want = get_op("indexer").ref(*args, **attrs)
    got = I.indexer(*args, **attrs, meta=meta)
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert torch.equal(got.sort(-1).values, want.sort(-1).values), f"index sets differ:\n{got}\n{want}"
    return got


@pytest.mark.parametrize("T", [1, 6])
@pytest.mark.parametrize("dtype,fmt", [(torch.float32, None), (torch.float16, None), (torch.float32, "fp8"),
                                       (torch.float16, "fp8"), (torch.float32, "mxfp4"), (torch.float16, "mxfp4"),
                                       (torch.bfloat16, "mxfp4")],
                         ids=["f32", "f16", "f32-fp8", "f16-fp8", "f32-mxfp4", "f16-mxfp4", "bf16-mxfp4"])
def test_indexer(T, dtype, fmt):
    args, attrs = index_case(T, dtype, fmt)
    got = check_index(args, attrs)
    pos = args[5]
    assert (got[pos < 0] == -1).all()
    if T > 1:
        assert (got[1, 0] >= 0).sum() == 1  # position 5 sees one compressed row: fewer than top-k


def test_indexer_long_context_and_meta_candidates():
    """Many visible rows (several top-k tiles, tiles that cannot enter skipped, decode splits)."""
    sample = [
        {"BLOCK_M": 16, "BLOCK_K": 32, "BLOCK_T": 1, "BLOCK_H": 16, "BLOCK_S": 16, "TOPK_TILE": 1, "TOPK_SPLIT": 1},
        {"BLOCK_M": 32, "BLOCK_K": 64, "BLOCK_T": 2, "BLOCK_H": 32, "BLOCK_S": 32, "TOPK_TILE": 2, "TOPK_SPLIT": 4},
        {"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_T": 8, "BLOCK_H": 16, "BLOCK_S": 64, "TOPK_TILE": 4,
         "TOPK_SPLIT": 8, "num_warps": 8},
    ]
    for T, fmt, topk in [(1, "mxfp4", 8), (5, "fp8", 16), (1, None, 5)]:
        args, attrs = index_case(T, torch.float32, fmt, p0=(301, 150), nc=80, topk=topk, seed=11)
        outs = [check_index(args, attrs, meta) for meta in sample]
        assert all(torch.equal(o.sort(-1).values, outs[0].sort(-1).values) for o in outs)


@pytest.mark.parametrize("rows", [1, 4, 7])
def test_indexer_chunks_the_score_scratch(monkeypatch, rows):
    """Calls whose [B, T, capacity] score scratch would be too big run in (batch, token) chunks."""
    args, attrs = index_case(6, torch.float32, "fp8", nc=20, seed=2)
    monkeypatch.setattr(I, "SCORE_SCRATCH_BYTES", 8 * 20 * rows)
    check_index(args, attrs)


def test_indexer_queries_match_the_fp4_round_trip():
    """The q GEMM epilogue (RoPE, Hadamard, e2m1 round trip) against the reference's steps."""
    for dtype in (torch.float32, torch.float16):
        args, attrs = index_case(6, dtype, "mxfp4")
        cq, wq, pos = args[0], args[2], args[5]
        lin = get_op("reshape").ref(get_op("linear").ref(cq, wq), shape=attrs["shape"])
        want = storage.round_trip(get_op("rope").ref(lin, pos, rope_dim=16, theta=160000.0, yarn=YARN), "mxfp4")
        q2 = torch.empty(cq.shape[0] * cq.shape[1], HI * DI, dtype=dtype)
        meta = dict(I.DEFAULT_META["indexer"])
        inv = I._rope_inv_freq(16, 160000.0, YARN, "cpu")
        I._index_proj(cq.reshape(-1, QL), wq, q2, pos.reshape(-1), inv, head=DI, rope_dim=16, mxfp4=True,
                      dot_f32=dtype == torch.float32, meta=meta, block_n=DI)
        got = q2.view_as(want)
        assert (got.float() - want.float()).abs().max() <= 1e-6
        assert (got.float() != 0).float().mean() > 0.5  # not trivially zero


# ---- the real model's sizes --------------------------------------------------------------------

def test_real_model_sizes():
    """V4-Flash indexer dims: 64 heads x 128, MXFP4 keys, top-512 of 600+ visible rows."""
    yarn = [16.0, 65536, 32.0, 1.0]
    args, attrs = index_case(1, torch.float16, "mxfp4", p0=(2500, 1000), nc=700, topk=512, hi=64, di=128, ql=256,
                             hid=256, rope=64, yarn=yarn)
    got = check_index(args, attrs)
    assert (got[0, 0] >= 0).all()


# ---- FP8 q_b_proj (the release's format): the QUANTIZED launcher ----------------------------------

def fp8_case(T, dtype, fmt, *, ql=200, seed=3, **kw):
    """index_case with q_b_proj quantised to FP8 e4m3 + 128x128 UE8M0 scales (K = 200: a partial scale block)."""
    args, attrs = index_case(T, dtype, fmt, ql=ql, seed=seed, **kw)
    data, scale = quantize_fp8_block(args[2])
    args[2] = QuantizedWeight("f8e4m3", data, scale)
    return args, attrs


@pytest.mark.parametrize("T,dtype,fmt,mode", [(1, torch.bfloat16, "mxfp4", None), (6, torch.float32, "mxfp4", 1),
                                              (6, torch.float16, "fp8", 1), (1, torch.float32, "fp8", 2),
                                              (6, torch.bfloat16, None, 0)],
                         ids=["bf16-mxfp4", "f32-mxfp4-sm80", "f16-fp8-sm80", "f32-fp8-native", "bf16-plain"])
def test_fp8_indexer(T, dtype, fmt, mode):
    """The QUANTIZED launcher against the reference (which quantises cq per 1x128 and multiplies by the
    dequantised weight); DOT_MODE 1 is the sm80/86 path (e4m3 bytes decoded with integer ops), 2 native fp8."""
    launcher, key = I.QUANTIZED["indexer"]
    assert key == "fp8_indexer" and launcher is I.fp8_indexer
    args, attrs = fp8_case(T, dtype, fmt)
    want = get_op("indexer").ref(*args, **attrs)
    got = launcher(*args, **attrs, meta=None if mode is None else {"DOT_MODE": mode})
    assert torch.equal(got.sort(-1).values, want.sort(-1).values), f"index sets differ:\n{got}\n{want}"
    assert (got[args[5] < 0] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fp8_indexer_queries(dtype):
    """The FP8 q GEMM (+ RoPE, Hadamard, FP4 round trip) against the reference's steps, in every dot mode and
    K step (BLOCK_K < 128: the activation's block scale from its whole 128 values)."""
    args, attrs = fp8_case(6, dtype, "mxfp4")
    cq, wq, pos = args[0], args[2], args[5]
    lin = get_op("reshape").ref(get_op("linear").ref(cq, wq), shape=attrs["shape"])
    want = storage.round_trip(get_op("rope").ref(lin, pos, rope_dim=16, theta=160000.0, yarn=YARN), "mxfp4").float()
    data, scale = I._fp8_weight(wq, HI * DI, cq.shape[-1])
    inv = I._rope_inv_freq(16, 160000.0, YARN, "cpu")
    for mode, bk in ((0, 128), (1, 64), (2, 32)):
        q2 = torch.empty(cq.shape[0] * cq.shape[1], HI * DI, dtype=dtype)
        meta = {**I.DEFAULT_META["fp8_indexer"], "BLOCK_K": bk}
        I._index_proj(cq.reshape(-1, cq.shape[-1]), data, q2, pos.reshape(-1), inv, head=DI, rope_dim=16, mxfp4=True,
                      dot_f32=dtype == torch.float32, meta=meta, block_n=DI, ws=scale, dot_mode=mode)
        got = q2.view_as(want).float()
        # seen: bit-exact in every mode and dtype.  Only the order of the fp32 sums differs from the reference,
        # which could move a GEMM output by one ulp of the activation dtype, and with it an e2m1 code by one
        # step of its 32-block (a step is at most 1/3 of the block's max |value|): allow that, rarely
        assert (got != want).float().mean() <= 0.01, mode
        assert (got - want).abs().max() <= want.abs().max() / 3, mode
        assert (got != 0).float().mean() > 0.5


def test_fp8_keys_decoded_as_bytes():
    """sm80/86 have no fp8 type: the fp8 key rows are decoded with integer ops (forced here), same result."""
    for T in (1, 6):
        args, attrs = index_case(T, torch.float32, "fp8", seed=4)
        check_index(args, attrs, {"DOT_MODE": 1})


def test_dot_mode_follows_the_target(monkeypatch):
    monkeypatch.setattr(I, "_capability", lambda device: (8, 0))
    assert I._dot_mode(torch.device("cpu"), {}) == 1
    monkeypatch.setattr(I, "_capability", lambda device: (8, 6))
    assert I._dot_mode(torch.device("cpu"), {}) == 1
    monkeypatch.setattr(I, "_capability", lambda device: (9, 0))
    assert I._dot_mode(torch.device("cpu"), {}) == 2
    assert I._dot_mode(torch.device("cpu"), {"DOT_MODE": 0}) == 0


def test_fp8_indexer_rejects_other_weights():
    args, attrs = index_case(1, torch.float32, "mxfp4")
    with pytest.raises(ValueError, match="f8e4m3"):
        I.fp8_indexer(*args, **attrs)


# ---- constraints ----------------------------------------------------------------------------------

def test_constraints():
    real = {"inputs": [(1, 1, 1024)], "attrs": {"shape": ["B", "T", 64, 128], "key_format": "mxfp4"}}
    assert I.constraints("indexer", {}, real) is None
    assert I.constraints("fp8_indexer", {}, real) is None
    assert "power of two" in I.constraints("indexer", {}, {"attrs": {"shape": ["B", "T", 4, 48]}})
    assert "16 query rows" in I.constraints("indexer", {"BLOCK_T": 1, "BLOCK_H": 8}, real)
    assert "divide the 128-wide" in I.constraints("fp8_indexer", {"BLOCK_K": 256}, real)
    assert "registers" in I.constraints("indexer", {"BLOCK_M": 64, "num_warps": 4}, real)
    assert "registers" in I.constraints("indexer", {"BLOCK_S": 128, "BLOCK_T": 8, "BLOCK_H": 64},
                                        {**real, "inputs": [(1, 64, 1024)]})
    # decode: BLOCK_T has nothing to tile, so only its first grid value is a candidate
    assert "runs as" in I.constraints("indexer", {"BLOCK_T": 4}, real)
    for op in ("indexer", "fp8_indexer"):
        assert set(I.DEFAULT_META[op]) == set(I.META[op])
        assert all(I.DEFAULT_META[op][k] in I.META[op][k] for k in I.META[op])


def _site(b, t, q, hid, hi, di, topk, fmt, dtype="bf16"):
    """The tuner's shapes dict for an indexer call site."""
    return {"inputs": [(b, t, q), (b, t, hid), (hi * di, q), (hi, hid), (b, 262144, 68), (b, t)],
            "outputs": [(b, t, topk)], "dtype": dtype,
            "attrs": {"shape": ["B", "T", hi, di], "rope_dim": 64, "theta": 160000.0, "topk": topk, "ratio": 4,
                      "score_scale": di ** -0.5, "weight_scale": hi ** -0.5, "key_format": fmt}}


SITES = {f"{model}-B{b}-T{t}": _site(b, t, q, hid, 64, 128, topk, "mxfp4")
         for model, q, hid, topk, b, t in (("flash", 1024, 4096, 512, 1, 1), ("pro", 1536, 7168, 1024, 256, 1),
                                           ("pro", 1536, 7168, 1024, 1, 4096))}
SITES.update({"tiny": _site(1, 1, 128, 256, 16, 32, 4, "mxfp4", "f32"),
              "tiny-fp8": _site(2, 7, 128, 256, 16, 32, 4, "fp8"),
              "plain": _site(1, 5, 128, 256, 16, 32, 4, None, "f16"),
              "odd-topk": _site(1, 1, 128, 256, 16, 32, 5, None)})


@pytest.mark.parametrize("name", list(SITES))
def test_tuner_shapes_have_candidates(name):
    """Every site keeps candidates on every target, for both launchers; V4's defaults are valid."""
    from v4c.autotune.devices import device_for_target
    from v4c.autotune.space import candidates
    shapes = SITES[name]
    if not name.startswith(("tiny", "plain", "odd")):
        for op in ("indexer", "fp8_indexer"):
            assert I.constraints(op, {}, shapes) is None, op
    for target in ("sm80", "sm86", "sm90"):  # the three shared-memory sizes (sm100 has sm90's)
        for op in ("indexer", "fp8_indexer"):
            assert candidates(I, op, shapes, device_for_target(target)), f"{name}: no {op} candidate on {target}"


def test_rendered_module_and_quantized_table():
    from v4c.codegen.emit import quantized_launchers, render
    render("indexer", "sm80")  # no name defined twice next to the prelude
    assert quantized_launchers()["indexer"] == "indexer"
