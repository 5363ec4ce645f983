"""A DeepSeek-V3.2-style cache, the baseline V4's cache savings are quoted against (spec D.1).

V3.2 keeps, per layer and token, one MLA latent row (512 latent + 64 RoPE dims) and one
indexer key (128 dims); production stores the row in FlashMLA's FP8 layout (512 e4m3 +
4 fp32 scales + 64 bf16 RoPE = 656 B) and the key in FP8 with an fp32 scale (132 B).
"""
from __future__ import annotations

V32_LAYERS = 61
# fp32: the unquantised layout, the baseline for models whose own cache is kept in fp32
ROW_BYTES = {"fp8": 656, "bf16": 1152, "fp32": 2304}
KEY_BYTES = {"fp8": 132, "bf16": 256, "fp32": 512}


def v32_bytes_per_token(kv: str = "fp8", layers: int = V32_LAYERS) -> int:
    return layers * (ROW_BYTES[kv] + KEY_BYTES[kv])
