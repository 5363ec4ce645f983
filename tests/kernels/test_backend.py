"""The runtime's Triton backend: kernels emitted into the artifact, verified, imported and run
(through the interpreter here) for the whole tiny model, against Hugging Face's reference."""
import json
import shutil

import pytest
import torch

import v4c
from v4c.codegen.emit import kernel_table
from v4c.errors import ArtifactError

from hf_reference import VARIANTS, hf_logits, make_hf_model, save_checkpoint


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    cfg = VARIANTS["tiny"]
    hf = make_hf_model(cfg, seed=1)
    root = tmp_path_factory.mktemp("tri")
    save_checkpoint(hf, cfg, root / "ckpt")
    return hf, v4c.compile(root / "ckpt", root / "art", target="cpu")


def test_every_fused_op_has_a_kernel_in_the_artifact(art):
    _, path = art
    man = json.loads((path / "manifest.json").read_text())
    fused = {n for n in man["kernels"]["ops"]}
    from v4c.graph import OPS
    graph_ops = {line.split(" = ")[1].split("(")[0] for line in (path / "graph.v4c").read_text().splitlines()
                 if " = " in line and "(" in line}
    missing = {op for op in graph_ops if OPS[op].fused} - fused
    assert not missing, f"fused ops without a Triton kernel: {missing}"
    for m in man["kernels"]["modules"].values():
        assert (path / m["file"]).is_file() and m["file"] in man["files"]


def test_triton_backend_matches_reference(art):
    hf, path = art
    model = v4c.load(path, device="cpu", backend="triton")
    assert model.backend == "triton"
    ids = torch.randint(0, 1024, (2, 14), generator=torch.Generator().manual_seed(0))
    steps = [10, 1, 1, 1, 1]
    want = hf_logits(hf, ids, steps)
    s = model.new_session(2)
    got, off = [], 0
    for n in steps:
        got.append(s.forward(ids[:, off:off + n]))
        off += n
    got = torch.cat(got, 1)
    assert ((got - want).abs().max() / want.abs().max()) <= 1e-3


def test_tampered_kernel_is_never_imported(art, tmp_path):
    _, path = art
    copy = shutil.copytree(path, tmp_path / "art")
    man = json.loads((copy / "manifest.json").read_text())
    if not man["kernels"]["modules"]:
        pytest.skip("no kernel modules")
    victim = next(iter(man["kernels"]["modules"].values()))["file"]
    (copy / victim).write_text("raise SystemExit('this must never run')\n")
    with pytest.raises(ArtifactError, match="content differs"):
        v4c.load(copy, backend="triton")


def test_backend_choice_is_checked(art):
    _, path = art
    with pytest.raises(ValueError, match="backend must be"):
        v4c.load(path, backend="cuda-magic")
    assert v4c.load(path, device="cpu").backend == "cpu"  # the default on CPU


def test_kernel_table_covers_the_templates():
    table = kernel_table()
    assert all(isinstance(v, str) for v in table.values())


def test_rendered_modules_are_self_contained():
    """What goes into an artifact imports torch and triton only: the prelude is inlined."""
    import ast

    from v4c.codegen.emit import FAMILIES, render
    for fam in FAMILIES:
        tree = ast.parse(render(fam, "sm90"))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {(n.module or "").split(".")[0] or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= {"math", "os", "torch", "triton", "functools", "__future__"}, (fam, imported)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_matches_eager(art):
    _, path = art
    ids = torch.randint(0, 1024, (2, 12), generator=torch.Generator().manual_seed(0)).cuda()
    outs = []
    for graphs in (True, False):
        model = v4c.load(path, device="cuda", backend="triton", cuda_graphs=graphs)
        s = model.new_session(2)
        s.forward(ids[:, :8])
        outs.append(torch.cat([s.forward(ids[:, i:i + 1]) for i in range(8, 12)], 1))
    assert torch.allclose(outs[0], outs[1], atol=1e-5, rtol=1e-5)
