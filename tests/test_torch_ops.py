"""The cpu backend's fast ops (v4c/backends/cpu) against the ops' references.

End to end: the same artifact loaded with backend "cpu" and "reference" gives the same logits
through ragged prefills, decode steps and prefill chunks, for every tiny variant and for the
production cache formats. Block-wise attention/indexer are forced into many small blocks so
their block boundaries are exercised on tiny shapes.
"""
import warnings

import pytest
import torch

import v4c
from hf_reference import VARIANTS
from v4c.graph.ops.attention import indexer_topk as ref_indexer_topk
from v4c.model.random_weights import write_random_checkpoint
from v4c.backends.cpu import attention as fast_attention
from v4c.backends.cpu import native
from v4c.backends.cpu import rope as fast_rope
from v4c.graph.ops.core import rope as ref_rope
from impls import CPU, run


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    monkeypatch.setattr(fast_attention, "_BLOCK_ELEMS", 1 << 10)


def _compile(tmp_path, variant, overrides=None, **opts):
    ck = write_random_checkpoint({**VARIANTS[variant], **(overrides or {})}, tmp_path / "ck", seed=3)
    return v4c.compile(ck, tmp_path / "art", target="cpu", **opts)


def _drive(model, vocab, seed=0):
    """A ragged prefill, decode steps, then a prefill chunk; the logits of every call."""
    g = torch.Generator().manual_seed(seed)
    s = model.new_session(2, max_context=128)
    outs = [s.forward(torch.randint(0, vocab, (2, 45), generator=g), lengths=[45, 29])]
    for _ in range(6):
        outs.append(s.forward(torch.randint(0, vocab, (2, 1), generator=g)))
    outs.append(s.forward(torch.randint(0, vocab, (2, 11), generator=g)))
    return outs, [45 + 6 + 11, 29 + 6 + 11]


# fp32 caches: only summation order differs (~1e-6). Rounded caches (bf16 / fp8 / fp4) can flip one
# rounding step of a cached value when the input differs in its last fp32 bit, and FP4 keys make
# indexer score ties common (a tie broken the other way selects another row): hence the looser
# bound there (measured 5e-6 .. 1.1e-3); real errors show up in the fp32 rows at 1e-4.
# (one attention head: a decode call's query projection is one C call, which splits heads only for more
# than one, and the head axis must still be there)
@pytest.mark.parametrize("variant,overrides,opts,tol", [
    ("tiny", None, {}, 1e-4),
    ("hc2", None, {}, 1e-4),
    ("pro_like", None, {}, 1e-4),
    ("tiny", {"num_attention_heads": 1, "o_groups": 1}, {}, 1e-4),
    ("tiny", None, {"kv_cache": "fp8", "indexer_cache": "fp4"}, 1e-2),
    ("pro_like", None, {"kv_cache": "bf16", "indexer_cache": "fp8"}, 1e-2),
])
def test_torch_backend_equals_references(tmp_path, variant, overrides, opts, tol):
    art = _compile(tmp_path, variant, overrides, **opts)
    fast = v4c.load(art, backend="cpu")
    ref = v4c.load(art, backend="reference")
    assert {r["backend"] for r in ref.implementations()} == {"reference"}
    assert "cpu" in {r["backend"] for r in fast.implementations()}
    vocab = fast.config.vocab_size
    a, _ = _drive(fast, vocab)
    b, _ = _drive(ref, vocab)
    for i, (x, y) in enumerate(zip(a, b)):
        if i == 0:  # the padding of row 1 has meaningless logits
            x, y = torch.cat([x[0], x[1, :29]]), torch.cat([y[0], y[1, :29]])
        err = float((x - y).abs().max() / y.abs().max())
        assert err < tol, f"call {i}: relative error {err:.2e}"


