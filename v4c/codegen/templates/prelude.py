"""Host-side helpers every kernel family shares. A template imports them with the line
``from .prelude import ...  # v4c: inline prelude``; when the template is rendered into an
artifact, ``v4c.codegen.emit`` replaces that line with this file's body, so the rendered
module stays self-contained (torch + triton only)."""
import math
import os

import torch


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(op, meta, reason):
    if reason:
        raise ValueError(f"{op}: meta {meta} cannot run: {reason}")


_INV_FREQ = {}


def _rope_inv_freq(rope_dim: int, theta: float, yarn, device) -> torch.Tensor:
    """Per-pair RoPE inverse frequencies (YaRN when ``yarn`` = (factor, original_len, beta_fast,
    beta_slow)), computed exactly as the IR reference's ``rope_inv_freq``; cached per device.
    ``rope_dim == 0`` gives a single zero (no rotation)."""
    key = (rope_dim, float(theta), tuple(yarn) if yarn else None, str(device))
    if key not in _INV_FREQ:
        if rope_dim == 0:
            _INV_FREQ[key] = torch.zeros(1, dtype=torch.float32, device=device)
            return _INV_FREQ[key]
        inv = 1.0 / (theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float32) / rope_dim))
        if yarn:
            factor, orig, beta_fast, beta_slow = yarn

            def corr(rot):  # the pair whose wavelength makes `rot` turns over `orig` tokens
                return rope_dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

            low = max(math.floor(corr(beta_fast)), 0)
            high = min(math.ceil(corr(beta_slow)), rope_dim - 1)
            if low == high:
                high += 0.001
            ramp = ((torch.arange(rope_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
            inv = inv / factor * ramp + inv * (1 - ramp)
        _INV_FREQ[key] = inv.to(device)
    return _INV_FREQ[key]
