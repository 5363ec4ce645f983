"""V4Config: the three real-world spellings, the layer schedules, HF agreement, round trips, bad input."""
import json
import logging

import pytest
from transformers import DeepseekV4Config

from v4c.errors import ConfigError
from v4c.model.config import CSA, HCA, SLIDING, RopeScaling, V4Config
from v4c.model.presets import (FLASH_HUB_CONFIG, FLASH_OFFICIAL_CONFIG, PRO_HUB_CONFIG, PRO_OFFICIAL_CONFIG,
                               tiny_config_dict)

# HF warns that the tiny YaRN factor differs from max_position/original (harmless; the explicit factor is used)
logging.getLogger("transformers.modeling_rope_utils").setLevel(logging.ERROR)


def hf_dict(d: dict) -> dict:
    """What transformers itself makes of a config dict (its own ``to_dict`` spelling)."""
    return DeepseekV4Config(**json.loads(json.dumps(d))).to_dict()


# -- the real models -------------------------------------------------------------------------------------
@pytest.mark.parametrize("hub,official", [(FLASH_HUB_CONFIG, FLASH_OFFICIAL_CONFIG),
                                          (PRO_HUB_CONFIG, PRO_OFFICIAL_CONFIG)], ids=["flash", "pro"])
def test_three_spellings_agree(hub, official):
    c = V4Config.from_dict(hub)
    assert V4Config.from_dict(official) == c
    assert V4Config.from_dict(hf_dict(hub)) == c
    assert c.rope_scaling == RopeScaling("yarn", 16.0, 65536, 32.0, 1.0)
    assert (c.head_dim, c.rope_head_dim, c.hc_mult, c.sliding_window, c.n_hash_layers) == (512, 64, 4, 128, 3)
    assert c.mlp_layer_types[:4] == ("hash_moe",) * 3 + ("moe",)
    assert (c.rope_theta, c.compress_rope_theta, c.csa_ratio, c.hca_ratio) == (10000.0, 160000.0, 4, 128)
    assert (c.max_position_embeddings, c.vocab_size, c.bos_token_id, c.eos_token_id) == (1048576, 129280, 0, 1)


def test_flash_numbers_and_schedule():
    c = V4Config.from_dict(FLASH_HUB_CONFIG)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank) == (4096, 43, 64, 1024)
    assert (c.o_groups, c.o_lora_rank, c.n_routed_experts, c.num_experts_per_tok) == (8, 1024, 256, 6)
    assert (c.moe_intermediate_size, c.routed_scaling_factor, c.index_topk) == (2048, 1.5, 512)
    assert len(FLASH_HUB_CONFIG["compress_ratios"]) == 44  # trailing MTP entry, dropped
    assert len(c.layer_types) == 43
    assert c.layer_types[:2] == (SLIDING, SLIDING)
    assert [i for i, k in enumerate(c.layer_types) if k == CSA] == list(range(2, 43, 2))   # 21
    assert [i for i, k in enumerate(c.layer_types) if k == HCA] == list(range(3, 43, 2))   # 20
    assert [c.layer_ratio(i) for i in (0, 1, 2, 3, 42)] == [0, 0, 4, 128, 4]


def test_pro_numbers_and_schedule():
    c = V4Config.from_dict(PRO_HUB_CONFIG)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank) == (7168, 61, 128, 1536)
    assert (c.o_groups, c.o_lora_rank, c.n_routed_experts, c.num_experts_per_tok) == (16, 1024, 384, 6)
    assert (c.moe_intermediate_size, c.routed_scaling_factor, c.index_topk) == (3072, 2.5, 1024)
    assert len(PRO_HUB_CONFIG["compress_ratios"]) == 62
    assert SLIDING not in c.layer_types
    assert [i for i, k in enumerate(c.layer_types) if k == CSA] == list(range(2, 61, 2))            # 30
    assert [i for i, k in enumerate(c.layer_types) if k == HCA] == [0, 1] + list(range(3, 61, 2))   # 31


