"""Checkpoint naming: HF in-memory names, official release names, per-expert tensors."""
import pytest
import torch
from safetensors.torch import load_file, save_file

import v4c
from v4c.errors import WeightMismatchError
from v4c.io.naming import graph_name
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from official_names import LEAF, TOP

OFFICIAL = {**TOP, **{f"model.layers.7.{g}": f"layers.7.{o}" for g, o in LEAF.items()}}


@pytest.mark.parametrize("hf,official", sorted(OFFICIAL.items()))
def test_official_names_map_to_graph_names(hf, official):
    assert graph_name(official) == hf
    assert graph_name("model." + official) == hf or official in ("head.weight",)  # save_pretrained style
    assert graph_name(hf) == hf  # graph names are fixed points
    assert graph_name("mtp.0.attn.wq_a.weight") is None


def _to_official(tensors: dict) -> dict:
    out = {}
    for name, t in tensors.items():
        if name in TOP:
            out[TOP[name]] = t
            continue
        _, _, layer, leaf = name.split(".", 3)
        if leaf == "mlp.experts.gate_up_proj":
            for e in range(t.shape[0]):
                w1, w3 = t[e].chunk(2)
                out[f"layers.{layer}.ffn.experts.{e}.w1.weight"] = w1.clone()
                out[f"layers.{layer}.ffn.experts.{e}.w3.weight"] = w3.clone()
        elif leaf == "mlp.experts.down_proj":
            for e in range(t.shape[0]):
                out[f"layers.{layer}.ffn.experts.{e}.w2.weight"] = t[e].clone()
        else:
            out[f"layers.{layer}.{LEAF[leaf]}"] = t
    out["mtp.0.attn.wq_a.weight"] = torch.zeros(2, 2)  # present in real releases, not served
    return out


def test_official_checkpoint_gives_identical_logits(tmp_path):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "hf", seed=5)
    off = tmp_path / "official"
    off.mkdir()
    (off / "config.json").write_text((ck / "config.json").read_text())
    tensors = load_file(ck / "model.safetensors")
    save_file(_to_official(tensors), off / "model.safetensors")
    ids = torch.randint(0, 1024, (2, 40), generator=torch.Generator().manual_seed(0))
    a = v4c.load(v4c.compile(ck, tmp_path / "a")).new_session(2).forward(ids)
    b = v4c.load(v4c.compile(off, tmp_path / "b")).new_session(2).forward(ids)
    assert torch.equal(a, b)

    t = load_file(off / "model.safetensors")
    del t["layers.2.ffn.experts.5.w3.weight"]
    t["layers.2.ffn.experts.1.w2.weight"] = torch.zeros(3, 3)
    save_file(t, off / "model.safetensors")
    with pytest.raises(WeightMismatchError) as e:
        v4c.compile(off, tmp_path / "c")
    assert "layers.2.ffn.experts.5.w3.weight" in e.value.missing
    assert "layers.2.ffn.experts.1.w2.weight" in e.value.mismatched
