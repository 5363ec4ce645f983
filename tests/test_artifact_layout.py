"""``v4c/artifact`` owns the artifact's layout: one writer (``ArtifactWriter`` for compile and shard,
``update_kernels`` for tune) and one reader (``open_artifact`` -> ``Artifact``). Nothing else spells the
manifest's keys or the artifact's paths, and the on-disk format is the one earlier versions wrote."""
import ast
import hashlib
import json
from pathlib import Path

import pytest

import v4c
from v4c.artifact import ArtifactWriter, open_artifact, update_kernels, verify_artifact
from v4c.artifact.layout import MANIFEST
from v4c.artifact.manifest import aot_binaries, read_kernel_module
from v4c.errors import ArtifactError
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint

ROOT = Path(v4c.__file__).parent
# the manifest's top-level keys: read through ``Artifact``'s accessors, never by subscript elsewhere
KEYS = {"format", "format_version", "created", "toolchain", "target", "dtype", "config", "graph", "passes",
        "kv_cache", "indexer_cache", "weights", "kernels", "files", "aot", "parallel", "manifest_sha256"}
# the artifact's file names (``artifact/layout.py``): spelt nowhere else
PATHS = ("manifest.json", "graph.v4c", "ranks/", "kernels/", "aot/", "weights/", "manifest_sha256")


