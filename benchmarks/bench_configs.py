"""The model configurations the CPU benchmarks measure: named presets, or a JSON file of config fields.

Every preset is a random-weight V4 in V4-Flash's layer pattern (2 sliding layers, then CSA and HCA
alternating; 3 hash-routed MoE layers first), in transformers' config spelling. A JSON file names
config fields (the same spelling); the fields it leaves out come from the ``478m`` preset, so a file
can hold just what differs (``{"hidden_size": 512, "n_routed_experts": 32}``).
"""
from __future__ import annotations

import json
from pathlib import Path

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"
_LAYERS = [SWA, SWA, CSA, HCA, CSA, HCA, CSA, HCA]

# the 478M-parameter model the README's table is measured on (hidden 1024, 64 experts top-6)
BASE = dict(vocab_size=16384, hidden_size=1024, moe_intermediate_size=256, num_hidden_layers=8,
            num_attention_heads=16, head_dim=128, q_lora_rank=512, partial_rotary_factor=0.5, o_groups=4,
            o_lora_rank=256, n_routed_experts=64, num_experts_per_tok=6, index_n_heads=16, index_head_dim=128,
            index_topk=256, sliding_window=128, compress_rates={CSA: 4, HCA: 128}, layer_types=_LAYERS,
            mlp_layer_types=["hash_moe"] * 3 + ["moe"] * 5, max_position_embeddings=131072,
            rope_parameters={"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 8192,
                             "beta_fast": 32, "beta_slow": 1})

# each preset: what it changes in BASE, and one line for --help
PRESETS = {
    "478m": ({}, "hidden 1024, 8 layers, 64 experts top-6, 16 heads of 128, window 128, vocab 16384"),
    "h512-e32": (dict(hidden_size=512, q_lora_rank=256, o_lora_rank=128, n_routed_experts=32, num_attention_heads=8,
                      head_dim=128, vocab_size=4096),
                 "hidden 512, 8 layers, 32 experts top-6, 8 heads of 128, window 128, compress 4/128, vocab 4096"),
    "h64x16-w64": (dict(num_attention_heads=16, head_dim=64, sliding_window=64),
                   "the 478m model with 16 heads of 64 and a window of 64"),
    # the same pattern of model, small enough for a smoke run (--quick without --config)
    "quick": (dict(vocab_size=2048, hidden_size=256, num_attention_heads=4, head_dim=64, q_lora_rank=128,
                   o_lora_rank=64, n_routed_experts=16, moe_intermediate_size=64, index_n_heads=4, index_head_dim=64,
                   index_topk=32, sliding_window=32, compress_rates={CSA: 4, HCA: 32}),
              "a small model of the same pattern (the smoke run's)"),
}


def describe() -> str:
    return "; ".join(f"{name}: {line}" for name, (_, line) in PRESETS.items())


def load_config(spec: str) -> tuple[str, dict]:
    """(name, config dict in HF spelling) for a preset name or a JSON file of config fields."""
    from v4c.model.presets import tiny_config_dict
    if spec in PRESETS:
        return spec, tiny_config_dict(**{**BASE, **PRESETS[spec][0]})
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--config {spec!r} is neither a preset ({', '.join(PRESETS)}) nor a JSON file")
    try:
        fields = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--config {spec}: not readable as JSON ({e})") from None
    if not isinstance(fields, dict):
        raise SystemExit(f"--config {spec}: expected a JSON object of config fields, got {type(fields).__name__}")
    return path.stem, tiny_config_dict(**{**BASE, **fields})


def artifact(cfg: dict, work: Path, dtype: str) -> Path:
    """The compiled artifact of ``cfg`` in ``dtype`` under ``work/dtype/`` (its random checkpoint beside it),
    written and compiled unless a previous run left them there for the same config."""
    import shutil

    import v4c
    from v4c.model.random_weights import write_random_checkpoint
    ckpt, art = work / dtype / "ckpt", work / dtype / "art"
    if not (ckpt / "model.safetensors").exists() or json.loads((ckpt / "config.json").read_text()) != cfg:
        write_random_checkpoint(cfg, ckpt, seed=0, dtype=dtype)
        shutil.rmtree(art, ignore_errors=True)
    if not art.exists():
        v4c.compile(ckpt, art, target="cpu", dtype=dtype, weights="reference")
    return art
