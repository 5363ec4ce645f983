"""Hybrid attention: window ring, compressors (CSA/HCA), lightning indexer, sparse attention.

Positions (``pos``, [B, T] int64) are absolute; ``-1`` marks a padding token,
which reads nothing into any state and attends to nothing.  Valid tokens of a
row come first and are consecutive.
"""
from __future__ import annotations

import torch

from ..registry import Cost, expect, expect_int, expect_rank, register, same_dim
from ..storage import decode, encode, round_trip, stored_width
from ..types import TensorType
from .core import apply_rope, rms_norm, rope_cos_sin

KINDS = ("sliding", "csa", "hca")


# ---- sparse attention over window + compressed rows ---------------------------------------

def _attn_infer(ins, a):
    kind = a["kind"]
    expect(kind in KINDS, f"attention: unknown kind {kind!r}")
    want = {"sliding": 6, "hca": 7, "csa": 8}[kind]
    expect(len(ins) == want, f"attention[{kind}]: expected {want} inputs, got {len(ins)}")
    q, kv, ring, ring_pos, sinks, pos = ins[:6]
    expect_rank(q, 4, "attention q")
    same_dim(q.shape[3], kv.shape[2], "attention: q head dim vs kv dim")
    width = stored_width(kv.shape[2], a.get("kv_format"), a.get("kv_rope_dim", 0))
    same_dim(ring.shape[2], width, "attention: ring row width")
    same_dim(ring.shape[1], a["window"], "attention: ring rows vs window")
    same_dim(sinks.shape[0], q.shape[2], "attention: sinks vs heads")
    expect_int(pos, "attention positions")
    expect_int(ring_pos, "attention ring positions")
    if kind != "sliding":
        same_dim(ins[6].shape[2], width, "attention: compressed row width")
    if kind == "csa":
        expect_int(ins[7], "attention top-k indices")
    return [q]


def _attn_cost(ins, outs, a, ctx):
    q = ins[0]
    b, t, h, d = q.shape
    keys = min(ctx, a["window"])
    if a["kind"] == "hca":
        keys += ctx // a["ratio"]
    elif a["kind"] == "csa":
        keys += min(ins[7].shape[2], ctx // a["ratio"])
    row_bytes = ins[2].shape[2] * ins[2].itemsize  # as stored: quantised rows are read as they are
    return Cost(4 * b * t * h * keys * d, 2 * q.nbytes + b * keys * row_bytes)


# shared with the fused sparse_attention, which takes the same operands
ATTENTION_OPERANDS = ("q", "kv", "ring:cache/window", "ring_pos:state/window", "sinks:weight", "pos",
                      "rows?:cache/compressed_rows", "idx?")
ATTENTION_ATTRS = ("kind:str", "window:int", "ratio:int?", "scale:float", "kv_format:str?", "kv_rope_dim:int?")


@register("attention", infer=_attn_infer, cost=_attn_cost, operands=ATTENTION_OPERANDS, attrs=ATTENTION_ATTRS,
          cache_format="kv_format")
def attention(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale,
              kv_format=None, kv_rope_dim=0):
    """Softmax with a per-head sink over the window rows plus the visible (HCA) or selected (CSA)
    compressed rows; keys are values (K = V); cached rows are decoded as they are loaded."""
    d = kv.shape[2]
    kv = round_trip(kv, kv_format, kv_rope_dim)  # this call's rows, as the cache will hold them
    keys = torch.cat([decode(ring, kv_format, d, kv_rope_dim), kv.float()], dim=1)
    kpos = torch.cat([ring_pos, pos], dim=1)[:, None, :]
    qpos = pos[:, :, None]
    mask = (kpos >= 0) & (kpos <= qpos) & (kpos > qpos - window)
    if kind != "sliding":
        n = rows.shape[1]
        if kind == "hca":  # entry w is complete once token (w+1)*m - 1 was seen
            cmask = (torch.arange(n, device=q.device) + 1) * ratio <= qpos + 1
        else:
            sel = torch.zeros(*idx.shape[:2], n + 1, dtype=torch.bool, device=q.device)
            sel.scatter_(-1, torch.where(idx >= 0, idx, n), True)
            cmask = sel[..., :n]
        keys = torch.cat([keys, decode(rows, kv_format, d, kv_rope_dim)], dim=1)
        mask = torch.cat([mask, cmask.expand(mask.shape[0], -1, -1)], dim=2)
    kf = keys.float()
    scores = torch.einsum("bthd,bsd->bhts", q.float(), kf) * scale
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)
    logits = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return torch.einsum("bhts,bsd->bthd", probs, kf).to(q.dtype)


# ---- window ring ------------------------------------------------------------------------

