"""Passes: golden IR files (input -> expected), differential checks, the pass manager."""
from pathlib import Path

import pytest
import torch

from v4c.graph import parse_graph, print_graph, verify
from v4c.graph.types import DTYPES
from v4c.model.build import build_graph
from v4c.model.config import V4Config
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import random_params
from v4c.cli import main
from v4c.passes import PassManager, default_pipeline
from v4c.passes.named import parse_pipeline
from v4c.passes.pipeline import FUSION_PASSES
from v4c.runtime.executor import Executor

GOLDEN = sorted((Path(__file__).parent / "golden").glob("*.ir"))
PASSES = {p.name: p for p in FUSION_PASSES}


def read_golden(path: Path):
    """Split a golden file into (pass name, input IR, expected IR, expected notes); reject stray directives."""
    run, parts, notes, current = None, {"input": [], "check": []}, [], "input"
    for line in path.read_text().splitlines():
        s = line.strip()
        if s.startswith("//"):
            body = s[2:].strip()
            if body.startswith("RUN:"):
                run = body[4:].strip()
            elif body == "CHECK:":
                current = "check"
            elif body.startswith("NOTE:"):
                notes.append(body[5:].strip())
            elif body[:1].isupper() and ":" in body.split(" ")[0]:
                raise ValueError(f"{path.name}: malformed directive {s!r}")
            continue
        parts[current].append(line)
    assert run, f"{path.name}: no RUN line"
    parse_pipeline(run)  # names known passes with valid options
    assert parts["check"], f"{path.name}: no CHECK section"
    return run, "\n".join(parts["input"]), "\n".join(parts["check"]), notes


def random_env(g, bindings, seed=0):
    gen = torch.Generator().manual_seed(seed)
    env = {}
    for name, t in (*g.inputs, *g.params, *g.states):
        shape = t.concrete(bindings)
        if name == "pos":
            env[name] = torch.arange(shape[1]).repeat(shape[0], 1)
        elif t.dtype in ("i64", "i32"):
            env[name] = torch.full(shape, -1, dtype=DTYPES[t.dtype])
        else:
            env[name] = torch.randn(shape, generator=gen).to(DTYPES[t.dtype])
    return env


def run_graph(g, env):
    params = {n: env[n] for n, _ in g.params}
    states = {n: env[n].clone() for n, _ in g.states}
    outs = Executor(g, params).run({n: env[n] for n, _ in g.inputs}, states)
    return outs, states


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden(path, tmp_path, capsys):
    """Each file runs through `v4c opt -p RUN` (which verifies after every pass); the printed IR must be
    the CHECK section, the notes must include each NOTE; fusions are checked on random inputs too."""
    run, src, want, notes = read_golden(path)
    (tmp_path / "in.ir").write_text(src)
    assert main(["opt", "-p", run, str(tmp_path / "in.ir"), "--notes"]) == 0
    out, err = capsys.readouterr()
    before, after = verify(parse_graph(src)), verify(parse_graph(out))
    assert out == print_graph(verify(parse_graph(want)))
    assert after != before  # every golden case rewrites something
    for n in notes:
        assert n in err, (n, err)
    if run in PASSES:  # a fusion computes the same outputs and states as the graph it rewrote
        env = random_env(before, {"B": 2, "T": 9, "L": 16})
        (o1, s1), (o2, s2) = run_graph(before, env), run_graph(after, env)
        for a, b in zip(o1, o2):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
        for k in s1:
            assert torch.equal(s1[k], s2[k]) or torch.allclose(s1[k], s2[k], atol=1e-6)
    if not run.startswith("shard"):  # idempotent and honest: a second run finds nothing and says so
        (again,) = [p.run(after) for p in parse_pipeline(run)]
        assert not again.changed and again.graph == after


