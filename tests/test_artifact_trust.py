"""What an artifact trusts: the manifest sealed by its digest, every path inside the artifact, every
file read checked against its hash before use, reference weights read from exactly the files the
manifest names, and tune's manifest writes atomic, locked and merged."""
import hashlib
import json
import re
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import v4c
from v4c.artifact.manifest import (DIGEST, MANIFEST, Manifest, open_weights, read_manifest, reference_entries,
                                   update_manifest, verify_artifact, write_manifest)
from v4c.cli import main
from v4c.errors import ArtifactError
from v4c.io.checkpoint import Checkpoint
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny checkpoint and a reference-mode artifact of it (small to copy: the weights stay outside)."""
    root = tmp_path_factory.mktemp("trust")
    ck = write_random_checkpoint(tiny_config_dict(), root / "ck", seed=0)
    return ck, v4c.compile(ck, root / "art", target="cpu", weights="reference")


@pytest.fixture()
def art(built, tmp_path):
    return shutil.copytree(built[1], tmp_path / "art")


def manifest(path):
    return json.loads((path / MANIFEST).read_text())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def logits(model):
    return model.new_session(1).forward(torch.tensor([[3, 1, 4, 1, 5]]))


# ------------------------------------------------------------------------------------------ the digest

def test_compile_seals_the_manifest_and_tune_style_rewrites_keep_it_valid(art):
    man = manifest(art)
    assert len(man[DIGEST]) == 64
    read_manifest(art)  # digest checks out
    update_manifest(art, lambda d: d.update(created="later"))
    assert manifest(art)["created"] == "later" and manifest(art)[DIGEST] != man[DIGEST]
    verify_artifact(art)


@pytest.mark.parametrize("edit", [
    lambda m: m.update(dtype="bf16"),
    lambda m: m.update(target="sm90"),
    lambda m: next(iter(m["kernels"]["sites"].values()))["configs"]["B=1,T=1"]["meta"].update(num_warps=8),
    lambda m: m["files"].update({"graph.v4c": "0" * 64}),
], ids=["dtype", "target", "kernel-meta", "file-hash"])
def test_an_edited_manifest_fails_its_digest(art, edit):
    man = manifest(art)
    edit(man)
    (art / MANIFEST).write_text(json.dumps(man, indent=1, sort_keys=True) + "\n")
    with pytest.raises(ArtifactError, match="does not match its digest .*edited or corrupted"):
        v4c.load(art, device="cpu")


def test_a_manifest_without_a_digest_says_to_recompile(art):
    man = manifest(art)
    del man[DIGEST]
    (art / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="no digest .*older v4c; recompile the model"):
        v4c.load(art, device="cpu")


# ------------------------------------------------------------------------------- paths in the manifest

def _evil_module(tmp_path, marker):
    """A 'kernel module' outside the artifact that leaves ``marker`` behind if it is ever executed."""
    src = f"open({str(marker)!r}, 'w').write('ran')\n".encode()
    evil = tmp_path / "evil.py"
    evil.write_bytes(src)
    return evil, sha(src)


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_a_kernel_module_outside_the_artifact_is_never_executed(art, tmp_path, how):
    """Even with its hash in the manifest and the digest recomputed (a rewritten manifest), a module path
    leaving the artifact is refused by the runtime and by the tuner, and the module never runs."""
    from v4c.autotune.tune import plan
    marker = tmp_path / "marker"
    evil, digest = _evil_module(tmp_path, marker)
    man = manifest(art)
    fam, mod = next(iter(man["kernels"]["modules"].items()))
    if how == "symlink":
        (art / mod["file"]).unlink()
        (art / mod["file"]).symlink_to(evil)
        rel = mod["file"]
    else:
        rel = "../evil.py" if how == "dotdot" else str(evil)
    mod.update(file=rel, sha256=digest)
    man["files"][rel] = digest
    write_manifest(art, man)
    want = "resolves to .* outside the artifact" if how == "symlink" else "not a normalised relative path"
    with pytest.raises(ArtifactError, match=want):
        v4c.load(art, device="cpu", backend="triton")
    with pytest.raises(ArtifactError, match=want):
        plan(art)
    assert not marker.exists()


def test_the_kernel_loader_itself_refuses_paths_out_of_the_artifact(art, tmp_path, monkeypatch):
    from v4c.backends.triton import load_modules
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # load_modules sets it for the CPU; restored after the test
    marker = tmp_path / "marker"
    _, digest = _evil_module(tmp_path, marker)
    entry = {"modules": {"gemm": {"file": "../evil.py", "sha256": digest}}}
    with pytest.raises(ArtifactError, match=r"kernels.modules\['gemm'\].file '../evil.py' is not a normalised"):
        load_modules(art, entry, "cpu")
    assert not marker.exists()


@pytest.mark.parametrize("field", ["graph", "config"])
def test_graph_and_config_outside_the_artifact_are_refused(art, tmp_path, field):
    """A graph beside the artifact used to be read with no hash check (a different model ran)."""
    other = tmp_path / f"other.{field}"
    other.write_bytes((art / manifest(art)[field]).read_bytes())
    man = manifest(art)
    rel = f"../{other.name}"
    man[field] = rel
    write_manifest(art, man)
    with pytest.raises(ArtifactError, match=rf"{field} '\.\./other\.{field}' is not a normalised relative path"):
        v4c.load(art, device="cpu")


def test_a_listed_file_outside_the_artifact_is_refused_and_never_read(art, tmp_path):
    (tmp_path / "secret").write_text("x")
    man = manifest(art)
    man["files"]["../secret"] = sha(b"x")
    write_manifest(art, man)
    with pytest.raises(ArtifactError, match=r"files key '\.\./secret' is not a normalised relative path"):
        verify_artifact(art)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(graph="extra.v4c"), "graph 'extra.v4c' is not listed in the manifest's files"),
    (lambda m: m.update(aot={"binaries": {"k": {"dir": "aot/../..", "files": ["x.json"]}}}),
     r"aot.binaries\['k'\].dir 'aot/../..' is not a normalised"),
    (lambda m: m.update(parallel={"world_size": 1, "attn": "dp", "ranks": [{"graph": "/etc/passwd"}]}),
     r"parallel.ranks\[0\].graph '/etc/passwd' is not a normalised"),
], ids=["unlisted-graph", "aot-dir", "rank-graph"])
def test_every_path_field_is_checked(art, edit, message):
    (art / "extra.v4c").write_text("graph")
    man = manifest(art)
    edit(man)
    write_manifest(art, man)
    with pytest.raises(ArtifactError, match=message):
        read_manifest(art)


def test_aot_binaries_are_read_inside_the_artifact_and_against_their_hash(art, tmp_path, monkeypatch):
    triton = pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))  # never the user's Triton cache
    from triton.runtime.cache import triton_key

    from v4c.backends.triton import install_binaries
    key = "ab" * 32  # Triton cache keys are hex
    (art / "aot" / "k").mkdir(parents=True)
    (art / "aot" / "k" / "x.json").write_text("{}")
    aot = {"target": "sm90", "triton": triton.__version__,
           "triton_key": hashlib.sha256(triton_key().encode()).hexdigest(),
           "binaries": {key: {"dir": "aot/k", "files": ["x.json"]}}}
    with pytest.raises(ArtifactError, match="aot/k/x.json: AOT binary does not match its manifest hash"):
        install_binaries(art, aot, "sm90", files={"aot/k/x.json": "0" * 64})
    aot["binaries"][key]["dir"] = "../k"
    with pytest.raises(ArtifactError, match="not a normalised relative path"):
        install_binaries(art, aot, "sm90")
    assert not any(p.is_file() for p in (tmp_path / "triton").rglob("*"))  # nothing was installed


# ----------------------------------------------------------------------------- checked right before use

def test_a_graph_changed_after_verification_is_not_used(art, monkeypatch):
    import v4c.runtime.loader as loader
    real = loader.verify_artifact

    def verify_then_swap(*a, **k):
        man = real(*a, **k)
        with open(art / "graph.v4c", "a") as f:
            f.write("\n")  # after the files were checked, before the loader reads the graph
        return man

    monkeypatch.setattr(loader, "verify_artifact", verify_then_swap)
    with pytest.raises(ArtifactError, match="graph.v4c: content differs from the manifest"):
        loader.load(art, device="cpu")


# -------------------------------------------------------------------------------------- reference weights

def test_reference_weights_ignore_an_index_and_shard_added_beside_them(tmp_path):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck", seed=0)
    art = v4c.compile(ck, tmp_path / "art", target="cpu", weights="reference")
    want = logits(v4c.load(art, device="cpu"))
    swapped = {k: torch.zeros_like(v) for k, v in load_file(ck / "model.safetensors").items()}
    save_file(swapped, ck / "new.safetensors")
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "new.safetensors" for k in swapped}}))
    with Checkpoint.open(ck) as c:
        assert c.files() == [ck / "new.safetensors"]  # what opening the directory would take
    got = logits(v4c.load(art, device="cpu", verify_weights=True))
    assert torch.equal(got, want)


def test_reference_layout_is_the_one_the_index_chose_at_compile_time(tmp_path):
    """Two files hold tensor "b"; the index picked the second. The manifest records that choice, and the
    loader keeps it without reading the index again."""
    ck = tmp_path / "ck"
    ck.mkdir()
    save_file({"a": torch.ones(2), "b": torch.zeros(2)}, ck / "one.safetensors")
    save_file({"b": torch.full((2,), 7.0)}, ck / "two.safetensors")
    (ck / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}))
    with Checkpoint.open(ck) as c:
        entries = reference_entries(c)
    assert [e.get("tensors") for e in entries] == [["a"], None]
    (ck / "model.safetensors.index.json").unlink()  # whatever is beside the files now plays no part
    man = Manifest({"weights": {"mode": "reference", "location": str(ck), "files": entries}}, tmp_path)
    with open_weights(man) as c:
        assert torch.equal(c.tensor("b"), torch.full((2,), 7.0)) and c.names() == ["a", "b"]


def test_a_referenced_file_changed_after_the_check_is_refused_when_opened(tmp_path):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck", seed=0)
    man = verify_artifact(v4c.compile(ck, tmp_path / "art", target="cpu", weights="reference"))
    save_file({"x": torch.ones(3)}, ck / "model.safetensors")  # replaced between the check and the open
    with pytest.raises(ArtifactError, match=r"model.safetensors: size \d+ differs from the recorded"):
        open_weights(man)


# ------------------------------------------------------------------------------------ malformed manifests

@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("graph"), "malformed manifest: lacks graph"),
    (lambda m: m["kernels"].update(sites=[]), "malformed manifest: kernels.sites must be an object, got \\[\\]"),
    (lambda m: m["weights"]["files"][0].update(size="big"),
     r"malformed manifest: weights.files\[0\].size must be an integer, got 'big'"),
    (lambda m: m["files"].update({"config.json": 5}), r"malformed manifest: files\['config.json'\] must be a SHA-256"),
    (lambda m: m["weights"].update(mode="borrowed"), "weights.mode must be one of copy, reference, none"),
], ids=["missing-key", "wrong-type", "nested-type", "bad-hash", "bad-mode"])
def test_malformed_manifests_are_clear_cli_errors(art, capsys, edit, message):
    man = manifest(art)
    edit(man)
    write_manifest(art, man)
    assert main(["inspect", str(art)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("v4c inspect: error: ") and "Traceback" not in err
    assert re.search(message, err), err


def test_a_manifest_that_is_not_json_is_a_clear_cli_error(art, capsys):
    (art / MANIFEST).write_bytes(b"{not json")
    assert main(["run", str(art), "--prompt-ids", "1"]) == 2
    assert "v4c run: error: " in (err := capsys.readouterr().err) and "not valid JSON" in err


# ------------------------------------------------------------------------------------ tune's manifest write

def _sites(art, n=2):
    sites = manifest(art)["kernels"]["sites"]
    return [sid for sid, s in sites.items() if s.get("module")][:n]


def test_concurrent_manifest_writers_wait_for_each_other_and_keep_both_changes(art):
    from v4c.autotune.tune import _write_manifest
    a, b = _sites(art)
    man = read_manifest(art)
    holding, release = threading.Event(), threading.Event()

    def slow_edit(data):  # a first writer that holds the lock for a while
        data["kernels"]["sites"][a]["configs"]["B=1,T=1"]["meta"]["num_warps"] = 2
        holding.set()
        release.wait(10)

    first = threading.Thread(target=update_manifest, args=(art, slow_edit))
    first.start()
    holding.wait(10)
    second = threading.Thread(target=_write_manifest, args=(man, {(b, "B=1,T=1"): ({"num_warps": 1}, "exact")}))
    second.start()
    time.sleep(0.3)
    assert second.is_alive()  # blocked on the lock, not writing over the first
    release.set()
    first.join(10)
    second.join(10)
    sites = read_manifest(art).data["kernels"]["sites"]
    assert sites[a]["configs"]["B=1,T=1"]["meta"]["num_warps"] == 2  # the first writer's change survived
    assert sites[b]["configs"]["B=1,T=1"] == {"meta": {"num_warps": 1}, "config_source": "exact"}
    assert not [p.name for p in art.iterdir() if p.name.endswith(".tmp")]
    verify_artifact(art)


def test_tune_refuses_to_write_into_an_artifact_recompiled_meanwhile(art):
    from v4c.autotune.tune import _write_manifest
    (sid,) = _sites(art, 1)
    man = read_manifest(art)
    update_manifest(art, lambda d: d["files"].update({"config.json": "0" * 64}))
    with pytest.raises(ArtifactError, match="changed while it was being tuned"):
        _write_manifest(man, {(sid, "B=1,T=1"): ({"num_warps": 1}, "exact")})


def test_a_leftover_manifest_temporary_does_not_block_loading(art):
    (art / ".manifest.json.tmp").write_text("")  # what a killed `v4c tune` of an older v4c left
    (art / ".manifest.json.abc123.tmp").write_text("{")
    v4c.load(art, device="cpu")
    (art / "surprise.py").write_text("")  # any other unlisted file still is
    with pytest.raises(ArtifactError, match="surprise.py: not listed"):
        v4c.load(art, device="cpu")