def _append_infer(ins, a):
    ring, ring_pos, kv, pos = ins
    same_dim(ring.shape[2], stored_width(kv.shape[2], a.get("kv_format"), a.get("kv_rope_dim", 0)),
             "window_append: ring row width")
    expect_int(ring_pos, "window_append ring positions")
    return [ring, ring_pos]


def _valid_tokens(pos_row: torch.Tensor) -> int:
    return int((pos_row >= 0).sum())


@register("window_append", infer=_append_infer, operands=("ring:cache/window", "ring_pos:state/window", "kv", "pos"),
          attrs=("kv_format:str?", "kv_rope_dim:int?"), state_io=(("ring", 0), ("ring_pos", 1)),
          cache_format="kv_format",
          cost=lambda i, o, a, c: Cost(0, 2 * min(i[2].nbytes, i[0].nbytes)))
def window_append(ring, ring_pos, kv, pos, *, kv_format=None, kv_rope_dim=0):
    """Write each token's KV row into ring slot ``pos % W`` (only the last W tokens matter)."""
    w = ring.shape[1]
    for b in range(kv.shape[0]):
        n = _valid_tokens(pos[b])
        p = pos[b, max(0, n - w):n]
        ring[b, p % w] = encode(kv[b, max(0, n - w):n], kv_format, kv_rope_dim, ring.dtype)
        ring_pos[b, p % w] = p
    return ring, ring_pos


# ---- compressor ---------------------------------------------------------------------------

def _compress_infer(ins, a):
    kv, gate, ape, norm_w, rows, pend_kv, pend_gate, pos = ins
    m, c = a["ratio"], 2 if a["overlap"] else 1
    expect(isinstance(kv.shape[2], int) and kv.shape[2] % c == 0, f"compress: projected width {kv.shape[2]} vs c={c}")
    d = kv.shape[2] // c
    same_dim(rows.shape[2], stored_width(d, a.get("store"), a["rope_dim"]), "compress: row width vs format")
    same_dim(gate.shape[2], c * d, "compress: gate width vs c*d")
    same_dim(ape.shape[0], m, "compress: ape rows vs ratio")
    same_dim(ape.shape[1], c * d, "compress: ape width")
    same_dim(norm_w.shape[0], d, "compress: norm width")
    same_dim(pend_kv.shape[1], c * m, "compress: pending slots")
    same_dim(pend_kv.shape[2], c * d, "compress: pending width")
    expect(pend_gate == pend_kv, "compress: pending kv/gate types differ")
    expect_int(pos, "compress positions")
    return [rows, pend_kv, pend_gate]