def test_opt_reads_standard_input_and_refuses_unknown_passes(tmp_path, capsys, monkeypatch):
    import io
    _, src, want, _ = read_golden(Path(__file__).parent / "golden" / "fuse-moe.ir")
    monkeypatch.setattr("sys.stdin", io.StringIO(src))
    assert main(["opt", "-p", "fuse-moe", "-", "-o", str(tmp_path / "out.ir")]) == 0
    assert (tmp_path / "out.ir").read_text() == print_graph(verify(parse_graph(want)))
    assert main(["opt", "-p", "fuse-mo", str(tmp_path / "out.ir")]) == 2
    assert "unknown pass 'fuse-mo'; the passes are fuse-moe" in capsys.readouterr().err
    assert main(["opt", "-p", "shard{world=2 bogus=1}", str(tmp_path / "out.ir")]) == 2
    assert "pass 'shard': unknown option(s) bogus; it takes parallel, rank, world" in capsys.readouterr().err
    assert main(["opt", "-p", "quantize-kv-cache{kv=fp8_ds", str(tmp_path / "out.ir")]) == 2
    assert "unclosed '{'" in capsys.readouterr().err
    assert main(["opt", str(tmp_path / "out.ir")]) == 0  # no passes: parse, verify, print
    assert capsys.readouterr().out == print_graph(verify(parse_graph(want)))


def test_golden_harness_rejects_malformed_directives(tmp_path):
    bad = tmp_path / "bad.ir"
    bad.write_text("// RUN: fuse-mhc\n// CHEK: typo\ngraph g {\n  return\n}\n// CHECK:\ngraph g {\n  return\n}\n")
    with pytest.raises(ValueError, match="malformed directive"):
        read_golden(bad)


@pytest.fixture(scope="module")
def tiny():
    cfg = V4Config.from_dict(tiny_config_dict())
    g = build_graph(cfg)
    return g, random_params(g, cfg, seed=0)


def _model_run(g, params, chunks, seed=0):
    gen = torch.Generator().manual_seed(seed)
    B, L = 2, 64
    states = {n: torch.full(t.concrete({"B": B, "L": L}), -1 if t.dtype == "i64" else 0, dtype=DTYPES[t.dtype])
              for n, t in g.states}
    ex, outs, off = Executor(g, params), [], 0
    for n in chunks:
        ids = torch.randint(0, 1024, (B, n), generator=gen)
        pos = torch.arange(off, off + n).repeat(B, 1)
        outs.append(ex.run({"ids": ids, "pos": pos}, states)[0])
        off += n
    return torch.cat(outs, 1), states


@pytest.mark.parametrize("upto", range(1, len(FUSION_PASSES) + 1))
def test_each_pass_keeps_the_model_numerics(tiny, upto):
    g, params = tiny
    fused = PassManager([p() for p in FUSION_PASSES[:upto]]).run(g)
    chunks = [13, 6, 1, 1]
    ref, ref_states = _model_run(g, params, chunks)
    got, states = _model_run(fused, params, chunks)
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5
    for k in ref_states:
        assert torch.allclose(states[k].float(), ref_states[k].float(), atol=1e-5)


def test_pass_manager_records_and_prints(tiny):
    g, _ = tiny
    printed = []
    pm = PassManager(default_pipeline(), print_after={"fuse-moe"}, out=printed.append)
    fused = pm.run(g)
    assert pm.applied() == ["fuse-moe", "fuse-attention", "fuse-projections", "fuse-mhc"]
    assert len(printed) == 1 and printed[0].startswith("// IR after fuse-moe")
    assert verify(parse_graph(printed[0].split("\n", 1)[1])).nodes
    assert "fuse-mhc" in pm.report() and len(fused.nodes) < len(g.nodes) / 3
    with pytest.raises(ValueError, match="not in the pipeline"):
        PassManager(default_pipeline(), print_after={"fuse-everything"}).run(g)
    assert PassManager(default_pipeline(fuse=False)).run(g) == g


def test_every_pass_states_its_guarantee():
    for p in FUSION_PASSES:
        assert p.name == p.name.lower() and " " not in p.name and p().guarantee


def test_no_unexplained_leftovers_in_the_tiny_model(tiny):
    g, _ = tiny
    pm = PassManager(default_pipeline())
    pm.run(g)
    notes = [n for r in pm.records for n in r.notes]
    assert notes == []  # everything in the tiny model fuses; a leftover op would be explained here
