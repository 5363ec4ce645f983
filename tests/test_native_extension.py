"""The cpu backend's native extension as PyTorch operators (``torch.ops.v4c_native``): typed schemas,
clear errors for operands it does not take, one build per content hash reused by the next process,
and with V4C_NATIVE=0 or no compiler one notice and the PyTorch paths. (Numerics: test_native_attention,
test_torch_ops and test_torch_moe.)"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from v4c.backends.cpu import native

ROOT = Path(__file__).resolve().parents[1]
needs_lib = pytest.mark.skipif(native.library() is None, reason=f"native extension unavailable: {native.why()}")

SCHEMAS = {
    "hc_mix": "v4c_native::hc_mix(Tensor x, Tensor? y, Tensor? post, Tensor? comb, Tensor fn, Tensor base, "
              "Tensor scale, Tensor? norm_w, float eps, float hc_eps, int iters, bool head) "
              "-> (Tensor?, Tensor, Tensor?, Tensor?)",
    "norm_rope_": "v4c_native::norm_rope_(Tensor(a!) x, Tensor? w, float eps, int rope_dim, Tensor? rot, "
                  "bool norm=True) -> Tensor(a!)",
    "ring_append_": "v4c_native::ring_append_(Tensor(a!) ring, Tensor(b!) ring_pos, Tensor kv, Tensor pos) -> ()",
    "attention": "v4c_native::attention(Tensor q, Tensor kv, Tensor ring, Tensor ring_pos, Tensor sinks, Tensor pos, "
                 "Tensor? rows, Tensor? idx, str kind, int window, int ratio, float scale, str? isa=None) -> Tensor",
    "moe_decode": "v4c_native::moe_decode(Tensor x, Tensor w, Tensor perm, Tensor offsets, Tensor w13, Tensor w2, "
                  "Tensor? shared_gate, Tensor? shared_up, Tensor? shared_down, int k, float limit, "
                  "str? isa=None) -> Tensor",
    "dot_isas": "v4c_native::dot_isas(ScalarType dtype) -> str[]",
    "linear": "v4c_native::linear(Tensor x, Tensor w, int groups=1, str? isa=None) -> Tensor",
}


def _python(code: str, **env) -> dict:
    """Run ``code`` in a fresh interpreter (this repository importable); it prints one JSON line last."""
    full = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    full = {k: v for k, v in full.items() if v is not None}
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full,
                       cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_lib
def test_operators_are_registered_with_typed_schemas():
    assert native.library() is torch.ops.v4c_native
    for name, schema in SCHEMAS.items():
        assert str(getattr(torch.ops.v4c_native, name).default._schema) == schema
    (x,) = [a for a in torch.ops.v4c_native.norm_rope_.default._schema.arguments if a.name == "x"]
    assert x.alias_info is not None and x.alias_info.is_write  # the in-place operand is declared mutated
    assert not torch.ops.v4c_native.attention.default._schema.is_mutable


def _attention_case(dtype=torch.bfloat16, t=3, h=4, d=32, w=8):
    g = torch.Generator().manual_seed(0)
    return dict(q=torch.randn(1, t, h, d, generator=g).to(dtype), kv=torch.randn(1, t, d, generator=g).to(dtype),
                ring=torch.randn(1, w, d, generator=g).to(dtype), ring_pos=torch.arange(10, 10 + w).view(1, w),
                sinks=torch.randn(h, generator=g), pos=torch.arange(18, 18 + t).view(1, t))


@needs_lib
def test_operands_it_does_not_take_are_clear_errors_not_crashes():
    op = torch.ops.v4c_native.attention
    a = _attention_case()
    good = op(*a.values(), None, None, "sliding", 8, 0, 0.1)
    assert good.shape == a["q"].shape and good.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"attention: q must be float32, bfloat16 or float16, got Double"):
        op(a["q"].double(), *list(a.values())[1:], None, None, "sliding", 8, 0, 0.1)
    with pytest.raises(TypeError, match=r"attention: ring must have kv's dtype Float, got BFloat16"):
        op(a["q"], a["kv"].float(), *list(a.values())[2:], None, None, "sliding", 8, 0, 0.1)
    with pytest.raises(TypeError, match=r"attention: pos must be Long, got Int"):
        op(*list(a.values())[:5], a["pos"].int(), None, None, "sliding", 8, 0, 0.1)
    with pytest.raises(ValueError, match=r"attention: kv must hold \[B, T, D\]"):
        op(a["q"], a["kv"][:, :2].contiguous(), *list(a.values())[2:], None, None, "sliding", 8, 0, 0.1)
    with pytest.raises(RuntimeError, match=r"attention: q must be contiguous"):
        op(a["q"].transpose(1, 2).contiguous().transpose(1, 2), *list(a.values())[1:], None, None, "sliding", 8, 0, 0.1)
    with pytest.raises(ValueError, match=r"kind must be 'sliding', 'hca' or 'csa', got 'dense'"):
        op(*a.values(), None, None, "dense", 8, 0, 0.1)
    with pytest.raises(ValueError, match=r"kind 'csa' needs the compressed rows"):
        op(*a.values(), None, None, "csa", 8, 4, 0.1)
    x = torch.randn(1, 2, 4, 32)
    fn, base, scale = torch.randn(24, 128), torch.randn(24), torch.ones(3)
    with pytest.raises(TypeError, match=r"hc_mix: x must be float32, bfloat16 or float16, got Long"):
        torch.ops.v4c_native.hc_mix(x.long(), None, None, None, fn, base, scale, None, 1e-6, 1e-6, 20, False)
    with pytest.raises(ValueError, match=r"hc_mix: fn must hold"):
        torch.ops.v4c_native.hc_mix(x, None, None, None, fn[:, :64], base, scale, None, 1e-6, 1e-6, 20, False)
    with pytest.raises(ValueError, match=r"norm_rope_: rope_dim 3 must be even"):
        native.norm_rope_(torch.randn(1, 2, 16), None, 1e-6, 3, None)
    with pytest.raises(TypeError, match=r"norm_rope_: w must be float32, bfloat16 or float16"):
        native.norm_rope_(torch.randn(1, 2, 16), torch.ones(16, dtype=torch.float64), 1e-6, 0, None)


@needs_lib
def test_optional_results_and_the_in_place_operand():
    x = torch.randn(1, 2, 4, 32)
    fn, base, scale = torch.randn(4, 128) * 0.1, torch.randn(4), torch.ones(1)
    x1, h, post, comb = native.hc_mix(x, None, None, None, fn, base, scale, None, eps=1e-6, hc_eps=1e-6, head=True)
    assert x1 is None and post is None and comb is None and h.shape == (1, 2, 32)
    y = torch.randn(1, 2, 3, 16)
    rot = torch.polar(torch.ones(1, 2, 4), torch.rand(1, 2, 4))
    before = y.clone()
    out = native.norm_rope_(y, None, 1e-6, 8, rot)
    assert out.data_ptr() == y.data_ptr() and not torch.equal(y, before)


@needs_lib
def test_the_next_process_loads_the_cached_build_without_compiling():
    """A fresh interpreter with the same cache: the entry this process uses is loaded as it is (no
    compiler run, the file untouched), and only ``--version`` queries run."""
    key = native._build_key(*native._compilers())
    lib = native.cache_dir() / "native" / key / native._LIB
    if not native._private(lib):
        pytest.skip("this process could not keep its build in the cache")
    before = lib.stat().st_mtime_ns
    got = _python("""
        import json, subprocess
        calls = []
        real_popen, real_run = subprocess.Popen, subprocess.run
        subprocess.Popen = lambda cmd, *a, **k: (calls.append(list(cmd)), real_popen(cmd, *a, **k))[1]
        subprocess.run = lambda cmd, *a, **k: (calls.append(list(cmd)), real_run(cmd, *a, **k))[1]
        import torch
        from v4c.backends.cpu import native
        ok = native.library() is not None
        print(json.dumps({"ok": ok, "why": native.why(), "calls": calls,
                          "loaded": sorted(str(p) for p in torch.ops.loaded_libraries)}))
    """)
    assert got["ok"], got["why"]
    assert all(cmd[1:] == ["--version"] for cmd in got["calls"]), got["calls"]  # nothing compiled or linked
    assert got["loaded"] == [str(lib)]
    assert lib.stat().st_mtime_ns == before


@pytest.mark.parametrize("setting", ["disabled", "no compiler"])
def test_without_the_extension_one_notice_and_none(tmp_path, setting):
    env = {"V4C_CACHE_DIR": str(tmp_path)}
    if setting == "disabled":
        env["V4C_NATIVE"] = "0"
    else:  # no compiler on PATH and none named
        env.update(PATH=str(tmp_path), CC=None, CXX=None, V4C_NATIVE=None)
    got = _python("""
        import json, warnings
        import torch
        from v4c.backends.cpu import native
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results = [native.library() for _ in range(3)]
            supported = native.hc_mix_supported(torch.zeros(1, 1, 4, 8), None, None)
            native.moe_decode_available()
        notices = [str(w.message) for w in caught if issubclass(w.category, native.NativeUnavailableWarning)]
        print(json.dumps({"none": all(r is None for r in results), "why": native.why(), "supported": supported,
                          "notices": notices}))
    """, **env)
    assert got["none"] and not got["supported"]
    want = "disabled by V4C_NATIVE=0" if setting == "disabled" else "no C/C++ compiler found"
    assert got["why"].startswith(want)
    assert len(got["notices"]) == 1 and want in got["notices"][0] and "PyTorch paths run" in got["notices"][0]
    assert not (tmp_path / "native").exists()  # nothing built


@needs_lib
def test_moe_decode_operands_as_the_backend_passes_them_pass_every_check():
    """The MoE call with the operands the backend hands it (routing from the reference router, an
    expert-parallel share): every check passes, so on a CPU without AVX2 + FMA or AVX-512F the one
    error left is that; wrong operands are named."""
    from v4c.backends.cpu.moe import moe_native
    from v4c.graph.ops.collective import ep_select
    from v4c.graph.ops.fused import moe_ffn as ref_ffn
    from v4c.graph.ops.fused import moe_router as ref_router
    g = torch.Generator().manual_seed(3)
    e, d, i, k = 8, 64, 32, 2
    bf = torch.bfloat16
    w13, w2 = (torch.randn(e, 2 * i, d, generator=g) * 0.3).to(bf), (torch.randn(e, d, i, generator=g) * 0.3).to(bf)
    shared = [(torch.randn(*s, generator=g) * 0.3).to(bf) for s in ((i, d), (i, d), (d, i))]
    h = torch.randn(3, 1, d, generator=g).to(bf)
    idx, w, perm, offsets = ref_router(h, torch.randn(e, d, generator=g).to(bf), torch.zeros(e), topk=k, scaling=1.5)
    cases = [(idx, w, perm, offsets, w13, w2, *shared)]
    lidx, lw, lperm, loffsets = ep_select(idx, w, experts=(2, 6))
    cases.append((lidx, lw, lperm, loffsets, w13[2:6], w2[2:6]))
    for args in cases:
        if native.moe_decode_available():
            got = moe_native(h, *args, limit=2.0)
            want = ref_ffn(h, *args, limit=2.0)
            assert got.shape == want.shape and torch.allclose(got.float(), want.float(), rtol=3e-2, atol=3e-2)
        else:
            with pytest.raises(RuntimeError, match="has neither AVX2 \\+ FMA nor AVX-512F"):
                moe_native(h, *args, limit=2.0)
    flat = h.reshape(-1, d)
    with pytest.raises(TypeError, match=r"moe_decode: w13 must be BFloat16, got Float"):
        native.moe_decode(flat, w.reshape(-1), perm.reshape(-1), offsets, w13.float(), w2, shared, k=k, limit=2.0)
    with pytest.raises(ValueError, match=r"moe_decode: w13 must be \[E, 2I, D\]"):
        native.moe_decode(flat, w.reshape(-1), perm.reshape(-1), offsets, w13[:, :i].contiguous(), w2, shared, k=k,
                          limit=2.0)
    bad = perm.reshape(-1).clone()
    bad[0] = 99
    with pytest.raises(ValueError, match=r"moe_decode: perm\[0\] = 99 is outside \[0, 6\)"):
        native.moe_decode(flat, w.reshape(-1), bad, offsets, w13, w2, shared, k=k, limit=2.0)