def test_default_schedule_is_the_real_pro_pattern_not_hfs_shifted_one():
    d = {k: v for k, v in PRO_HUB_CONFIG.items() if k != "compress_ratios"}
    c = V4Config.from_dict(d)
    assert c.layer_types == V4Config.from_dict(PRO_HUB_CONFIG).layer_types
    assert c.layer_types[:5] == (HCA, HCA, CSA, HCA, CSA)
    assert tuple(DeepseekV4Config(num_hidden_layers=61).layer_types) != c.layer_types  # HF: [HCA, HCA, HCA, CSA, ...]
    assert V4Config.from_dict({"num_hidden_layers": 3}).mlp_layer_types == ("hash_moe",) * 3
    assert V4Config.from_dict({"num_hidden_layers": 2}).layer_types == (HCA, HCA)


# -- Hugging Face's own spelling -----------------------------------------------------------------------
def test_hf_to_dict_of_tiny_equals_tiny():
    tiny = tiny_config_dict()
    c = V4Config.from_dict(tiny)
    assert V4Config.from_dict(DeepseekV4Config(**tiny).to_dict()) == c  # nested rope_parameters
    assert c.rope_scaling == RopeScaling("yarn", 16.0, 64, 32.0, 1.0)
    assert (c.rope_head_dim, c.csa_ratio, c.hca_ratio, c.n_hash_layers) == (16, 4, 16, 1)
    assert c.layer_types == (SLIDING, CSA, HCA, CSA)
    assert [c.layer_ratio(i) for i in range(4)] == [0, 4, 16, 4]


def test_plain_rope_and_hf_legacy_kwargs():
    c = V4Config.from_dict(tiny_config_dict(rope_parameters=None))
    assert c.rope_scaling is None
    assert V4Config.from_dict(hf_dict(tiny_config_dict(rope_parameters=None))) == c
    legacy = tiny_config_dict(compress_rates=None, compress_rate_csa=4, compress_rate_hca=16,
                              partial_rotary_factor=None, qk_rope_head_dim=16)
    assert V4Config.from_dict(legacy) == V4Config.from_dict(tiny_config_dict())


def test_mscale_keys_are_ignored_and_official_yarn_switch():
    hub = dict(FLASH_HUB_CONFIG, rope_scaling={**FLASH_HUB_CONFIG["rope_scaling"], "mscale": 1.0, "mscale_all_dim": 1.0})
    assert V4Config.from_dict(hub) == V4Config.from_dict(FLASH_HUB_CONFIG)
    off = V4Config.from_dict(dict(FLASH_OFFICIAL_CONFIG, original_seq_len=0))  # official: YaRN off
    assert off.rope_scaling is None


def test_compress_ratios_without_compress_rates_infer_the_hca_ratio():
    c = V4Config.from_dict(tiny_config_dict(layer_types=None, compress_rates=None, compress_ratios=[0, 4, 16, 4, 0]))
    assert c == V4Config.from_dict(tiny_config_dict())
    # explicit layer_types win over compress_ratios
    c2 = V4Config.from_dict(tiny_config_dict(compress_ratios=[4, 4, 4, 4]))
    assert c2.layer_types == (SLIDING, CSA, HCA, CSA)


def test_hash_layer_counts():
    assert V4Config.from_dict(tiny_config_dict(mlp_layer_types=None, num_hash_layers=2)).n_hash_layers == 2
    assert V4Config.from_dict(tiny_config_dict(mlp_layer_types=None, n_hash_layers=0)).n_hash_layers == 0
    assert V4Config.from_dict(tiny_config_dict(mlp_layer_types=None)).n_hash_layers == 3


# -- round trips ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("d", [FLASH_HUB_CONFIG, PRO_OFFICIAL_CONFIG, tiny_config_dict(),
                               tiny_config_dict(rope_parameters=None, eos_token_id=None)],
                         ids=["flash", "pro", "tiny", "tiny-plain"])
def test_round_trip(d, tmp_path):
    c = V4Config.from_dict(d)
    out = c.to_dict()
    assert V4Config.from_dict(out) == c
    (tmp_path / "config.json").write_text(json.dumps(out))
    assert V4Config.from_json_file(tmp_path / "config.json") == c
    assert V4Config.from_dict(hf_dict(out)) == c  # transformers accepts the canonical dict too


