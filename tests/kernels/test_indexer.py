"""The lightning ``indexer`` Triton kernels (interpreted on the CPU) against the IR op's reference.

Shapes are the tiny model's: indexer 16 heads x 32, q_lora 128, hidden 256.  Batch row 0 has a
long prefix (position 37), batch row 1 a short one (position 5) and, in prefill, two padding
tokens; in decode (T=1) row 1 is a padding token.

Index sets must match exactly (compared sorted; 16 heads avoid ties).
"""
import pytest
import torch
from kernel_cases import SDT, TDT, positions

from v4c.codegen.templates import indexer as I
from v4c.graph import get_op, storage

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


# ---- constraints ----------------------------------------------------------------------------------

def test_constraints():
    real = {"inputs": [(1, 1, 1024)], "attrs": {"shape": ["B", "T", 64, 128], "key_format": "mxfp4"}}
    assert I.constraints("indexer", {}, real) is None
    assert "power of two" in I.constraints("indexer", {}, {"attrs": {"shape": ["B", "T", 4, 48]}})
    assert "16 query rows" in I.constraints("indexer", {"BLOCK_T": 1, "BLOCK_H": 8}, real)
    for op in I.KERNELS:
        assert set(I.DEFAULT_META[op]) == set(I.META[op])
        assert all(I.DEFAULT_META[op][k] in I.META[op][k] for k in I.META[op])
