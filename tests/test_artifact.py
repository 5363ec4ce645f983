"""Compile and load: manifest checks, bad checkpoints, atomic writes, weight-free artifacts."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import v4c
from v4c.errors import ArtifactError, CheckpointError, ConfigError, WeightMismatchError
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint


@pytest.fixture()
def ckpt(tmp_path):
    return write_random_checkpoint(tiny_config_dict(), tmp_path / "ckpt", seed=0)


def test_manifest_records_every_file(tiny_artifact):
    man = json.loads((tiny_artifact / "manifest.json").read_text())
    assert man["format"] == "v4c-artifact" and man["format_version"] == 1
    kernel_files = {m["file"] for m in man["kernels"]["modules"].values()}
    assert set(man["files"]) == {"config.json", "graph.v4c", "weights/model.safetensors"} | kernel_files
    assert man["toolchain"]["torch"] == torch.__version__ and man["target"] == "cpu"
    assert man["weights"]["mode"] == "copy"


@pytest.mark.parametrize("victim", ["config.json", "graph.v4c", "weights/model.safetensors"])
def test_tampered_artifact_is_refused(tiny_artifact, tmp_path, victim):
    art = shutil.copytree(tiny_artifact, tmp_path / "art")
    with open(art / victim, "r+b") as f:
        f.seek(-2, 2)
        f.write(b"\x01\x02")
    with pytest.raises(ArtifactError, match=f"{victim}: content differs"):
        v4c.load(art)


def test_missing_and_extra_files_are_named(tiny_artifact, tmp_path):
    art = shutil.copytree(tiny_artifact, tmp_path / "art")
    (art / "graph.v4c").unlink()
    (art / "surprise.py").write_text("print('hi')")
    with pytest.raises(ArtifactError, match=r"graph.v4c: missing(.|\n)*surprise.py: not listed"):
        v4c.load(art)


def test_incompatible_format_version_says_what_differs(tiny_artifact, tmp_path):
    art = shutil.copytree(tiny_artifact, tmp_path / "art")
    man = json.loads((art / "manifest.json").read_text())
    man["format_version"] = 99
    (art / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="format version 99, this v4c reads version 1"):
        v4c.load(art)
    with pytest.raises(ArtifactError, match="not a v4c artifact"):
        v4c.load(tmp_path)


def test_compile_refuses_to_overwrite_unless_forced(ckpt, tmp_path):
    out = v4c.compile(ckpt, tmp_path / "art")
    with pytest.raises(FileExistsError, match="exists"):
        v4c.compile(ckpt, out)
    v4c.compile(ckpt, out, overwrite=True)
    v4c.load(out)


def test_interrupted_compile_leaves_nothing(ckpt, tmp_path, monkeypatch):
    import v4c.compiler as compiler

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(compiler.shutil, "copyfile", boom)
    with pytest.raises(KeyboardInterrupt):
        v4c.compile(ckpt, tmp_path / "art")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_reference_mode_checks_the_checkpoint(ckpt, tmp_path):
    art = v4c.compile(ckpt, tmp_path / "art", weights="reference")
    assert not (art / "weights").exists()
    ids = torch.tensor([[1, 2, 3]])
    before = v4c.load(art).new_session().forward(ids)
    tensors = load_file(ckpt / "model.safetensors")
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1.0  # same header, other content
    save_file(tensors, ckpt / "model.safetensors")
    v4c.load(art)  # the cheap check (size + header) passes...
    with pytest.raises(ArtifactError, match="content differs"):
        v4c.load(art, verify_weights=True)  # ...the full one does not
    tensors["extra"] = torch.zeros(1)
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(ArtifactError, match="model.safetensors"):
        v4c.load(art)
    assert before.shape == (1, 3, 1024)


def test_weight_free_artifact_inspects_but_does_not_run(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(tiny_config_dict()))
    art = v4c.compile(tmp_path / "cfg", tmp_path / "art")
    model = v4c.load(art)
    assert not model.runnable
    with pytest.raises(ArtifactError, match="weight-free"):
        model.new_session()


def test_checkpoint_mismatch_names_tensors(ckpt, tmp_path):
    tensors = load_file(ckpt / "model.safetensors")
    del tensors["model.layers.1.self_attn.sinks"]
    tensors["model.layers.0.self_attn.q_a_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.9.bogus"] = torch.zeros(1)
    tensors["mtp.0.ignored"] = torch.zeros(1)  # the MTP block is not part of the graph: ignored
    tensors["model.layers.0.mlp.gate.tid2eid"] = tensors["model.layers.0.mlp.gate.tid2eid"].float()
    save_file(tensors, ckpt / "model.safetensors")
    with pytest.raises(WeightMismatchError) as e:
        v4c.compile(ckpt, tmp_path / "art")
    msg = str(e.value)
    for name in ("model.layers.1.self_attn.sinks", "model.layers.0.self_attn.q_a_proj.weight",
                 "model.layers.9.bogus", "tid2eid"):
        assert name in msg
    assert "mtp.0.ignored" not in msg
    assert not (tmp_path / "art").exists()


def test_corrupt_and_missing_shards_are_named(ckpt, tmp_path):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        v4c.compile(ckpt, tmp_path / "art")
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        v4c.compile(ckpt, tmp_path / "art")


@pytest.mark.parametrize("override,field", [
    ({"o_groups": 3}, "o_groups"),
    ({"index_topk": 0}, "index_topk"),
    ({"layer_types": ["sliding_attention", "mystery_attention", "sliding_attention", "sliding_attention"]},
     "layer_types"),
])
def test_bad_config_names_the_field(tmp_path, override, field):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(tiny_config_dict(**override)))
    with pytest.raises(ConfigError, match=field):
        v4c.compile(tmp_path / "cfg", tmp_path / "art")
