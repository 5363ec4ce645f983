"""The backend registry: implementations per op with checkers, bound per node and phase at load,
and reported by ``v4c inspect`` exactly as ``v4c.load`` binds them."""
import json
import sys

import pytest
import torch

import v4c
from v4c.backends import DECODE_TOKENS, PHASES, Backend, NoImplementation, call_on, choose, get_backend, phase_of
from v4c.backends.cpu import native
from v4c.backends.cpu.registry import CPU
from v4c.cli import main
from v4c.graph.registry import OPS


def test_every_cpu_implementation_is_of_a_known_op_with_a_unique_name():
    for op, impls in CPU.impls.items():
        assert op in OPS, op
        names = [i.name for i in impls]
        assert len(names) == len(set(names)), (op, names)
        assert all(i.backend == "cpu" and i.fn is not None for i in impls)
    # the fallback ends every chain: an op with no fast path runs its reference
    assert [i.name for i in CPU.candidates("embedding")] == ["reference"]
    assert [i.backend for i in CPU.candidates("attention")][-1] == "reference"


def test_phases_and_names():
    assert phase_of(1) == phase_of(DECODE_TOKENS) == "decode" and phase_of(DECODE_TOKENS + 1) == "prefill"
    assert get_backend("torch") is get_backend("cpu")  # the former name
    with pytest.raises(ValueError, match="backend must be one of reference, cpu, triton"):
        get_backend("cuda")
    with pytest.raises(KeyError, match="no implementation 'fast' of attention"):
        CPU.impl("attention", "fast")


def test_the_first_implementation_that_accepts_runs_and_the_others_say_why():
    b = Backend("t")
    b.add("rope", "never", lambda c: "not today")(lambda *a, **k: "never")
    b.add("rope", "decode", lambda c: None if c.phase == "decode" else "prefill call")(lambda *a, **k: "decode")
    x, pos = torch.zeros(1, 4, 8), torch.zeros(1, 4, dtype=torch.long)
    c = choose(b, call_on("rope", (x, pos), {"rope_dim": 8, "theta": 1e4}))
    assert c.impl.name == "decode" and c.declined == (("t", "never", "not today"),)
    with pytest.raises(NoImplementation, match=r"t\.never: not today; t\.decode: prefill call"):
        choose(b, call_on("rope", (x, pos), {}, phase="prefill"))
    only = b.only("rope", "decode")
    assert [i.name for i in only.candidates("rope")] == ["decode"]


def test_a_checker_refusal_is_an_error_when_the_implementation_is_named():
    q = torch.zeros(1, 40, 2, 8, dtype=torch.float64)
    args = (q, torch.zeros(1, 40, 8, dtype=torch.float64), torch.zeros(1, 4, 8, dtype=torch.float64),
            torch.full((1, 4), -1), torch.zeros(2), torch.arange(40)[None])
    attrs = dict(kind="sliding", window=4, scale=1.0)
    with pytest.raises(ValueError, match=r"cpu\.native declines this attention call: .*q is f64"):
        CPU.callable("attention", args, attrs, name="native")
    with pytest.raises(ValueError, match="made for decode calls"):
        CPU.callable("attention", args, attrs, name="decode")


@pytest.mark.parametrize("backend", [None, "cpu", "reference", "triton"])
def test_inspect_reports_what_load_binds(tiny_artifact, backend, capsys):
    before = {m for m in sys.modules if m.startswith("v4c_kernels_")}
    assert main(["inspect", str(tiny_artifact), "--json", "--context", "64"]
                + (["--backend", backend] if backend else [])) == 0
    report = json.loads(capsys.readouterr().out)["implementations"]
    # inspect reads the choice from the manifest alone: it imports no kernel module
    assert {m for m in sys.modules if m.startswith("v4c_kernels_")} == before
    assert report["backend"] == (backend or "cpu") and report["device"] == "cpu"
    graph = v4c.load(tiny_artifact, backend="reference").graph
    assert len(report["nodes"]) == len(PHASES) * len(graph.nodes)
    if backend == "triton":
        return  # (binding them runs the interpreter: covered by tests/kernels/test_backend.py)
    model = v4c.load(tiny_artifact, backend=backend)
    assert model.implementations() == report["nodes"]
    if backend == "reference":
        assert {(r["backend"], r["implementation"]) for r in report["nodes"]} == {("reference", "reference")}
    else:  # the tiny model is fp32: its decode products run in C where this CPU has the kernels
        want = "native-decode" if native.moe_decode_available(torch.float32) else "decode"
        assert {(r["backend"], r["implementation"]) for r in report["nodes"]
                if r["op"] == "indexer" and r["phase"] == "decode"} == {("cpu", want)}


def test_inspect_text_names_the_implementations(tiny_artifact, capsys):
    assert main(["inspect", str(tiny_artifact), "--context", "64"]) == 0
    out = capsys.readouterr().out
    assert "implementations (cpu backend on cpu)" in out
    table = out.split("implementations (cpu backend on cpu)")[1]
    line = next(ln for ln in table.splitlines() if ln.startswith("indexer "))
    decode = "cpu.native-decode" if native.moe_decode_available(torch.float32) else "cpu.decode"
    assert decode in line and "cpu.blocked" in line