def test_cpu_backend_is_the_default_on_cpu_and_uses_fast_ops(tiny_artifact):
    m = v4c.load(tiny_artifact)
    assert m.backend == "cpu" and v4c.load(tiny_artifact, backend="torch").backend == "cpu"  # the former name
    rows = m.implementations()
    by = {}
    for r in rows:
        by.setdefault((r["op"], r["phase"]), set()).add((r["backend"], r["implementation"]))
    decode = "native-decode" if native.moe_decode_available(torch.float32) else "decode"  # C products (fp32 model)
    assert by[("indexer", "decode")] == {("cpu", decode)} and by[("indexer", "prefill")] == {("cpu", "blocked")}
    attn = by[("sparse_attention", "prefill")]
    assert attn == ({("cpu", "native")} if native.library() is not None else {("cpu", "blocked")})
    if native.library() is not None:  # the decode path was passed over for the C helpers: never silently
        assert all(not r["declined"] for r in rows if r["op"] == "sparse_attention")
    else:
        assert any("not built" in d["reason"] for r in rows for d in r["declined"])


def test_rope_tables_are_bit_identical_to_the_reference():
    x = torch.randn(3, 50, 4, 32)
    pos = torch.randint(-1, 9000, (3, 50))  # beyond the first table: it must grow
    for yarn in (None, (16.0, 64, 32.0, 1.0)):
        for inverse in (False, True):
            assert torch.equal(fast_rope.rope(x, pos, 16, 10000.0, yarn, inverse),
                               ref_rope(x, pos, rope_dim=16, theta=10000.0, yarn=yarn, inverse=inverse))


@pytest.mark.parametrize("fmt", [None, "fp8", "mxfp4"])
def test_indexer_selects_the_reference_rows(fmt):
    from v4c.graph.storage import encode
    g = torch.Generator().manual_seed(1)
    b, t, h, d, ratio, topk = 2, 40, 8, 32, 4, 5
    keys = encode(torch.randn(b, 30, d, generator=g), fmt, dtype=torch.float32)
    q = torch.randn(b, t, h, d, generator=g)
    w = torch.randn(b, t, h, generator=g)
    pos = torch.arange(t)[None].repeat(b, 1) + torch.tensor([[0], [60]])
    pos[0, 35:] = -1  # padding
    kw = dict(topk=topk, ratio=ratio, score_scale=d ** -0.5, weight_scale=h ** -0.5, key_format=fmt)
    got = fast_attention.indexer_topk(q, w, keys, pos, **kw)
    want = ref_indexer_topk(q, w, keys, pos, **kw)
    assert torch.equal(got.sort(-1).values, want.sort(-1).values)
    assert (got[0, 35:] == -1).all() and (got[0, :3] == -1).all()  # nothing visible before 4 tokens