def _strings(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node, node.value


def _is_data(node) -> bool:
    """``<x>.data``: the raw manifest dict of an ``Artifact``."""
    return isinstance(node, ast.Attribute) and node.attr == "data"


def _key(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def layout_spellings(path: Path) -> list[str]:
    """Where ``path`` spells an artifact path or reads a manifest key off the raw manifest dict."""
    tree = ast.parse(path.read_text())
    where = path.relative_to(ROOT.parent) if ROOT in path.parents else path.name
    found = []
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node, s in _strings(tree):
        if id(node) in docstrings:
            continue
        for p in PATHS:
            if s.startswith(p) or (p == "manifest.json" and p in s):
                found.append(f"{where}:{node.lineno}: spells {s!r}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and _is_data(node.value) and _key(node.slice) in KEYS:
            found.append(f"{where}:{node.lineno}: reads .data[{_key(node.slice)!r}]")
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and _is_data(node.func.value) and node.args and _key(node.args[0]) in KEYS):
            found.append(f"{where}:{node.lineno}: reads .data.get({_key(node.args[0])!r})")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.endswith("artifact.manifest"):
            low = {a.name for a in node.names} & {"read_manifest", "write_manifest", "update_manifest",
                                                   "artifact_path", "check_rel", "MANIFEST", "DIGEST"}
            if low:
                found.append(f"{where}:{node.lineno}: imports {sorted(low)} (the manifest's "
                             f"own reading and writing)")
    return found


def test_nothing_outside_the_artifact_package_spells_the_layout():
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        if (ROOT / "artifact") in path.parents:
            continue
        found += layout_spellings(path)
    assert not found, "\n".join(found)


def test_the_check_sees_each_kind_of_spelling(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text('"""manifest.json in a docstring is fine"""\n'
                 'from .artifact.manifest import read_manifest\n'
                 'a = man.data["kernels"]\nb = man.data.get("aot")\nc = root / "graph.v4c"\n'
                 'd = f"ranks/rank{r}.v4c"\ne = "manifest.json"\nok = x["kernels"]\n')
    found = layout_spellings(f)
    assert len(found) == 6, found
    assert all(x.startswith("probe.py:") for x in found)


# ------------------------------------------------------------------------------------- writer -> reader

def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_writer_to_reader_round_trip(tmp_path):
    out = tmp_path / "art"
    module_src = "X = 1\n"
    module = f"kernels/gemm-{_sha(module_src.encode())[:12]}.py"
    binary = tmp_path / "cache"
    binary.mkdir()
    (binary / "k.json").write_text("{}")
    (binary / "k.cubin").write_bytes(b"\0\1")
    (tmp_path / "tokenizer.json").write_text('{"model": {}}')
    plan = {"world_size": 2, "ep": 2, "attn": "dp",
            "ranks": [{"rank": 0, "param_bytes": 10, "shards": [["w", 0, 0, 1]]},
                      {"rank": 1, "param_bytes": 12, "shards": [["w", 0, 1, 2]]}]}
    key = "ab" * 32
    with ArtifactWriter(out) as w:
        w.set_config({"hidden_size": 8})
        w.set_graph("graph text\n")
        w.set_parallel(plan, ["rank 0 text\n", "rank 1 text\n"])
        w.add_kernel_modules([(module, module_src)])
        w.set_kernels({"modules": {"gemm": {"file": module, "sha256": _sha(module_src.encode())}}, "ops": {},
                       "sites": {}}, ["B=1,T=1"], 64)
        w.set_aot({"target": "sm90", "binaries": {key: w.add_aot_binary(key, sorted(binary.iterdir()))}})
        w.add_tokenizer(tmp_path / "tokenizer.json")
        w.no_weights()
        w.set_meta(target="sm90", dtype="bf16", toolchain={"v4c": v4c.__version__}, passes=["fuse"],
                   kv_cache="bf16", indexer_cache="bf16")
        assert not out.exists()  # nothing is in place before the commit
        assert w.commit() == out
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]

    art = open_artifact(out)
    assert (art.target, art.dtype, art.passes, art.kv_cache, art.indexer_cache) == ("sm90", "bf16", ["fuse"],
                                                                                   "bf16", "bf16")
    assert art.config() == {"hidden_size": 8}
    assert art.graph_text() == "graph text\n"
    assert [art.graph_text(rank=r) for r in range(2)] == ["rank 0 text\n", "rank 1 text\n"]
    assert art.world_size == 2 and art.parallel() == plan  # the plan as given: where its graphs went is internal
    assert art.kernels()["buckets"] == ["B=1,T=1"] and art.kernels()["context"] == 64
    assert art.tokenizer() == '{"model": {}}'
    assert not art.has_weights and art.open_weights() is None
    path, data = read_kernel_module(art.root, "gemm", art.kernels()["modules"]["gemm"])
    assert data == module_src.encode() and path.parent.name == "kernels"
    ((k, names, read),) = aot_binaries(art.root, art.aot(), art.files)
    assert (k, names, read("k.cubin")) == (key, ["k.cubin", "k.json"], b"\0\1")
    # the on-disk format: the manifest's keys and file names of earlier versions
    raw = json.loads((out / MANIFEST).read_text())
    assert set(raw) == KEYS
    assert (raw["config"], raw["graph"]) == ("config.json", "graph.v4c")
    assert [e["graph"] for e in raw["parallel"]["ranks"]] == ["ranks/rank0.v4c", "ranks/rank1.v4c"]
    assert raw["aot"]["binaries"][key] == {"dir": f"aot/{key}", "files": ["k.cubin", "k.json"]}
    assert set(raw["files"]) == {"config.json", "graph.v4c", "ranks/rank0.v4c", "ranks/rank1.v4c", module,
                                 f"aot/{key}/k.json", f"aot/{key}/k.cubin", "tokenizer.json"}
    with pytest.raises(ArtifactError, match="no rank 2"):
        art.graph_text(rank=2)


def test_a_writer_left_without_commit_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with ArtifactWriter(tmp_path / "art") as w:
            w.set_config({})
            raise RuntimeError
    assert list(tmp_path.iterdir()) == []
    with ArtifactWriter(tmp_path / "art") as w:
        w.set_graph("g\n")  # no commit: discarded
    assert list(tmp_path.iterdir()) == []


def test_the_writer_never_seals_a_manifest_that_would_not_load(tmp_path):
    with pytest.raises(ArtifactError, match="lacks"):
        with ArtifactWriter(tmp_path / "art") as w:
            w.set_config({})
            w.commit()  # no graph, target, weights...
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    ck = write_random_checkpoint(tiny_config_dict(), root / "ck", seed=0)
    return ck, v4c.compile(ck, root / "art", target="cpu", weights="copy", world_size=2, parallel="attn=dp")


def test_a_compiled_artifact_reads_back_through_the_reader(compiled):
    ck, out = compiled
    art = open_artifact(out, full_weights=True)
    assert art.config() == json.loads((out / "config.json").read_text())
    assert art.graph().params and art.graph(rank=0).params and art.graph(rank=1).params
    par = art.parallel()
    assert (par["world_size"], par["ep"], par["attn"]) == (2, 2, "dp")
    assert all("graph" not in e for e in par["ranks"])
    assert art.weights_mode == "copy"
    with art.open_weights() as c:
        assert c.names()
    assert art.kernels()["sites"] and art.target == "cpu"


# ------------------------------------------------------------------------------------------ tune's update

def test_tune_updates_kernels_through_the_writer_and_the_artifact_still_verifies(compiled, tmp_path):
    import shutil

    from v4c.autotune.tune import _write_manifest
    art_dir = shutil.copytree(compiled[1], tmp_path / "art")
    art = open_artifact(art_dir)
    sid, site = next((s, x) for s, x in art.kernels()["sites"].items() if x.get("module"))
    _write_manifest(art, {(sid, "B=1,T=1"): ({"num_warps": 1}, "exact")})
    after = verify_artifact(art_dir)  # digest resealed, every file still matches
    assert after.kernels()["sites"][sid]["configs"]["B=1,T=1"] == {"meta": {"num_warps": 1},
                                                                   "config_source": "exact"}
    assert after.files == art.files  # only the kernel table changed

    def drop_op(kernels):  # an edit whose result would not load is refused, the manifest left as it was
        kernels["sites"][sid]["module"] = "no-such-module"
    with pytest.raises(ArtifactError, match="kernels.sites"):
        update_kernels(after, drop_op)
    assert verify_artifact(art_dir).kernels() == after.kernels()
    v4c.load(art_dir, device="cpu")
