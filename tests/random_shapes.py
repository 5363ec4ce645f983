"""Random small V4 model shapes for the differential tests (``test_cpu_random_configs.py``,
``test_against_hf.py``): the ones the fixed test models never have (one attention head, head dims such as 24
or 80, hidden 200 or 1,024, one or five mHC streams, 5 to 256 experts, windows of 1 to 32)."""
import random

from v4c.model.presets import tiny_config_dict

CSA, HCA = "compressed_sparse_attention", "heavily_compressed_attention"


def random_config(rng: random.Random) -> dict:
    """A valid V4 config (HF spelling) of random small shapes, drawn from ``rng``."""
    heads, hd = rng.choice([1, 2, 3, 4, 8, 16]), rng.choice([16, 24, 32, 48, 64, 80, 128])
    ihd = rng.choice([32, 64])
    rope = rng.choice([d for d in (8, 16, 32) if d <= min(hd, ihd)])  # (the indexer rotates its heads too)
    experts = rng.choice([4, 5, 8, 16, 33, 64, 256])
    layers = rng.randint(2, 5)
    return tiny_config_dict(
        vocab_size=rng.choice([256, 1000]), hidden_size=rng.choice([64, 96, 128, 200, 256, 320, 1024]),
        moe_intermediate_size=rng.choice([32, 48, 64, 100, 128]), num_hidden_layers=layers,
        num_attention_heads=heads, head_dim=hd, q_lora_rank=rng.choice([32, 64, 96]), partial_rotary_factor=rope / hd,
        o_groups=rng.choice([g for g in (1, 2, 4) if heads * hd % g == 0]), o_lora_rank=rng.choice([16, 32, 48]),
        n_routed_experts=experts, num_experts_per_tok=rng.randint(1, min(6, experts)),
        index_n_heads=rng.choice([8, 16]), index_head_dim=ihd, index_topk=rng.choice([1, 3, 4, 16]),
        sliding_window=rng.choice([1, 4, 8, 13, 32]),
        compress_rates={CSA: rng.choice([2, 4]), HCA: rng.choice([8, 16, 32])},
        layer_types=[rng.choice(["sliding_attention", CSA, HCA]) for _ in range(layers)],
        mlp_layer_types=[rng.choice(["hash_moe", "moe"]) for _ in range(layers)], hc_mult=rng.choice([1, 2, 4, 5]))
