"""The torch backend's few-token (decode) paths of sparse attention, the ring append and the
indexer, against the ops' references: every kind, plain and packed cache formats, padding rows,
ragged positions, several tokens per row and a ring that has wrapped around."""
import pytest
import torch

from v4c.graph.registry import get_op
from v4c.graph.storage import encode, stored_width
from impls import run
from v4c.backends.cpu import attention_decode as few
from v4c.backends.cpu import native
from v4c.backends.cpu.rope import rope, rope_

W, D, H, R, TOPK = 8, 64, 4, 32, 6  # ring rows, head dim, heads, rope dims, CSA top-k


def _case(kind, fmt, dtype, start, t, seed=0, pad_row=None):
    """Inputs for one call: rows b at positions ``start[b] .. start[b] + t - 1`` after that many
    earlier tokens (ring filled as the cache would hold them), optionally a padding row."""
    g = torch.Generator().manual_seed(seed)
    b = len(start)
    pos = torch.tensor(start)[:, None] + torch.arange(t)
    if pad_row is not None:
        pos[pad_row] = -1
    width = stored_width(D, fmt, 16)
    ring_dtype = torch.uint8 if fmt == "fp8_ds" else (torch.bfloat16 if fmt == "bf16" else dtype)
    ring = torch.zeros(b, W, width, dtype=ring_dtype)
    ring_pos = torch.full((b, W), -1)
    for i, s in enumerate(start):  # the last W earlier tokens sit in slot p % W
        for p in range(max(0, s - W), s):
            ring[i, p % W] = encode(torch.randn(D, generator=g), fmt, 16, ring_dtype)
            ring_pos[i, p % W] = p
    q = torch.randn(b, t, H, D, generator=g).to(dtype)
    kv = torch.randn(b, t, D, generator=g).to(dtype)
    sinks = torch.randn(H, generator=g)
    extra, attrs = (), dict(kind=kind, window=W, scale=D ** -0.5, rope_dim=R, theta=10000.0)
    if fmt is not None:
        attrs.update(kv_format=fmt, kv_rope_dim=16)
    if kind != "sliding":
        ratio = 4 if kind == "csa" else 8
        n = 20
        rows = encode(torch.randn(b, n, D, generator=g), fmt, 16, ring_dtype)
        extra = (rows,)
        attrs["ratio"] = ratio
        if kind == "csa":  # distinct visible rows per query, -1 where fewer are visible
            idx = torch.full((b, t, TOPK), -1)
            for i in range(b):
                for j in range(t):
                    nvis = max(0, (int(pos[i, j]) + 1) // ratio)
                    pick = torch.randperm(nvis, generator=g)[:TOPK]
                    idx[i, j, :len(pick)] = pick
            extra = (rows, idx)
    return (q, kv, ring, ring_pos, sinks, pos, *extra), attrs


CASES = [  # (start positions per row, tokens per row, padding row)
    ([37], 1, None),           # one sequence, wrapped ring
    ([3], 1, None),            # ring not yet full: empty slots
    ([40, 5, 21], 1, None),    # ragged rows
    ([40, 5, 21], 1, 1),       # and a padding row
    ([30, 30], 3, None),       # several tokens per row, same positions: the ring slice path
    ([30, 14], 3, None),       # different positions: the indexed ring path
    ([6, 6], 4, None),         # the call's tokens wrap around the ring's end
]


@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("fmt,dtype", [(None, torch.float32), (None, torch.bfloat16), ("bf16", torch.bfloat16),
                                       ("fp8_ds", torch.bfloat16)])
def test_few_token_sparse_attention_equals_reference(kind, fmt, dtype):
    ref = get_op("sparse_attention").ref
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding step of the output
    for start, t, pad in CASES:
        args, attrs = _case(kind, fmt, dtype, start, t, pad_row=pad)
        assert len(start) * t <= few.TOKENS
        want = ref(*[a.clone() for a in args], **attrs)
        got = run("sparse_attention", *[a.clone() for a in args], impl="decode", **attrs)
        assert got[0].dtype == want[0].dtype
        assert torch.allclose(got[0].float(), want[0].float(), rtol=tol, atol=tol), (start, t, pad)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), (start, t, pad)  # ring, ring_pos
        if pad is not None:
            assert (got[0][pad] == 0).all()  # a padding query attends to nothing: only the sink


