"""Speculative decoding with the MTP block: draft k tokens, verify them in one forward of the main model,
keep what the main model agrees with, take the rest back.

One step, per row (rows accept independently; a finished row is padding in every call):

1. **Draft.** The MTP block first appends the entries the last step made known (the main model's streams
   at the accepted positions, each with the token after it), whose last logits give draft 1; drafts
   2..k chain the block on its own streams (as the serving engines chain their one MTP layer). The
   chained entries are taken back at once: the next step appends them again from the main model's
   streams.
2. **Verify.** The main model appends ``[x, d_1 .. d_k]`` (``x``: the last token, sampled but not yet
   appended) in one call of k + 1 tokens, after a ``RewindPoint``.
3. **Accept.** Greedy: the longest prefix of drafts equal to the main model's argmax, then its argmax
   after them. Sampling (temperature > 0): draft ``d_j`` drawn from ``q_j`` is kept with probability
   ``min(1, p_j(d_j) / q_j(d_j))``; at the first refusal the token is drawn from ``max(0, p_j - q_j)``
   renormalised, after k kept drafts from ``p_{k+1}``: every token is then distributed as plain
   sampling's (Leviathan et al., 2023). ``p`` and ``q`` are the temperature / top-p distributions
   ``sampling.distribution`` gives.
4. **Rewind.** The session keeps ``x`` and the accepted drafts; every state slot the others wrote gets
   its earlier value back (``rewind.py``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable

import torch

from .rewind import RewindPoint
from .sampling import distribution, sample

METHODS = ("mtp",)
MAX_DRAFT = 3  # the draft lengths the engines run (vLLM 2, SGLang 3): the rewind covers any ring >= k + 1


@dataclass
class AcceptanceStats:
    """How many drafts each row's steps kept: ``histogram[a]`` counts row-steps that accepted ``a`` of the k
    drafts (each step also gives the main model's own next token)."""
    draft_tokens: int
    histogram: list[int] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(self.histogram)

    @property
    def mean_accepted(self) -> float:
        return sum(a * n for a, n in enumerate(self.histogram)) / self.steps if self.steps else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Tokens one verify step gives a row: the accepted drafts and one more (the "acceptance length")."""
        return self.mean_accepted + 1.0 if self.steps else 0.0

    def as_dict(self) -> dict:
        return {"draft_tokens": self.draft_tokens, "steps": self.steps, "histogram": list(self.histogram),
                "mean_accepted": self.mean_accepted, "tokens_per_step": self.tokens_per_step}

    def summary(self) -> str:
        return (f"speculative mtp, {self.draft_tokens} draft tokens: {self.steps} verify steps, accepted drafts per "
                f"step {self.mean_accepted:.2f} (histogram " + " ".join(f"{a}:{n}" for a, n in enumerate(self.histogram))
                + f"), {self.tokens_per_step:.2f} tokens per step")


@dataclass
class SpeculativeOutput:
    """What ``Model.generate(..., speculative=...)`` returns: the tokens [B, T + N] (with ``lengths``, row
    b's prompt, then its N new tokens, then zeros) and the acceptance statistics."""
    tokens: torch.Tensor
    stats: AcceptanceStats


class MTPDrafter:
    """Drafts with the model's MTP block, chaining it for drafts 2..k."""

    def __init__(self, model, batch_size: int, max_context: int):
        self.block = model.mtp
        self.state = self.block.new_state(batch_size, max_context)
        self.pending = None  # (streams [B, T, n, D], next tokens [B, T], counts [B]) not yet appended

    def feed(self, hidden: torch.Tensor, ids: torch.Tensor, counts: torch.Tensor) -> None:
        """Entries known since the last draft: the main model's streams at the positions it kept, each with
        the token that follows it (row b: its first ``counts[b]``)."""
        self.pending = (hidden, ids, counts)

    def draft(self, k: int, temperature: float, top_p: float, gen, active: torch.Tensor):
        """k drafts per row [B, k] and, when sampling, the distributions they were drawn from [B, k, V]."""
        hidden, ids, counts = self.pending
        counts = counts * active
        logits, stream = self.state.forward(ids, hidden, counts)
        rows = torch.arange(ids.shape[0], device=logits.device)
        last = (counts - 1).clamp(min=0).to(logits.device)
        logits, stream = logits[rows, last], stream[rows, last][:, None]
        tokens, dists = [], []
        chain = RewindPoint.take(self.state.states, self.block.layouts, self.state.lengths, active * (k - 1)) \
            if k > 1 else None
        for j in range(k):
            tok, q = _pick(logits, temperature, top_p, gen)
            tokens.append(tok)
            dists.append(q)
            if j + 1 < k:
                logits, stream = self.state.forward(tok[:, None], stream, active)
                logits = logits[:, 0]
        if chain is not None:  # the chained entries are taken back: the next step appends the main model's
            self.state.lengths.copy_(chain.restore(self.state.states, torch.zeros_like(active)))
        return torch.stack(tokens, 1), (torch.stack(dists, 1) if temperature > 0 else None)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen):
    if temperature == 0.0:
        return logits.argmax(dim=-1), None
    q = distribution(logits, temperature, top_p)
    q = q / q.sum(-1, keepdim=True)
    return torch.multinomial(q.cpu(), 1, generator=gen)[:, 0].to(logits.device), q


def accept(logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, temperature: float, top_p: float,
           gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted drafts per row [B], the token after them [B]) from the verify call's logits [B, k + 1, V],
    the drafts [B, k] and, when sampling, the distributions they were drawn from [B, k, V]."""
    b, k = drafts.shape
    rows = torch.arange(b, device=logits.device)
    if temperature == 0.0:
        target = logits.argmax(-1)  # [B, k + 1]
        a = (drafts == target[:, :k]).long().cumprod(1).sum(1)
        return a, target[rows, a]
    p = distribution(logits, temperature, top_p)
    p = p / p.sum(-1, keepdim=True)
    pd = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    qd = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(b, k, generator=gen).to(logits.device)
    a = (u * qd < pd).long().cumprod(1).sum(1)  # u < p/q, without dividing by a q that rounds to 0
    at = a.clamp(max=k - 1)
    residual = (p[rows, at] - q[rows, at]).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[rows, at])  # p == q: never refused
    final = torch.where((a == k)[:, None], p[:, k], residual)
    nxt = torch.multinomial((final / final.sum(-1, keepdim=True)).cpu(), 1, generator=gen)[:, 0]
    return a, nxt.to(logits.device)


def window_problem(model, k: int) -> str | None:
    """Why ``k`` drafts a step cannot run on this model, or None: a verify step appends k + 1 tokens to every
    sliding-window ring, and taking the rejected ones back needs the slots they overwrote (``rewind.py``)."""
    w = getattr(getattr(model, "config", None), "sliding_window", None)
    if not isinstance(w, int) or w >= k + 1:
        return None
    fix = f"draft_tokens <= {w - 1}" if w >= 2 else "decode without speculative decoding"
    return (f"draft_tokens={k} needs a sliding window of at least {k + 1} tokens (a verify step appends k + 1 to "
            f"each window ring, and taking rejected ones back needs the slots they overwrote); this model's window "
            f"is {w}: use {fix}")


def _check(model, method, k, lengths, ids, need_mtp: bool) -> torch.Tensor | None:
    if method is None:
        raise ValueError("lengths= is taken with speculative decoding only (speculative='mtp')")
    if method not in METHODS:
        raise ValueError(f"speculative must be one of {', '.join(METHODS)} or None, got {method!r}")
    if need_mtp and model.mtp is None:
        why = f" ({model.mtp_note})" if model.mtp_note else ""
        raise ValueError(f"{model.path}: speculative='mtp' needs the MTP block, which this artifact does not have{why}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= MAX_DRAFT:
        raise ValueError(f"draft_tokens must be an integer from 1 to {MAX_DRAFT}, got {k!r}")
    problem = window_problem(model, k)
    if problem:  # (before the prefill: found on the first verify step, it would have cost the prompt's compute)
        raise ValueError(problem)
    if lengths is None:
        return None
    n = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1)
    if n.shape[0] != ids.shape[0] or bool((n < 1).any()) or bool((n > ids.shape[1]).any()):
        raise ValueError(f"lengths must hold {ids.shape[0]} values in 1..{ids.shape[1]}, got {n.tolist()}")
    return n


@torch.inference_mode()
def generate_speculative(model, ids: torch.Tensor, max_new_tokens: int, method: str | None, k: int,
                         temperature: float, top_p: float, gen, on_token: Callable | None = None, lengths=None,
                         drafter=None) -> SpeculativeOutput:
    """``Model.generate(..., speculative=method, draft_tokens=k)`` (arguments already checked there).
    ``drafter``: another source of drafts with ``MTPDrafter``'s ``feed`` / ``draft`` (tests)."""
    n = _check(model, method, k, lengths, ids, need_mtp=drafter is None)
    b, t = ids.shape
    prompt = torch.full((b,), t, dtype=torch.int64) if n is None else n
    ctx = int(prompt.max()) + max_new_tokens + k + 1  # a verify step may append k + 1 past the last token
    session = model.new_session(b, max_context=ctx)
    drafter = drafter or MTPDrafter(model, b, ctx)
    stats = AcceptanceStats(k, [0] * (k + 1))
    out = [[] for _ in range(b)]
    emitted = [0]

    def emit():  # on_token gets column i once every row has its i-th token
        ready = min(len(r) for r in out)
        for i in range(emitted[0], ready):
            on_token(torch.tensor([r[i] for r in out]))
        emitted[0] = ready

    rows = torch.arange(b)
    if max_new_tokens > 0:
        ids = ids.cpu().long()
        logits = session.forward(ids, lengths=n, logits="last")  # each row's token prompt - 1
        x = sample(logits[:, 0], temperature, top_p, gen).cpu()
        for r in range(b):
            out[r].append(int(x[r]))
        if on_token is not None:
            emit()
        nxt = torch.cat([ids[:, 1:], torch.zeros(b, 1, dtype=torch.int64)], 1)
        nxt[rows, prompt - 1] = x  # entry p of the MTP sequence reads the token at p + 1
        drafter.feed(session.stream, nxt, prompt)
    while True:
        active = torch.tensor([len(r) < max_new_tokens for r in out], dtype=torch.int64)
        if not bool(active.any()):
            break
        drafts, q = drafter.draft(k, temperature, top_p, gen, active)
        drafts = drafts.cpu()
        point = session.rewind_point(active * (k + 1))
        logits = session.forward(torch.cat([x[:, None], drafts], 1),
                                 lengths=None if bool(active.all()) else active * (k + 1))
        a, y = accept(logits, drafts.to(logits.device), q, temperature, top_p, gen)
        a, y = a.cpu(), y.cpu()
        keep = (a + 1) * active
        session.rewind(point, keep)
        new = torch.cat([drafts, torch.zeros(b, 1, dtype=torch.int64)], 1)
        new[rows, a] = y  # the entries' next tokens: the accepted drafts, then the main model's own token
        for r in range(b):
            if active[r]:
                stats.histogram[int(a[r])] += 1
                out[r].extend(new[r, :int(a[r]) + 1].tolist()[:max_new_tokens - len(out[r])])
        if on_token is not None:
            emit()
        drafter.feed(session.stream, new, keep)
        x = y
    tokens = torch.zeros(b, t + max_new_tokens, dtype=torch.int64)
    tokens[:, :t] = ids.cpu()
    for r in range(b):
        p = int(prompt[r])
        tokens[r, p:] = 0
        tokens[r, p:p + max_new_tokens] = torch.tensor(out[r], dtype=torch.int64)
    return SpeculativeOutput(tokens, stats)
