"""Self-checks of the HF DeepSeek-V4 oracle in tests/hf_reference.py.

These make sure the reference itself is sane before v4c is compared against it: cached/chunked
decoding equals the no-cache forward, batching is row-independent, the non-trivial parameters
really matter (SwiGLU clamp, routing correction bias, indexer top-k), greedy generation is a
plain argmax loop that never stops early, and checkpoints round-trip through safetensors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_reference as R  # noqa: E402
from safetensors import safe_open  # noqa: E402

T = 40
REL_TOL = 1e-4
NAMES = sorted(R.VARIANTS)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def make_ids(cfg: dict, batch: int = 2, length: int = T, seed: int = 1) -> torch.LongTensor:
    return torch.randint(0, cfg["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


_MODELS: dict[tuple[str, float], object] = {}


def model_for(name: str, clamp_scale: float = 1.0):
    key = (name, clamp_scale)
    if key not in _MODELS:
        _MODELS[key] = R.make_hf_model(R.VARIANTS[name], seed=0, clamp_scale=clamp_scale)
    return _MODELS[key]


# ---------------------------------------------------------------------------------------------
# Variant coverage and model construction
# ---------------------------------------------------------------------------------------------
def test_variants_cover_required_features():
    layer_kinds, mlp_kinds, hc, yarn, plain = set(), set(), set(), False, False
    for name, cfg in R.VARIANTS.items():
        assert len(cfg["layer_types"]) == len(cfg["mlp_layer_types"]) == cfg["num_hidden_layers"], name
        assert cfg["index_n_heads"] >= 16, name  # avoids ReLU zero-score ties in the indexer
        layer_kinds |= set(cfg["layer_types"])
        mlp_kinds |= set(cfg["mlp_layer_types"])
        hc.add(cfg["hc_mult"])
        rp = cfg.get("rope_parameters")
        if rp and rp.get("rope_type") == "yarn":
            assert rp["factor"] == 16.0 and rp["original_max_position_embeddings"] == 64
            yarn = True
        else:
            plain = True
        # HF agrees with the dict
        hf_cfg = R.make_config(cfg)
        assert hf_cfg.layer_types == cfg["layer_types"]
        assert hf_cfg.mlp_layer_types == cfg["mlp_layer_types"]
        assert hf_cfg.rope_parameters["compress"]["rope_type"] == ("yarn" if rp else "default")
    assert layer_kinds == {"sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"}
    assert mlp_kinds == {"hash_moe", "moe"}
    assert {2, 4} <= hc
    assert yarn and plain
    # spec E.1 exactly
    tiny = R.VARIANTS["tiny"]
    assert tiny["layer_types"] == [
        "sliding_attention",
        "compressed_sparse_attention",
        "heavily_compressed_attention",
        "compressed_sparse_attention",
    ]
    assert tiny["compress_rates"] == {"compressed_sparse_attention": 4, "heavily_compressed_attention": 16}


@pytest.mark.parametrize("name", NAMES)
def test_model_is_small_deterministic_and_nontrivial(name):
    cfg = R.VARIANTS[name]
    snapshot = json.dumps(cfg, sort_keys=True)
    m = model_for(name)
    assert json.dumps(cfg, sort_keys=True) == snapshot, "make_hf_model mutated the variant dict"
    assert not m.training
    assert R.param_count(m) < 6_000_000
    sd = m.state_dict()
    assert all(t.dtype in (torch.float32, torch.int64) for t in sd.values())

    # bit-identical rebuild, different seed differs, global RNG untouched
    rng = torch.get_rng_state()
    m2 = R.make_hf_model(cfg, seed=0)
    assert torch.equal(rng, torch.get_rng_state())
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    m3 = R.make_hf_model(cfg, seed=1)
    assert not torch.equal(m3.state_dict()["lm_head.weight"], sd["lm_head.weight"])

    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    seen = set()
    for key, v in sd.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("sinks", "position_bias", "base", "hc_base", "e_score_correction_bias"):
            assert v.abs().min() > 0, key
            assert len(torch.unique(v)) == v.numel(), key
            if v.numel() >= 8:
                assert v.std() > 0.05, key
            seen.add(leaf)
        elif leaf in ("scale", "hc_scale"):
            assert (v != 1).all() and (v > 0).all(), key
            seen.add(leaf)
        elif key.endswith("norm.weight"):
            assert (v != 1).all() and 0.05 < v.std() < 0.2, key
            seen.add("norm")
        elif leaf == "tid2eid":
            assert v.shape == (cfg["vocab_size"], k)
            assert v.min() >= 0 and v.max() < E
            srt = v.sort(dim=-1).values
            assert (srt[:, 1:] != srt[:, :-1]).all(), "expert ids not distinct within a row"
            assert len(torch.unique(v)) == E
            seen.add(leaf)
    expected = {"sinks", "position_bias", "base", "scale", "hc_base", "hc_scale", "norm"}
    if "moe" in cfg["mlp_layer_types"]:
        expected.add("e_score_correction_bias")
    if "hash_moe" in cfg["mlp_layer_types"]:
        expected.add("tid2eid")
    assert expected <= seen

    logits = R.hf_logits_nocache(m, make_ids(cfg))
    assert torch.isfinite(logits).all()
    assert 0.3 < float(logits.std()) < 3.0 and float(logits.abs().max()) < 20.0


# ---------------------------------------------------------------------------------------------
# Cache / chunking / batching consistency
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_chunked_and_stepwise_cache_match_nocache(name):
    cfg = R.VARIANTS[name]
    m = model_for(name)
    ids = make_ids(cfg, length=T + 8)
    ref = R.hf_logits_nocache(m, ids)
    assert ref.shape == (2, T + 8, cfg["vocab_size"]) and ref.dtype == torch.float32
    for chunks in ([T + 8], [13, 7, 28], [13, 7, 20] + [1] * 8, [1] * 6 + [17, 3] + [1] * 22):
        got = R.hf_logits(m, ids, chunks)
        assert got.shape == ref.shape
        assert rel_err(got, ref) < REL_TOL, (name, chunks, rel_err(got, ref))
    with pytest.raises(ValueError):
        R.hf_logits(m, ids, [13, 7])


@pytest.mark.parametrize("name", NAMES)
def test_cache_comparison_can_fail(name):
    """The chunked-vs-nocache check is sensitive: a different prefix changes later logits."""
    cfg = R.VARIANTS[name]
    m = model_for(name)
    ids = make_ids(cfg)
    other = ids.clone()
    other[:, 2] = (other[:, 2] + 1) % cfg["vocab_size"]
    assert rel_err(R.hf_logits(m, other, [13, 7, 20])[:, 30:], R.hf_logits_nocache(m, ids)[:, 30:]) > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_batch_rows_are_independent(name):
    cfg = R.VARIANTS[name]
    m = model_for(name)
    ids = make_ids(cfg, seed=2)
    for fn in (lambda x: R.hf_logits_nocache(m, x), lambda x: R.hf_logits(m, x, [13, 7, 20])):
        both = fn(ids)
        for row in range(2):
            alone = fn(ids[row : row + 1])
            assert rel_err(both[row : row + 1], alone) < REL_TOL
    assert rel_err(both[0], both[1]) > 0.1


# ---------------------------------------------------------------------------------------------
# Non-trivial parameters actually matter
# ---------------------------------------------------------------------------------------------
def _set_swiglu_limit(model, limit: float):
    for layer in model.model.layers:
        layer.mlp.experts.limit = limit
        layer.mlp.shared_experts.limit = limit


@pytest.mark.parametrize("name", NAMES)
def test_swiglu_clamp_is_exercised(name):
    cfg = R.VARIANTS[name]
    ids = make_ids(cfg)
    assert R.swiglu_clamp_counts(model_for(name), ids)["total"] == 0
    m = model_for(name, clamp_scale=30.0)
    counts = R.swiglu_clamp_counts(m, ids)
    for key in ("routed_gate", "routed_up", "shared_gate", "shared_up"):
        assert counts[key] > 0, (name, counts)

    # Cross-check the hooks by recomputation for the shared expert of the last layer.
    mlp = m.model.layers[-1].mlp.shared_experts
    captured = {}
    h = m.model.layers[-1].mlp.shared_experts.register_forward_pre_hook(lambda mod, a: captured.update(x=a[0]))
    try:
        clamped = R.hf_logits_nocache(m, ids)
    finally:
        h.remove()
    with torch.no_grad():
        gate, up = mlp.gate_proj(captured["x"]), mlp.up_proj(captured["x"])
    limit = cfg["swiglu_limit"]
    assert float(gate.max()) > limit and float(up.abs().max()) > limit
    assert float(gate.min()) < limit  # a mix of clamped and unclamped values

    # The clamp changes the output: removing it changes the logits.
    try:
        _set_swiglu_limit(m, float("inf"))
        unclamped = R.hf_logits_nocache(m, ids)
    finally:
        _set_swiglu_limit(m, cfg["swiglu_limit"])
    assert rel_err(unclamped, clamped) > 1e-3
    assert rel_err(R.hf_logits(m, ids, [13, 7, 20]), clamped) < REL_TOL


def _routing(model, ids):
    """Per top-k-routed layer: sorted selected expert ids [N, k]."""
    sel = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        if not layer.mlp.is_hash:
            handles.append(
                layer.mlp.gate.register_forward_hook(lambda mod, a, out, i=i: sel.__setitem__(i, out[2].sort(-1).values))
            )
    try:
        logits = R.hf_logits_nocache(model, ids)
    finally:
        for h in handles:
            h.remove()
    return sel, logits


@pytest.mark.parametrize("name", NAMES)
def test_correction_bias_changes_routing(name):
    cfg = R.VARIANTS[name]
    if "moe" not in cfg["mlp_layer_types"]:
        pytest.skip("no top-k routed layer")
    m = model_for(name)
    ids = make_ids(cfg)
    with_bias, logits_b = _routing(m, ids)
    saved = {}
    try:
        for i, layer in enumerate(m.model.layers):
            if not layer.mlp.is_hash:
                saved[i] = layer.mlp.gate.e_score_correction_bias.clone()
                layer.mlp.gate.e_score_correction_bias.zero_()
        no_bias, logits_0 = _routing(m, ids)
    finally:
        for i, b in saved.items():
            m.model.layers[i].mlp.gate.e_score_correction_bias.copy_(b)
    assert set(with_bias) == set(no_bias) == set(saved)
    changed = sum(int((with_bias[i] != no_bias[i]).any(-1).sum()) for i in saved)
    total = sum(with_bias[i].shape[0] for i in saved)
    assert 0 < changed < total, (changed, total)
    assert rel_err(logits_0, logits_b) > 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_hash_routing_uses_tid2eid(name):
    cfg = R.VARIANTS[name]
    if "hash_moe" not in cfg["mlp_layer_types"]:
        pytest.skip("no hash layer")
    m = model_for(name)
    ids = make_ids(cfg)
    i = cfg["mlp_layer_types"].index("hash_moe")
    gate = m.model.layers[i].mlp.gate
    got = {}
    h = gate.register_forward_hook(lambda mod, a, out: got.update(idx=out[2]))
    try:
        R.hf_logits_nocache(m, ids)
    finally:
        h.remove()
    assert torch.equal(got["idx"], gate.tid2eid[ids.reshape(-1)])


@pytest.mark.parametrize("name", NAMES)
def test_indexer_topk_is_sparse_and_tie_free(name):
    """CSA top-k really drops visible entries, and the k-th/(k+1)-th scores are well separated
    (so implementations that differ at rounding level pick the same entries)."""
    cfg = R.VARIANTS[name]
    m = model_for(name)
    ids = make_ids(cfg)
    m_csa = cfg["compress_rates"]["compressed_sparse_attention"]
    k = cfg["index_topk"]
    scores = []
    handles = [
        layer.self_attn.compressor.indexer.scorer.register_forward_hook(lambda mod, a, out: scores.append(out))
        for layer in m.model.layers
        if layer.self_attn.layer_type == "compressed_sparse_attention"
    ]
    try:
        R.hf_logits_nocache(m, ids)
    finally:
        for h in handles:
            h.remove()
    assert scores, "no CSA layer ran its indexer"
    min_gap, sparse_rows = float("inf"), 0
    for s in scores:  # [B, S, n_entries]
        for t in range(s.shape[1]):
            visible = (t + 1) // m_csa
            if visible <= k:
                continue
            sparse_rows += 1
            top = s[:, t, :visible].sort(dim=-1, descending=True).values
            gap = (top[:, k - 1] - top[:, k]) / top.abs().amax(-1).clamp_min(1e-12)
            min_gap = min(min_gap, float(gap.min()))
    assert sparse_rows > 0
    assert min_gap > 1e-5, min_gap


# ---------------------------------------------------------------------------------------------
# Greedy generation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generation(name):
    cfg = R.VARIANTS[name]
    m = model_for(name)
    prompt = make_ids(cfg, length=10, seed=3)
    n_new = 12
    out = R.hf_greedy(m, prompt, n_new)
    assert out.shape == (2, 10 + n_new) and out.dtype == torch.long
    assert torch.equal(out[:, :10], prompt)

    # equals a plain argmax-append loop over no-cache forwards
    seq = prompt
    for _ in range(n_new):
        nxt = R.hf_logits_nocache(m, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)

    # never stops on EOS: make the first generated token of row 0 the model's EOS id
    saved = m.generation_config.eos_token_id, m.config.eos_token_id
    try:
        m.generation_config.eos_token_id = int(out[0, 10])
        m.config.eos_token_id = int(out[0, 10])
        again = R.hf_greedy(m, prompt, n_new)
    finally:
        m.generation_config.eos_token_id, m.config.eos_token_id = saved
    assert torch.equal(again, out)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------
def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                assert key not in tensors, f"{key} stored twice"
                tensors[key] = fh.get_tensor(key)
    return tensors


@pytest.mark.parametrize("shards", [1, 3])
def test_save_checkpoint(tmp_path, shards):
    name = "hc2"
    cfg = R.VARIANTS[name]
    m = model_for(name)
    d = R.save_checkpoint(m, cfg, tmp_path / "ckpt", shards=shards)
    assert d == tmp_path / "ckpt"
    files = sorted(p.name for p in d.iterdir())
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)

    conf = json.loads((d / "config.json").read_text())
    assert conf["architectures"] == ["DeepseekV4ForCausalLM"] and conf["model_type"] == "deepseek_v4"
    assert {k: v for k, v in conf.items() if k not in ("architectures", "model_type")} == json.loads(json.dumps(cfg))

    sd = m.state_dict()
    stored = _read_all(d)
    assert set(stored) == set(sd)
    for key, v in sd.items():
        assert stored[key].dtype == v.dtype and torch.equal(stored[key], v), key

    if shards == 1:
        assert files == ["config.json", "model.safetensors"]
    else:
        shard_files = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
        assert files == sorted(["config.json", "model.safetensors.index.json", *shard_files])
        index = json.loads((d / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(sd)
        assert set(index["weight_map"].values()) == set(shard_files)
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
        for f in shard_files:
            with safe_open(str(d / f), framework="pt") as fh:
                keys = set(fh.keys())
            assert keys and keys == {k for k, v in index["weight_map"].items() if v == f}


def test_checkpoint_reloads_in_hf(tmp_path):
    """The written directory is a valid HF checkpoint: from_pretrained gives identical logits."""
    from transformers import DeepseekV4ForCausalLM

    name = "tiny"
    cfg = R.VARIANTS[name]
    m = model_for(name)
    d = R.save_checkpoint(m, cfg, tmp_path / "ckpt", shards=2)
    re = DeepseekV4ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    for k, v in m.state_dict().items():
        assert torch.equal(re.state_dict()[k], v), k
    ids = make_ids(cfg)
    assert rel_err(R.hf_logits_nocache(re, ids), R.hf_logits_nocache(m, ids)) < 1e-6