@pytest.mark.skipif(native.library() is None, reason="C helpers unavailable")
@pytest.mark.parametrize("kind", ["sliding", "csa", "hca"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_decode_step_is_the_three_steps_in_one_call(kind, dtype):
    """A decode-sized call of the native sparse_attention runs attention, ring append and the output's inverse
    RoPE as one C call (``attention_step_``): the same bits as the three ops one by one, the ring as the
    reference leaves it (calls with padding take the three steps as before)."""
    ref = get_op("sparse_attention").ref
    for start, t, pad in CASES:
        args, attrs = _case(kind, None, dtype, start, t, pad_row=pad)
        got = run("sparse_attention", *[a.clone() for a in args], impl="native", **attrs)
        want = ref(*[a.clone() for a in args], **attrs)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), (start, t, pad)
        a = [x.clone() for x in args]
        plain = {k: v for k, v in attrs.items() if k not in ("rope_dim", "theta")}
        steps = rope_(native.attention(*a, **plain), a[5], R, 10000.0, inverse=True)
        assert torch.equal(got[0], steps), (start, t, pad)
    with pytest.raises(ValueError, match="rope_dim 32 needs rot"):
        native.attention_step_(*args, **{k: v for k, v in attrs.items() if k not in ("rope_dim", "theta")}, rot=None,
                               rope_dim=R)


def test_few_token_path_agrees_with_the_block_path():
    """On a decode-sized call the two PyTorch paths give the same outputs."""
    args, attrs = _case("csa", None, torch.float32, [30, 14], 3)
    attrs = {k: v for k, v in attrs.items() if k not in ("rope_dim", "theta")}
    got = run("attention", *args, impl="decode", **attrs)
    blocks = run("attention", *args, impl="blocked", **attrs)
    assert torch.allclose(got, blocks, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", [None, "fp8", "mxfp4"])
def test_few_token_indexer_selects_the_reference_rows(fmt):
    ref = get_op("indexer_topk").ref
    g = torch.Generator().manual_seed(1)
    h, d, ratio, topk = 8, 32, 4, 5
    keys = encode(torch.randn(3, 30, d, generator=g), fmt, dtype=torch.float32)
    kw = dict(topk=topk, ratio=ratio, score_scale=d ** -0.5, weight_scale=h ** -0.5, key_format=fmt)
    # ragged rows; one with fewer visible rows than picks; one padding row; two tokens per row
    for pos in (torch.tensor([[100], [9], [-1]]), torch.tensor([[50, 51], [2, 3], [17, 18]])):
        b, t = pos.shape
        q = torch.randn(b, t, h, d, generator=g)
        w = torch.randn(b, t, h, generator=g)
        got = run("indexer_topk", q, w, keys[:b], pos, impl="decode", **kw)
        want = ref(q, w, keys[:b], pos, **kw)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values)
        assert (got[pos < ratio - 1] == -1).all()  # nothing is complete before `ratio` tokens


def test_rope_in_place_and_half_precision_are_bit_identical_to_the_reference():
    ref = get_op("rope").ref
    pos = torch.tensor([[7, 300], [-1, 4096 + 9]])
    for x in (torch.randn(2, 2, 3, 64).bfloat16(), torch.randn(2, 2, 64), torch.randn(2, 2, 64).bfloat16()):
        for inverse in (False, True):
            want = ref(x, pos, rope_dim=32, theta=160000.0, yarn=(16.0, 64, 32.0, 1.0), inverse=inverse)
            assert torch.equal(rope(x, pos, 32, 160000.0, (16.0, 64, 32.0, 1.0), inverse), want)
            y = x.clone()
            assert rope_(y, pos, 32, 160000.0, (16.0, 64, 32.0, 1.0), inverse) is y and torch.equal(y, want)


@pytest.mark.parametrize("ratio,overlap,store", [(4, True, None), (8, False, None), (4, True, "fp8_ds")])
@pytest.mark.parametrize("start", [[0], [5, 5, 5], [9, 2, 30]])
@pytest.mark.parametrize("impl", ["decode", "native-decode"])
def test_compressor_decode_steps_equal_reference(ratio, overlap, store, start, impl):
    """Every sequence at one position (the slice path) or ragged, across several window closes. The
    PyTorch path's products are the reference's own (bit for bit); the C products (``native-decode``)
    sum in another order: within 1e-5."""
    if impl == "native-decode" and not native.moe_decode_available(torch.float32):
        pytest.skip("the C products need AVX2 + FMA or AVX-512F")
    exact = impl == "decode"
    ref = get_op("compressor").ref
    g = torch.Generator().manual_seed(6)
    b, hid, d, c = len(start), 32, 64, 2 if overlap else 1
    wkv, wgate = torch.randn(c * d, hid, generator=g), torch.randn(c * d, hid, generator=g)
    ape, norm_w = torch.randn(ratio, c * d, generator=g), torch.rand(d, generator=g) + 0.5
    rows = torch.zeros(b, 12, stored_width(d, store, 16), dtype=torch.uint8 if store else torch.float32)
    states = [rows, torch.zeros(b, c * ratio, c * d), torch.zeros(b, c * ratio, c * d)]
    fast_states = [t.clone() for t in states]
    attrs = dict(ratio=ratio, overlap=overlap, eps=1e-6, rope_dim=16, theta=10000.0, store=store)
    for step in range(3 * ratio + 1):
        pos = torch.tensor(start)[:, None] + step
        h = torch.randn(b, 1, hid, generator=g)
        want = ref(h, wkv, wgate, ape, norm_w, *states, pos, **attrs)
        got = run("compressor", h, wkv, wgate, ape, norm_w, *fast_states, pos, impl=impl, **attrs)
        if exact:
            assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), f"step {step}"
        else:
            assert all(torch.allclose(got[i], want[i], rtol=1e-5, atol=1e-5) for i in (1, 2)), f"step {step}"
        if store:  # packed rows: a last-bit difference may move one fp8 rounding step
            assert (got[0] != want[0]).float().mean() < 0.01, f"step {step}"
        else:
            tol = 1e-6 if exact else 1e-5
            assert torch.allclose(got[0], want[0], rtol=tol, atol=tol), f"step {step}"
    assert (states[0] != 0).any()  # windows did close
