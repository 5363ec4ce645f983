"""Attention, ring append and indexer for calls of a few tokens (decode steps).

A decode query sees at most the ``W`` ring rows, the call's own tokens and its compressed rows
(CSA: its top-k, gathered; HCA: the complete rows). With a handful of queries everything fits in
one key set per query (or per sequence, where the queries share their keys), so each op is a
fixed, short sequence of batched ATen calls: one GEMM for the scores, one mask fill, one softmax
with the sink as an extra logit, one GEMM for the output; no blocks, no host syncs beyond the
call's position bounds, which every op of the call shares (``positions``).
"""
from __future__ import annotations

import torch

from ...graph.storage import PLAIN, decode, encode, round_trip
from .. import DECODE_TOKENS
from . import native
from .positions import values

TOKENS = DECODE_TOKENS  # calls with at most this many tokens (batch x length) take these paths
_STEPS: dict = {}  # (step, device) -> [0, step, 2 step, ...], grown on demand
_CACHE: dict = {}  # small constant tensors, by what they are and their device


def _steps(n: int, step: int, device) -> torch.Tensor:
    """``arange(n) * step``, cached: row offsets and window ends cost no op per call."""
    t = _STEPS.get((step, device))
    if t is None or t.shape[0] < n:
        t = _STEPS[(step, device)] = torch.arange(max(n, 2 * t.shape[0] if t is not None else 1024),
                                                  device=device) * step
    return t[:n]


def _ends(n: int, ratio: int, device) -> torch.Tensor:
    """Position of the last token of compressed rows ``0..n-1``: row c is visible from there on."""
    return _steps(n + 1, ratio, device)[1:] - 1


def _cached(key, make):
    t = _CACHE.get(key)
    if t is None:
        t = _CACHE[key] = make()
    return t


def attend(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale,
           kv_format=None, kv_rope_dim=0, hi: int):
    """The ``attention`` op for a few queries (``hi``: the call's largest position)."""
    b, t, h, d = q.shape
    dev = q.device
    plain = kv_format is None or kv_format in PLAIN
    # plain formats are joined as stored and widened to fp32 once; others are decoded part by part
    load = (lambda x: x) if plain else (lambda x: decode(x, kv_format, d, kv_rope_dim))
    now = round_trip(kv, kv_format, kv_rope_dim)  # as the cache will hold them
    # key at kpos is visible from query qpos iff max(qpos - W, -1) < kpos <= qpos (empty slots: -1)
    kpos = torch.cat([ring_pos, pos], dim=1)[:, None]
    if b * t == 1:
        qp = hi
        hidden = (kpos <= max(qp - window, -1)) | (kpos > qp)
    else:
        qp = pos[:, :, None]
        hidden = (kpos <= (qp - window).clamp_min_(-1)) | (kpos > qp)
    # the sink: one more key, zero, whose logit is set to the sink (its value row adds nothing)
    zdt = ring.dtype if plain else torch.float32
    zero = _cached(("zero", d, zdt, dev), lambda: torch.zeros(1, 1, 1, d, dtype=zdt, device=dev))
    per_query = kind == "csa"  # each query has its own rows: keys [B * t, S, D]
    if per_query:
        w = ring.shape[1]
        chosen = rows[_steps(b, 1, dev)[:, None, None], idx]  # idx -1 reads the last row, hidden below
        keys = torch.cat([load(ring)[:, None].expand(b, t, w, -1), now[:, None].expand(b, t, t, d), load(chosen),
                          zero.expand(b, t, 1, d)], dim=2).view(b * t, -1, d)
        hidden = torch.cat([hidden, idx < 0], dim=2)
    elif kind == "hca":  # only rows complete at the call's last query can be visible
        n = max(0, (hi + 1) // ratio)
        keys = torch.cat([load(ring), now, load(rows[:, :n]), zero[0].expand(b, 1, d)], dim=1)
        hidden = torch.cat([hidden, _ends(n, ratio, dev).view(1, 1, n) > qp], dim=2)
    else:
        keys = torch.cat([load(ring), now, zero[0].expand(b, 1, d)], dim=1)
    keys = keys.float()
    s = keys.shape[1]
    lead = (b * t, h) if per_query else (b, t * h)
    nought = _cached(("nought", dev), lambda: torch.zeros(1, device=dev))  # ignored: beta=0 only scales
    scores = torch.baddbmm(nought, q.float().view(*lead, d), keys.transpose(1, 2), beta=0.0, alpha=scale)
    scores = scores.view(b, t, h, s)
    scores[..., :-1].masked_fill_(hidden[:, :, None], float("-inf"))
    scores.select(-1, s - 1).copy_(sinks.view(1, 1, h))
    out = torch.bmm(torch.softmax(scores, dim=-1).view(*lead, s), keys)
    return out.view(b, t, h, d).to(q.dtype)


def window_append(ring, ring_pos, kv, pos, *, kv_format=None, kv_rope_dim=0):
    """The ``window_append`` op for a call without padding of at most ``W`` tokens per row: every
    token lands in its own slot ``pos % W``, all rows at once (rows at the same positions: as one slice)."""
    b, w = ring.shape[0], ring.shape[1]
    t = pos.shape[1]
    rows = encode(kv, kv_format, kv_rope_dim, ring.dtype)
    if native.ring_append_supported(ring, ring_pos, rows, pos):
        native.ring_append_(ring, ring_pos, rows, pos)  # one C call instead of two indexed writes
        return ring, ring_pos
    vals = values(pos)
    first = vals[0] % w if vals is not None else w
    if first + t <= w and vals == vals[:t] * b:
        ring[:, first:first + t] = rows
        ring_pos[:, first:first + t] = pos
    else:
        at = (_steps(b, 1, pos.device)[:, None], pos % w)
        ring.index_put_(at, rows)
        ring_pos.index_put_(at, pos)
    return ring, ring_pos


def indexer_topk(q, w, keys, pos, *, topk, ratio, score_scale, weight_scale, key_format=None, hi: int):
    """The ``indexer_topk`` op for a few queries: one GEMM over the rows complete at the last query,
    the head-weighted sum as a batched product, the causal mask, top-k. Selected rows as a set
    equal the reference's; rows not visible read as -1."""
    b, t, h, d = q.shape
    n = max(0, (hi + 1) // ratio)
    if n == 0:
        return torch.full((b, t, topk), -1, dtype=torch.int64, device=q.device)
    if key_format == "mxfp4":
        q = round_trip(q, "mxfp4")
    kf = decode(keys[:, :n], key_format, d)  # [B, n, D]
    s = torch.bmm(q.float().reshape(b, t * h, d), kf.transpose(1, 2)).relu_()
    wf = w.float() * (weight_scale * score_scale)  # relu(s) * a * w * b == relu(s) * (w * a * b)
    total = torch.bmm(wf.reshape(b * t, 1, h), s.view(b * t, h, n)).view(b, t, n)
    total.masked_fill_(_ends(n, ratio, q.device) > pos[:, :, None], float("-inf"))
    vals, top = total.topk(min(topk, n), dim=-1)
    top.masked_fill_(vals == float("-inf"), -1)  # fewer rows visible than picks: the rest are hidden ones
    if top.shape[2] < topk:
        top = torch.cat([top, top.new_full((b, t, topk - top.shape[2]), -1)], dim=-1)
    return top
