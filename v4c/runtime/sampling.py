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
    probs = distribution(logits, temperature, top_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


def distribution(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """The probabilities ``sample`` draws from (temperature > 0): softmax of ``logits / temperature`` [..., V]
    in float32, cut to the top-``top_p`` nucleus and renormalised by the draw."""
    logits = logits.float()
    scaled = logits / temperature
    if bool(torch.isinf(scaled).any()):  # a tiny temperature: softmax would meet inf - inf = NaN
        scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature  # the maximum at 0, the rest -inf
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of strictly more likely tokens
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return probs


def sample_rows(logits: torch.Tensor, temperatures, top_ps, generators) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V], each row with its own ``temperatures[b]``,
    ``top_ps[b]`` and ``generators[b]`` (a ``torch.Generator`` or None: the global one).

    A greedy row (temperature 0) is the exact argmax of its logits, consuming nothing from any
    generator; a sampled row gives exactly what ``sample(logits[b:b+1], temperatures[b], top_ps[b],
    generators[b])`` gives and draws only from its own generator, so a row's token does not depend
    on the other rows of the batch (what a server batching unrelated requests needs for a seeded
    request to be reproducible). Returns int64 [B] on the logits' device."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a tensor [batch, vocab], got shape {tuple(getattr(logits, 'shape', ()))}")
    b = logits.shape[0]
    temperatures, top_ps, generators = list(temperatures), list(top_ps), list(generators)
    for name, values in (("temperatures", temperatures), ("top_ps", top_ps), ("generators", generators)):
        if len(values) != b:
            raise ValueError(f"{name} must hold one value per row ({b}), got {len(values)}")
    checked = [check_sampling(t, p) for t, p in zip(temperatures, top_ps)]
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    greedy = [i for i, (t, _) in enumerate(checked) if t == 0.0]
    if greedy:  # one argmax for every greedy row: per row it is the same exact argmax
        idx = torch.tensor(greedy, dtype=torch.int64, device=logits.device)
        out[idx] = logits.index_select(0, idx).float().argmax(dim=-1)
    for i, (t, p) in enumerate(checked):
        if t != 0.0:  # one row at a time: exactly the single-row computation and its generator draws
            out[i] = sample(logits[i:i + 1], t, p, generators[i])[0]
    return out


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: int = 0
                   ) -> list[tuple[float, list[tuple[int, float]]]]:
    """Per row of ``logits`` [B, V]: the log-probability of ``tokens[b]`` under the model's own
    distribution (log-softmax of the raw logits: before temperature and top-p, as vLLM and the
    OpenAI API report them) and the ``top`` most likely tokens with theirs, most likely first."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens.to(lp.device, torch.int64).reshape(-1, 1))[:, 0].tolist()
    if top > 0:
        vals, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
        alts = [list(zip(i, v)) for i, v in zip(ids.tolist(), vals.tolist())]
    else:
        alts = [[] for _ in chosen]
    return list(zip(chosen, alts))