def test_thread_setting(tiny_artifact, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("V4C_NUM_THREADS", "1")
        v4c.load(tiny_artifact)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("V4C_NUM_THREADS", "two")
        with pytest.raises(ValueError, match="V4C_NUM_THREADS must be a positive integer"):
            v4c.load(tiny_artifact)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("experts", [None, (2, 5)])
def test_moe_ffn_equals_reference(experts, dtype):
    """Prefill sizes: whole routing, and a rank's share under expert parallelism (other ranks'
    assignments sort last). bf16: at least as close to an fp32 evaluation as the reference is."""
    from v4c.graph.ops.collective import ep_select
    from v4c.graph.ops.fused import moe_ffn as ref_moe_ffn
    from v4c.graph.ops.fused import moe_router
    g = torch.Generator().manual_seed(2)
    e, d, i, k = 8, 32, 16, 3
    h = torch.randn(2, 9, d, generator=g)
    router = torch.randn(e, d, generator=g)
    w13, w2 = torch.randn(e, 2 * i, d, generator=g) * 0.3, torch.randn(e, d, i, generator=g) * 0.3
    shared = [torch.randn(i, d, generator=g), torch.randn(i, d, generator=g), torch.randn(d, i, generator=g)]
    idx, w, perm, offsets = moe_router(h, router, torch.zeros(e), topk=k, scaling=1.5)
    if experts is not None:
        idx, w, perm, offsets = ep_select(idx, w, experts=experts)
        w13, w2 = w13[experts[0]:experts[1]], w2[experts[0]:experts[1]]
    args = (h, idx, w, perm, offsets, w13, w2, *shared)
    truth = ref_moe_ffn(*args, limit=2.0)
    if dtype == torch.float32:
        assert torch.allclose(run("moe_ffn", *args, limit=2.0, impl="grouped"), truth, rtol=1e-5, atol=1e-5)
        return
    low = tuple(a.to(dtype) if a.is_floating_point() and a is not w else a for a in args)
    got, want = run("moe_ffn", *low, limit=2.0, impl="grouped"), ref_moe_ffn(*low, limit=2.0)
    assert got.dtype == want.dtype == dtype
    err_got, err_want = [float((x.float() - truth).abs().max() / truth.abs().max()) for x in (got, want)]
    assert err_got <= err_want + 2 ** -8, f"bf16 error {err_got:.2e} vs the reference's {err_want:.2e}"


@pytest.mark.parametrize("n,d", [(4, 48), (4, 44), (3, 40), (2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mhc_rows_mixed_together_equal_each_row_alone_bit_for_bit(n, d, dtype):
    """The C mixes take the logits of 3 rows per load of fn (mhc.c, logits_rows); a row alone takes
    dots(). Both keep dot()'s lanes and order, so a call over 7 rows (two blocks and a rest) gives the
    same bits as seven one-row calls: widths with a tail (44), fn rows beyond whole blocks of 4 (n = 3:
    15 rows), the head's 4 or 2 rows."""
    if native.library() is None:
        pytest.skip(f"C helpers unavailable: {native.why()}")
    g = torch.Generator().manual_seed(n * d)
    t = 7
    x, y = torch.randn(1, t, n, d, generator=g).to(dtype), torch.randn(1, t, d, generator=g).to(dtype)
    post, comb = torch.rand(1, t, n, generator=g) * 2, torch.rand(1, t, n, n, generator=g)
    fn, base = torch.randn((n + 2) * n, n * d, generator=g) * 0.1, torch.randn((n + 2) * n, generator=g)
    scale, norm_w = torch.rand(3, generator=g) + 0.5, (torch.rand(d, generator=g) + 0.5).to(dtype)
    for head in (False, True):
        f, b, s = (fn[:n], base[:n], scale[:1]) if head else (fn, base, scale)
        yy, pp, cc = (None, None, None) if head else (y, post, comb)
        whole = native.hc_mix(x, yy, pp, cc, f, b, s, norm_w, eps=1e-6, hc_eps=1e-6, iters=20, head=head)
        for r in range(t):
            one = native.hc_mix(x[:, r:r + 1].contiguous(), None if head else y[:, r:r + 1].contiguous(),
                                None if head else post[:, r:r + 1].contiguous(),
                                None if head else comb[:, r:r + 1].contiguous(), f, b, s, norm_w, eps=1e-6,
                                hc_eps=1e-6, iters=20, head=head)
            for w, o in zip(whole, one):
                if w is not None:
                    assert torch.equal(w[:, r:r + 1], o), (head, r)


@pytest.mark.parametrize("n", [4, 3])
def test_the_c_mixes_sinkhorn_is_the_loops_arithmetic_bit_for_bit(n):
    """hc_mix's Sinkhorn (mhc.c: for V4's four streams eight rows' matrices a vector, else one matrix at a
    time) against the loop written out as fp32 tensor ops in its order (each sum from 0, row by row, then
    + eps, then a division): from the same softmax (iters=0), 20 rounds give the same bits for 1, 7, 8, 9 and
    37 rows (whole groups of eight, a partial one, both)."""
    if native.library() is None:
        pytest.skip(f"C helpers unavailable: {native.why()}")
    d, eps = 24, 1e-6
    for t in (1, 7, 8, 9, 37):
        g = torch.Generator().manual_seed(t + n)
        x, y = torch.randn(1, t, n, d, generator=g), torch.randn(1, t, d, generator=g)
        post, comb = torch.rand(1, t, n, generator=g) * 2, torch.rand(1, t, n, n, generator=g)
        fn, base = torch.randn((n + 2) * n, n * d, generator=g), torch.randn((n + 2) * n, generator=g) * 2
        scale, norm_w = torch.rand(3, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
        args = (x, y, post, comb, fn, base, scale, norm_w)
        c = native.hc_mix(*args, eps=1e-6, hc_eps=eps, iters=0)[3].clone()
        got = native.hc_mix(*args, eps=1e-6, hc_eps=eps, iters=20)[3]
        for it in range(20):
            if it > 0:
                for i in range(n):
                    s = torch.zeros(1, t)
                    for j in range(n):
                        s = s + c[..., i, j]
                    c[..., i, :] = c[..., i, :] / (s + eps)[..., None]
            for j in range(n):
                s = torch.zeros(1, t)
                for i in range(n):
                    s = s + c[..., i, j]
                c[..., :, j] = c[..., :, j] / (s + eps)[..., None]
        assert torch.equal(got, c), (t, float((got - c).abs().max()))


@pytest.mark.parametrize("tokens,path,n", [
    (1, "native", 4), (3, "native", 4), (8, "native", 2),  # decode sizes: one C call
    (100, "native", 4), (300, "native", 3),  # prefill sizes: the same C call, rows across threads
    (3, "small", 4), (100, "streamed", 4),  # without the C helpers (no compiler, V4C_NATIVE=0)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mhc_mixes_equal_references(tokens, path, n, dtype):
    from v4c.graph.registry import get_op
    if path == "native" and native.library() is None:
        pytest.skip(f"C helpers unavailable: {native.why()}")
    ref_head, ref_post_pre = get_op("hc_head").ref, get_op("hc_post_pre").ref
    g = torch.Generator().manual_seed(4 + tokens + n)
    d = 48
    x = torch.randn(1, tokens, n, d, generator=g).to(dtype)
    y = torch.randn(1, tokens, d, generator=g).to(dtype)
    post, comb = torch.rand(1, tokens, n, generator=g) * 2, torch.rand(1, tokens, n, n, generator=g)
    fn, base = torch.randn((n + 2) * n, n * d, generator=g) * 0.1, torch.randn((n + 2) * n, generator=g)
    scale, norm_w = torch.rand(3, generator=g) + 0.5, (torch.rand(d, generator=g) + 0.5).to(dtype)
    kw = dict(n=n, eps=1e-6, hc_eps=1e-6, iters=20)
    # bf16 / fp16: one rounding step of the stored streams
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    for got, want in zip(run("hc_post_pre", x, y, post, comb, fn, base, scale, norm_w, impl=path, **kw),
                         ref_post_pre(x, y, post, comb, fn, base, scale, norm_w, **kw)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    for got, want in zip(run("hc_pre", x, fn, base, scale, norm_w, impl=path, **kw),
                         get_op("hc_pre").ref(x, fn, base, scale, norm_w, **kw)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    head = {"small": "reference"}.get(path, path)  # a decode step without the C helpers: the reference's few ops
    got = run("hc_head", x, y, post, comb, fn[:n], base[:n], scale[:1], norm_w, impl=head, eps=1e-6, hc_eps=1e-6)
    want = ref_head(x, y, post, comb, fn[:n], base[:n], scale[:1], norm_w, eps=1e-6, hc_eps=1e-6)
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("ratio,overlap", [(4, True), (8, False)])
def test_compressor_decode_steps_equal_reference(ratio, overlap):
    """Step by step through several windows (some steps close one, in one row or both, one carries a
    padding row)."""
    from v4c.graph.registry import get_op
    g = torch.Generator().manual_seed(5)
    b, hid, d, c = 2, 32, 16, 2 if overlap else 1
    wkv, wgate = torch.randn(c * d, hid, generator=g), torch.randn(c * d, hid, generator=g)
    ape, norm_w = torch.randn(ratio, c * d, generator=g), torch.rand(d, generator=g) + 0.5
    states = [torch.zeros(b, 40, d), torch.zeros(b, c * ratio, c * d), torch.zeros(b, c * ratio, c * d)]
    fast_states = [t.clone() for t in states]
    attrs = dict(ratio=ratio, overlap=overlap, eps=1e-6, rope_dim=8, theta=10000.0)
    ref = get_op("compressor").ref
    start = torch.tensor([3, 0])
    for step in range(3 * ratio):
        pos = (start + step)[:, None].clone()
        if step == 5:
            pos[1, 0] = -1  # a padding row: falls back to the reference path
        h = torch.randn(b, 1, hid, generator=g)
        want = ref(h, wkv, wgate, ape, norm_w, *states, pos, **attrs)
        got = run("compressor", h, wkv, wgate, ape, norm_w, *fast_states, pos, impl="decode", **attrs)
        # pending slots exactly; rows pooled for several sequences at once may differ in the last bit
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), f"step {step}"
        assert torch.allclose(got[0], want[0], rtol=1e-6, atol=1e-6), f"step {step}"
        if step == 5:
            start[1] -= 1  # row 1 did not advance


def test_native_helpers_can_be_switched_off(monkeypatch):
    """V4C_NATIVE=0: no compiler is run and the callers keep their PyTorch paths."""
    from v4c.backends.cpu import native
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("V4C_NATIVE", "0")
    with pytest.warns(native.NativeUnavailableWarning, match="disabled by V4C_NATIVE=0"):
        assert native.library() is None
    assert native.why() == "disabled by V4C_NATIVE=0"
    assert not native.hc_mix_supported(torch.zeros(1, 1, 4, 8), None, None)


def test_native_build_failure_is_reported_and_falls_back(monkeypatch, tmp_path):
    """A compiler that fails: no library, the reason kept for ``why()``, no compiler left running,
    and the ops take their PyTorch paths."""
    from v4c.backends.cpu import native
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CC", "false")
    assert native.library() is None and native.why().startswith("building the C helpers failed")
    assert not native.hc_mix_supported(torch.zeros(1, 1, 4, 8), None, None)
    bf = dict(dtype=torch.bfloat16)
    assert not native.moe_decode_supported(torch.zeros(1, 32, **bf), torch.zeros(2, 64, 32, **bf),
                                           torch.zeros(2, 32, 32, **bf), [])


def test_native_helpers_are_built_once_per_content_hash_into_the_users_cache(monkeypatch, tmp_path):
    """The first process builds the C helpers into $V4C_CACHE_DIR/native/<hash>/; the next loads them without
    running a compiler; a cached library that others could have replaced (group/world-writable) is rebuilt."""
    import subprocess

    from v4c.backends.cpu import native
    monkeypatch.setenv("V4C_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    if native.library() is None:
        pytest.skip(f"C helpers unavailable: {native.why()}")
    (entry,) = (tmp_path / "native").iterdir()
    module = ["_v4c_native_py.so"] if native.calls() == "python-module" else []  # (where Python's headers are)
    assert sorted(p.name for p in entry.iterdir()) == module + ["libv4c_native.so"]  # no objects, no temporaries
    builds = []
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: (builds.append(a) if "-c" in a[0] else None,
                                                               real(*a, **k))[1])  # compiler runs, not `cc --version`
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None and builds == []  # loaded from the cache: nothing compiled
    assert native.calls() == ("python-module" if module else "torch.ops")
    if module:  # a module others could have replaced is not imported: the operators go through torch.ops
        (entry / module[0]).chmod(0o777)
        monkeypatch.setattr(native, "_state", {})
        assert native.library() is not None and builds == [] and native.calls() == "torch.ops"
        assert "writable by others" in native.py_why()
    # a library others could have replaced is not loaded but built again; the rebuild is stopped at its first
    # compiler (a whole build, ~40 s here, ran above, and the load from the cache showed what it leaves)
    def stop(*a, **k):
        if "-c" in a[0]:
            builds.append(a)
            raise OSError("compiler stopped by the test")
        return real(*a, **k)

    monkeypatch.setattr(subprocess, "Popen", stop)
    (entry / "libv4c_native.so").chmod(0o777)
    monkeypatch.setattr(native, "_state", {})
    with warnings.catch_warnings():  # (said once per process, so whether it shows here depends on the tests before)
        warnings.simplefilter("ignore", native.NativeUnavailableWarning)
        assert native.library() is None and builds  # not trusted: not loaded, built again
    assert "compiler stopped by the test" in native.why()


def test_sinkhorn_one_matrix_path_equals_reference():
    from v4c.graph.ops.mhc import sinkhorn
    from v4c.backends.cpu.mhc import sinkhorn_
    for seed in range(5):
        c = torch.rand(1, 1, 4, 4, generator=torch.Generator().manual_seed(seed)) + 1e-3
        want = sinkhorn(c.clone(), iters=20, eps=1e-6)
        got = sinkhorn_(c.clone(), 20, 1e-6)  # one matrix: the Python-float path
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        assert torch.allclose(sinkhorn_(c.repeat(2, 1, 1, 1), 20, 1e-6), want.repeat(2, 1, 1, 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_loop_touches_no_new_memory(tiny_artifact, batch):
    """After warm-up a decode step allocates nothing new: the states were planned up front and every
    activation reuses memory the allocator already holds (no page faults, no resident growth)."""
    import resource
    model = v4c.load(tiny_artifact, backend="torch")
    s = model.new_session(batch, max_context=256)
    vocab = model.config.vocab_size
    s.forward(torch.randint(0, vocab, (batch, 40)))
    step = torch.randint(0, vocab, (batch, 1))
    for _ in range(8):  # warm-up: lazy caches (RoPE tables, weight views, the C helpers' buffers)
        s.forward(step)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(64):
        s.forward(step)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults <= 4, f"{faults} page faults in 64 decode steps"


@pytest.mark.parametrize("tokens", [1, 5, 130])  # decode sizes and a prefill split across threads
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["native", "torch"])
def test_projection_epilogues_equal_references(tokens, dtype, path):
    """q_proj / kv_proj: GEMM, RMSNorm (per head for q), RoPE on the last dims, YaRN tables, padding rows."""
    from v4c.graph.registry import get_op
    if path == "native" and native.library() is None:
        pytest.skip(f"C helpers unavailable: {native.why()}")
    g = torch.Generator().manual_seed(tokens)
    b, hid, heads, d, rope_dim = 2, 64, 4, 32, 16
    x = torch.randn(b, tokens, hid, generator=g).to(dtype)
    pos = torch.arange(tokens)[None].repeat(b, 1) + torch.tensor([[7], [300]])
    pos[1, -1] = -1  # a padding row
    yarn = (4.0, 64, 32, 1)
    wq = (torch.randn(heads * d, hid, generator=g) * 0.2).to(dtype)
    wkv, norm_w = (torch.randn(d, hid, generator=g) * 0.2).to(dtype), (torch.rand(d, generator=g) + 0.5).to(dtype)
    # bf16 / fp16: one rounding step of an output element
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    qa = dict(shape=(b, tokens, heads, d), eps=1e-6, rope_dim=rope_dim, theta=10000.0, yarn=yarn)
    got, want = run("q_proj", x, wq, pos, impl=path, **qa), get_op("q_proj").ref(x, wq, pos, **qa)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)
    ka = dict(eps=1e-6, rope_dim=rope_dim, theta=10000.0, yarn=yarn)
    got, want = run("kv_proj", x, wkv, norm_w, pos, impl=path, **ka), get_op("kv_proj").ref(x, wkv, norm_w, pos, **ka)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol)


def test_native_helpers_after_fork():
    """A child forked after the C helpers handed rows to PyTorch's OpenMP team (whose threads do not
    exist in the child) runs the rows on its own thread: a batched mix, split across the team in the
    parent, finishes in the child and equals the parent's. (Only the C path: torch's own OpenMP
    GEMMs are not fork-safe.)"""
    import os
    import signal
    import sys
    import time
    from v4c.backends.cpu import native
    if native.library() is None or not hasattr(os, "fork"):
        pytest.skip("needs the C helpers and fork")
    g = torch.Generator().manual_seed(9)
    n, d, t = 4, 32, 8
    args = (torch.randn(1, t, n, d, generator=g), torch.randn(1, t, d, generator=g), torch.rand(1, t, n, generator=g),
            torch.rand(1, t, n, n, generator=g), torch.randn((n + 2) * n, n * d, generator=g) * 0.1,
            torch.randn((n + 2) * n, generator=g), torch.rand(3, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5)
    if sys.platform.startswith("linux"):  # PyTorch's Linux builds run on GNU OpenMP: the team is found
        assert all(native._openmp_entries())
    want = native.hc_mix(*args, eps=1e-6, hc_eps=1e-6, iters=20)[1]  # 8 rows: split across the team
    got = torch.zeros_like(want).share_memory_()  # the child writes its result here
    pid = os.fork()
    if pid == 0:  # the child: no pytest teardown, just an exit status
        try:
            got.copy_(native.hc_mix(*args, eps=1e-6, hc_eps=1e-6, iters=20)[1])
            os._exit(0)
        except BaseException:
            os._exit(1)
    deadline, status = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the C helpers")
    assert os.waitstatus_to_exitcode(status) == 0 and torch.equal(got, want)
