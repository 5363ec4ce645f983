"""Builder: config -> graph for the real V4-Flash / V4-Pro configs and the tiny test configs."""
import time
from collections import Counter

import pytest

from v4c.graph import verify
from v4c.model.build import build_graph
from v4c.model.config import V4Config
from v4c.model.presets import (FLASH_HUB_CONFIG, FLASH_OFFICIAL_CONFIG, PRO_HUB_CONFIG, PRO_OFFICIAL_CONFIG,
                               tiny_config_dict)


def n_params(graph, skip_embedding=False):
    return sum(t.numel() for n, t in graph.params if not (skip_embedding and n == "model.embed_tokens.weight"))


@pytest.mark.parametrize("cfg,total,kinds", [
    (FLASH_HUB_CONFIG, 284.3e9, {"sliding": 2, "csa": 21, "hca": 20}),
    (PRO_HUB_CONFIG, 1573.0e9, {"csa": 30, "hca": 31}),
], ids=["flash", "pro"])
def test_real_configs_build_fast_with_published_sizes(cfg, total, kinds):
    t0 = time.perf_counter()
    g = verify(build_graph(V4Config.from_dict(cfg), "bf16"))
    assert time.perf_counter() - t0 < 10
    assert abs(n_params(g) - total) / total < 0.01
    got = Counter(n.attr["kind"] for n in g.nodes if n.op == "attention")
    assert dict(got) == kinds


def test_official_spelling_builds_the_same_graph():
    for hub, official in ((FLASH_HUB_CONFIG, FLASH_OFFICIAL_CONFIG), (PRO_HUB_CONFIG, PRO_OFFICIAL_CONFIG)):
        assert build_graph(V4Config.from_dict(hub)) == build_graph(V4Config.from_dict(official))


def test_params_follow_the_layer_kinds():
    cfg = V4Config.from_dict(FLASH_HUB_CONFIG)
    names = {n for n, _ in build_graph(cfg).params}
    for i, kind in enumerate(cfg.layer_types):
        p = f"model.layers.{i}.self_attn.compressor"
        assert (f"{p}.kv_proj.weight" in names) == (kind != "sliding_attention")
        assert (f"{p}.indexer.q_b_proj.weight" in names) == (kind == "compressed_sparse_attention")
        hashed = i < 3
        assert (f"model.layers.{i}.mlp.gate.tid2eid" in names) == hashed
        assert (f"model.layers.{i}.mlp.gate.e_score_correction_bias" in names) == (not hashed)
    assert not any(n.startswith("mtp.") for n in names)


def test_shapes_of_a_csa_layer_match_the_checkpoint_layout():
    g = build_graph(V4Config.from_dict(FLASH_HUB_CONFIG), "bf16")
    p = dict(g.params)
    a = "model.layers.2.self_attn"
    assert p[f"{a}.q_a_proj.weight"].shape == (1024, 4096)
    assert p[f"{a}.q_b_proj.weight"].shape == (32768, 1024)
    assert p[f"{a}.o_a_proj.weight"].shape == (8192, 4096)
    assert p[f"{a}.compressor.kv_proj.weight"].shape == (1024, 4096)
    assert p[f"{a}.compressor.position_bias"].shape == (4, 1024)
    assert p[f"{a}.compressor.indexer.kv_proj.weight"].shape == (256, 4096)
    assert p["model.layers.2.mlp.experts.gate_up_proj"].shape == (256, 4096, 4096)
    assert p["model.layers.0.attn_hc.fn"].shape == (24, 16384)


def test_tiny_graph_states_are_the_decode_buffers():
    g = build_graph(V4Config.from_dict(tiny_config_dict()))
    states = dict(g.states)
    assert states["l0.win"].shape == ("B", 8, 64)
    assert states["l1.comp.rows"].shape == ("B", "L/4", 64)
    assert states["l1.comp.pend_kv"].shape == ("B", 8, 128)  # CSA: previous + current window
    assert states["l2.comp.pend_kv"].shape == ("B", 16, 64)  # HCA (ratio 16): the current window
    assert states["l1.index.rows"].shape == ("B", "L/4", 32)
    assert "l0.comp.rows" not in states
