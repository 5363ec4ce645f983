"""The operators' Python module (native/ops_py.cpp) against torch.ops: built wherever Python's headers are,
the same results bit for bit through a whole session, the same errors, the same autograd and in-place
behaviour; without the headers the build says why and everything goes through torch.ops."""
import sysconfig
from pathlib import Path

import pytest
import torch

import v4c
from v4c.backends.cpu import native

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"C helpers unavailable: {native.why()}")


def test_the_module_is_built_where_pythons_headers_are():
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if headers.is_file():
        assert native.calls() == "python-module", native.py_why()
        assert native.py_why() is None
        for name in native._PY_OPS:  # every bound operator is the module's function, not the overload
            assert not isinstance(getattr(native._ops(), name), torch._ops.OpOverload), name
    else:
        assert native.calls() == "torch.ops" and "Python.h" in native.py_why()


def test_without_pythons_headers_the_module_is_not_attempted(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_python_abi", lambda: (".so", str(tmp_path)))
    why = native._py_commands("c++", tmp_path)
    assert isinstance(why, str) and "Python.h" in why and str(tmp_path) in why


def test_a_module_that_does_not_import_leaves_torch_ops(monkeypatch, tmp_path):
    bad = tmp_path / "_v4c_native_py.so"
    bad.write_bytes(b"not a shared object")
    monkeypatch.setattr(native, "_py", [None])
    monkeypatch.setattr(native, "_state", {})
    native._load_py(bad)
    assert "py" not in native._state and native._state["py_why"].startswith("importing _v4c_native_py.so failed")
    native._load_py(tmp_path / "missing.so")  # (the first reason is kept)
    assert native._state["py_why"].startswith("importing")


@pytest.fixture(scope="module")
def py_module():
    if native.calls() != "python-module":
        pytest.skip(f"the operators' Python module is not built here: {native.py_why()}")
    return native._state["py"]


@pytest.mark.parametrize("batch,prompt,seed", [(1, 37, 0), (3, 21, 1)])
def test_a_session_through_either_path_gives_the_same_bits(tiny_artifact, py_module, monkeypatch, batch, prompt,
                                                           seed):
    """Prefill, then decode steps past several compressor windows: logits and every state equal bit for bit
    with the operators called through torch.ops and through the module."""
    model = v4c.load(tiny_artifact, device="cpu")
    paths = {"torch.ops": native._Ops(None), "module": native._Ops(py_module)}
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    sessions = {k: model.new_session(batch, max_context=prompt + 16) for k in paths}
    steps = [torch.randint(0, vocab, (batch, prompt), generator=g)] + \
        [torch.randint(0, vocab, (batch, 1), generator=g) for _ in range(9)]
    with torch.inference_mode():
        for ids in steps:
            out = {}
            for k, ops in paths.items():
                monkeypatch.setitem(native._state, "ops", ops)
                out[k] = sessions[k].forward(ids, logits="last")
            assert torch.equal(out["torch.ops"], out["module"])
            a, b = sessions["torch.ops"].states, sessions["module"].states
            for name in a:
                assert torch.equal(a[name], b[name]), name


def _bad_calls():
    f32, i32 = torch.float32, torch.int32
    z = torch.zeros
    yield "norm_rope_", (z(2, 3, 8, dtype=i32), None, 1e-6, 4, None, True)
    yield "norm_rope_", (z(2, 3, 8), None, 1e-6, 5, None, True)
    yield "linear", (z(2, 4), z(3, 4), 1, "bogus")
    yield "linear", (z(2, 4), z(3, 5), 1, None)
    yield "o_proj_step", (z(1, 1, 4, 8), z(2, 6), 4, z(8, 8), 2, [8])
    yield "moe_route", (z(2, 8, dtype=f32), None, None, None, 9, 1.0)
    yield "hc_mix", (z(1, 1, 4, 8, dtype=i32), None, None, None, z(24, 32), z(24), z(3), None, 1e-6, 1e-6, 20, False)


@pytest.mark.parametrize("name,args", list(_bad_calls()))
def test_bad_operands_raise_the_same_errors(py_module, name, args):
    errors = []
    for f in (getattr(torch.ops.v4c_native, name).default, getattr(py_module, name)):
        with pytest.raises(Exception) as e:
            f(*args)
        errors.append((type(e.value), str(e.value).splitlines()[0]))
    assert errors[0] == errors[1]
    assert errors[0][1].startswith("v4c_native.")  # (the message names the operator or the product it runs)


def test_autograd_and_in_place_behaviour_match(py_module):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(3, 16, generator=g, requires_grad=True), torch.randn(5, 16, generator=g)
    a, b = torch.ops.v4c_native.linear.default(x, w, 1, None), py_module.linear(x, w, 1, None)
    assert torch.equal(a, b) and a.requires_grad == b.requires_grad and type(a.grad_fn) is type(b.grad_fn)
    y = torch.randn(2, 3, 8, generator=g)
    y1, y2 = y.clone(), y.clone()
    r1 = torch.ops.v4c_native.norm_rope_.default(y1, torch.ones(8), 1e-6, 4, None, True)
    r2 = py_module.norm_rope_(y2, torch.ones(8), 1e-6, 4, None, True)
    assert r2 is y2 and r1 is y1  # the operand itself comes back, changed in place
    assert torch.equal(y1, y2) and not torch.equal(y1, y) and y1._version == y2._version
