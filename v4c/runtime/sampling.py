"""Token sampling: greedy, temperature and nucleus (top-p), reproducible with a seed."""
from __future__ import annotations

import math

import torch


def _real(name: str, v) -> float:
    if isinstance(v, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {v!r}") from None


def check_sampling(temperature, top_p) -> tuple[float, float]:
    """``(temperature, top_p)`` as floats, or a ValueError naming the bad one (NaN and inf included:
    NaN passes every comparison's negation, so a plain ``< 0`` check lets it through)."""
    t, p = _real("temperature", temperature), _real("top_p", top_p)
    if not (math.isfinite(t) and t >= 0.0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature!r}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    return t, p


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V]; ``temperature == 0`` is greedy (argmax)."""
    temperature, top_p = check_sampling(temperature, top_p)
    logits = logits.float()
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits / temperature
    if bool(torch.isinf(scaled).any()):  # a tiny temperature: softmax would meet inf - inf = NaN
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # the maximum at 0, the rest -inf
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