def _compress_cost(ins, outs, a, ctx):
    kv, rows = ins[0], ins[4]
    tokens = kv.shape[0] * kv.shape[1]
    new_rows = max(1, tokens // a["ratio"])
    return Cost(6 * kv.numel, 2 * kv.nbytes + new_rows * rows.shape[2] * rows.itemsize)  # rows as stored


# rows: compressed KV rows or indexer keys, whichever the compressor feeds
COMPRESS_OPERANDS = ("ape:weight", "norm_w:weight", "rows:cache", "pend_kv:state/compressor_state",
                     "pend_gate:state/compressor_state", "pos")
COMPRESS_ATTRS = ("ratio:int", "overlap:bool", "eps:float", "rope_dim:int", "theta:float", "yarn:tuple?", "store:str?")
COMPRESS_STATES = (("rows", 0), ("pend_kv", 1), ("pend_gate", 2))


@register("compress", infer=_compress_infer, cost=_compress_cost, operands=("kv", "gate", *COMPRESS_OPERANDS),
          attrs=COMPRESS_ATTRS, state_io=COMPRESS_STATES, cache_format="store")
def compress(kv, gate, ape, norm_w, rows, pend_kv, pend_gate, pos, *, ratio, overlap, eps, rope_dim, theta,
             yarn=None, store=None):
    """Pool every completed window of ``ratio`` tokens into one row: per-channel softmax of the gates
    (CSA: over the previous window's first half and this window's second half), RMSNorm, RoPE at the
    window start; rows go to ``rows[w]``, unfinished windows stay in the pending slots."""
    m, c = ratio, 2 if overlap else 1
    d = kv.shape[2] // c
    slots = c * m
    for b in range(kv.shape[0]):
        n = _valid_tokens(pos[b])
        if n == 0:
            continue
        p0 = int(pos[b, 0])
        new_kv = kv[b, :n].float()
        new_gate = gate[b, :n].float() + ape.float()[pos[b, :n] % m]
        # the token sequence from the start of the oldest window still needed, old part from pending
        start = (p0 // m) * m - (c - 1) * m
        old = torch.arange(start, p0, device=kv.device)
        old_kv = pend_kv[b, old.clamp_min(0) % slots].float()
        old_gate = pend_gate[b, old.clamp_min(0) % slots].float().masked_fill((old < 0)[:, None], float("-inf"))
        old_kv = old_kv.masked_fill((old < 0)[:, None], 0.0)
        seq_kv = torch.cat([old_kv, new_kv])
        seq_gate = torch.cat([old_gate, new_gate])
        w0, w1 = p0 // m, (p0 + n) // m  # windows [w0, w1) close in this call
        if w1 > w0:
            win = torch.arange(w0, w1, device=kv.device)
            cur = (win * m - start)[:, None] + torch.arange(m, device=kv.device)
            if overlap:
                prev = cur - m
                pk = torch.cat([seq_kv[prev][..., :d], seq_kv[cur][..., d:]], dim=1)
                pg = torch.cat([seq_gate[prev][..., :d], seq_gate[cur][..., d:]], dim=1)
            else:
                pk, pg = seq_kv[cur], seq_gate[cur]
            pooled = (pk * torch.softmax(pg, dim=1)).sum(dim=1)
            pooled = rms_norm(pooled, norm_w, eps=eps)
            cos, sin = rope_cos_sin(win * m, rope_dim, theta, yarn)
            rows[b, w0:w1] = encode(apply_rope(pooled, cos, sin), store, rope_dim, rows.dtype)
        keep = torch.arange(max(0, n - slots), n, device=kv.device)
        at = (p0 + keep) % slots
        pend_kv[b, at] = new_kv[keep].to(pend_kv.dtype)
        pend_gate[b, at] = new_gate[keep].to(pend_gate.dtype)
    return rows, pend_kv, pend_gate


# ---- lightning indexer --------------------------------------------------------------------

def _indexer_infer(ins, a):
    q, w, keys, pos = ins
    expect_rank(q, 4, "indexer_topk q")
    same_dim(q.shape[2], w.shape[2], "indexer_topk: heads vs weights")
    same_dim(keys.shape[2], stored_width(q.shape[3], a.get("key_format")), "indexer_topk: key width vs format")
    expect(a["topk"] >= 1, "indexer_topk: topk must be >= 1")
    return [TensorType((q.shape[0], q.shape[1], a["topk"]), "i64")]


def _indexer_cost(ins, outs, a, ctx):
    q, w, keys, pos = ins
    b, t, h, d = q.shape
    n = ctx // a["ratio"]
    return Cost(2 * b * t * h * d * n + 3 * b * t * h * n, q.nbytes + w.nbytes + b * n * keys.shape[2] * keys.itemsize)


INDEXER_ATTRS = ("topk:int", "ratio:int", "score_scale:float", "weight_scale:float", "key_format:str?")


def indexer_scores(q, w, keys, pos, *, ratio, score_scale, weight_scale, key_format=None):
    """``indexer_topk``'s scores [B, T, rows] (-inf where a row is not complete at the query) and each query's
    count of complete rows [B, T, 1]: what its top-k ranks (tests use them to tell ties from wrong picks)."""
    if key_format == "mxfp4":
        q = round_trip(q, "mxfp4")
    kf = decode(keys, key_format, q.shape[-1])
    scores = torch.relu(torch.einsum("bthd,bsd->bths", q.float(), kf)) * score_scale
    total = (scores * (w.float() * weight_scale)[..., None]).sum(dim=2)
    visible = (pos[:, :, None] + 1) // ratio
    ent = torch.arange(keys.shape[1], device=q.device)
    return total.masked_fill(ent >= visible, float("-inf")), visible


@register("indexer_topk", infer=_indexer_infer, cost=_indexer_cost,
          operands=("q", "w", "keys:cache/indexer_keys", "pos"), attrs=INDEXER_ATTRS, cache_format="key_format")
def indexer_topk(q, w, keys, pos, *, topk, ratio, score_scale, weight_scale, key_format=None):
    """Top-k compressed rows by ``sum_h w_h * ReLU(q_h . k)`` among the rows complete at each query;
    unused slots are -1. With MXFP4 keys the queries get the same Hadamard rotation and FP4 rounding."""
    n = keys.shape[1]
    total, visible = indexer_scores(q, w, keys, pos, ratio=ratio, score_scale=score_scale,
                                    weight_scale=weight_scale, key_format=key_format)
    k = min(topk, n)
    top = total.topk(k, dim=-1).indices
    top = torch.where(top >= visible, torch.full_like(top, -1), top)
    if k < topk:
        top = torch.cat([top, top.new_full((*top.shape[:2], topk - k), -1)], dim=-1)
    return top