def test_replace_revalidates():
    c = V4Config.from_dict(tiny_config_dict())
    assert c.replace(index_topk=8).index_topk == 8
    assert c.replace(layer_types=[CSA] * 4).layer_types == (CSA,) * 4
    with pytest.raises(ConfigError, match="o_groups"):
        c.replace(o_groups=3)
    with pytest.raises(ConfigError, match="no_such_field"):
        c.replace(no_such_field=1)


# -- bad input -------------------------------------------------------------------------------------------
_SWA4 = [SLIDING] * 4


@pytest.mark.parametrize("override,match", [
    ({"o_groups": 3}, r"o_groups: num_attention_heads\*head_dim=512 is not divisible by o_groups=3"),
    ({"index_topk": 0}, "index_topk"),
    ({"layer_types": [SLIDING, "mystery_attention", SLIDING, SLIDING]}, r"layer_types\[1\].*mystery_attention"),
    ({"layer_types": _SWA4 + [SLIDING]}, "layer_types: 5 entries"),
    ({"mlp_layer_types": ["moe"] * 3}, "mlp_layer_types: 3 entries"),
    ({"mlp_layer_types": ["moe", "dense", "moe", "moe"]}, r"mlp_layer_types\[1\].*dense"),
    ({"layer_types": None, "compress_ratios": [0, 4, 16]}, "compress_ratios: 3 entries"),
    ({"layer_types": None, "compress_ratios": [0, 4, 16, 8]}, "compress_ratios"),
    ({"layer_types": None, "compress_ratios": [0, 4, 32, 4]}, r"compress_ratios\[2\]"),
    ({"partial_rotary_factor": 15 / 64}, "rope_head_dim: must be even"),
    ({"partial_rotary_factor": 2.0}, "rope_head_dim: 128 exceeds head_dim"),
    ({"index_head_dim": 8}, "rope_head_dim: 16 exceeds index_head_dim"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"hc_mult": 0}, "hc_mult"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"compress_rates": {CSA: 1, HCA: 16}}, "csa_ratio"),
    ({"compress_rates": {CSA: 4, HCA: 1}}, "hca_ratio"),
    ({"scoring_func": "sigmoid"}, "scoring_func"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_parameters.type"),
    ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.type"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 16.0}}, "original_max_position_embeddings"),
    ({"rope_parameters": {**tiny_config_dict()["rope_parameters"], "attention_factor": 1.2}}, "attention_factor"),
    ({"hidden_size": "256"}, "hidden_size: expected an integer"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob"),
    ({"rope_theta": "big"}, "rope_theta"),
    ({"swiglu_limit": 0.0}, "swiglu_limit"),
    ({"vocab_size": -1}, "vocab_size"),
    ({"model_type": "deepseek_v3"}, "model_type"),
    ({"num_key_value_heads": 8}, "num_key_value_heads"),
    ({"hidden_size": 256, "dim": 512}, "hidden_size: conflicting"),
    ({"qk_rope_head_dim": 32}, "rope_head_dim: conflicting"),
    ({"eos_token_id": [1, 2]}, "eos_token_id"),
])
def test_bad_config_names_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        V4Config.from_dict(tiny_config_dict(**override))


def test_bad_files_and_shapes(tmp_path):
    with pytest.raises(ConfigError, match="config: expected a JSON object"):
        V4Config.from_dict([1, 2])
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        V4Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(tiny_config_dict(o_groups=3)))
    with pytest.raises(ConfigError, match="config.json: o_groups"):
        V4Config.from_json_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="cannot read"):
        V4Config.from_json_file(tmp_path / "absent.json")
    short = dict(FLASH_HUB_CONFIG, compress_ratios=FLASH_HUB_CONFIG["compress_ratios"][:42])
    with pytest.raises(ConfigError, match="compress_ratios: 42 entries but num_hidden_layers=43"):
        V4Config.from_dict(short)
    with pytest.raises(ConfigError, match="rope_scaling.type"):
        RopeScaling("ntk", 2.0, 4096)
    with pytest.raises(ConfigError, match="rope_parameters.main"):
        V4Config.from_dict(hf_dict(tiny_config_dict()) | {"rope_parameters": {
            "main": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64},
            "compress": {"rope_type": "default"}}})
