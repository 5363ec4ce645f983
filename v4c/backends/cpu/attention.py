"""Hybrid attention and the lightning indexer, computed block by block over the queries.

The references build one dense score matrix over the whole window ring, every token of the
call and every compressed row (T x T in a prefill). Here a block of queries only meets the
keys it can see: the ring, the call's tokens from ``W - 1`` before the block to its end, and
its own compressed rows (CSA: the indexer's top-k, gathered; HCA: those complete before the
block's last query). Work and memory grow linearly with T except for the indexer scan, which
is quadratic by design (every query scores every visible compressed key). Calls of at most
``attention_decode.TOKENS`` tokens (decode steps) take that module's one-shot paths instead.
"""
from __future__ import annotations

import torch

from ...graph.ops.attention import window_append
from ...graph.ops.core import linear, reshape
from ...graph.storage import decode, round_trip
from . import attention_decode as few
from . import native
from .positions import bounds
from .rope import rope_, rotations

_BLOCK_ELEMS = 1 << 22  # fp32 elements per score block (16 MiB): keeps blocks in the last-level cache's reach


def _blocks(t: int, per_query: int, most: int | None = None):
    size = max(16, min(t, _BLOCK_ELEMS // max(per_query, 1), most or t))
    return [(a, min(t, a + size)) for a in range(0, t, size)]


def _scores(qb: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``q [B, t, H, D]`` against keys shared by the block ``[B, S, D]`` -> ``[B, t, H, S]`` (one GEMM:
    the queries' natural layout, no transposed copies)."""
    b, t, h, d = qb.shape
    return torch.bmm(qb.reshape(b, t * h, d), keys.transpose(1, 2)).view(b, t, h, -1)


def _weighted(p: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    b, t, h, s = p.shape
    return torch.bmm(p.view(b, t * h, s), keys).view(b, t, h, -1)


def attend_native(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale,
                  kv_format=None, kv_rope_dim=0):
    """The ``attention`` op in the C helpers (plain caches; the checker makes sure)."""
    c = _contiguous
    return native.attention(c(q), c(_as_stored(kv, ring)), ring, ring_pos, sinks, c(pos), c(rows), c(idx), kind=kind,
                            window=window, ratio=ratio, scale=scale)


def _as_stored(kv, ring):
    """This call's rows in the plain cache's dtype, as the cache holds them (the reference's round trip: the
    same values but where fp16 cannot hold a bf16 row's value exactly, below 2^-14 or past 65504)."""
    return kv if kv.dtype == ring.dtype else kv.to(ring.dtype)


def _contiguous(t):
    return t if t is None or t.is_contiguous() else t.contiguous()


def attend_decode(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale,
                  kv_format=None, kv_rope_dim=0):
    """The ``attention`` op for a call of a few tokens (``attention_decode``)."""
    return few.attend(q, kv, ring, ring_pos, sinks, pos, rows, idx, kind=kind, window=window, ratio=ratio,
                      scale=scale, kv_format=kv_format, kv_rope_dim=kv_rope_dim, hi=bounds(pos)[1])


def attend(q, kv, ring, ring_pos, sinks, pos, rows=None, idx=None, *, kind, window, ratio=0, scale,
           kv_format=None, kv_rope_dim=0):
    """The ``attention`` op, blocked over the queries (same signature and result as its reference).
    Scores are laid out [B, t, H, S] so every product is a plain batched GEMM on the tensors as they
    are stored."""
    b, t, h, d = q.shape
    keys_now = round_trip(kv, kv_format, kv_rope_dim).float()  # as the cache will hold them
    ring_keys = decode(ring, kv_format, d, kv_rope_dim)
    qs = q.float() * scale
    sink = sinks.float().view(1, 1, h, 1)
    neg = float("-inf")
    crow = None
    if kind == "hca":  # only rows complete before the call's last query can be visible
        nvis = max(0, (int(pos.max()) + 1) // ratio)
        crow = decode(rows[:, :nvis], kv_format, d, kv_rope_dim)
        cidx = torch.arange(nvis, device=q.device)
    out = torch.empty(b, t, h, d, dtype=torch.float32, device=q.device)
    per_query = h * (2 * window + (idx.shape[2] if kind == "csa" else 0) + (crow.shape[1] if crow is not None else 0))
    ring_live = bool((ring_pos >= 0).any())
    # blocks of about a window: a block's keys span W + block tokens, of which each query sees W
    for t0, t1 in _blocks(t, per_query + h * 64, most=max(window, 64)):
        k0 = max(0, t0 - window + 1)
        if ring_live and t0 < window - 1:  # only a call's first W - 1 tokens can see the ring
            keys = torch.cat([ring_keys, keys_now[:, k0:t1]], dim=1)
            kpos = torch.cat([ring_pos, pos[:, k0:t1]], dim=1)[:, None, :]
        else:
            keys, kpos = keys_now[:, k0:t1], pos[:, None, k0:t1]
        qpos = pos[:, t0:t1, None]
        qb = qs[:, t0:t1]
        hidden = (kpos < 0) | (kpos > qpos) | (kpos <= qpos - window)  # [B, t, S]
        parts = [(_scores(qb, keys).masked_fill_(hidden[:, :, None], neg), keys)]
        if kind == "hca" and crow.shape[1]:
            cvis = (cidx + 1) * ratio <= qpos + 1
            parts.append((_scores(qb, crow).masked_fill_(~cvis[:, :, None], neg), crow))
        elif kind == "csa" and (nvis := max(0, (int(pos[:, t0:t1].max()) + 1) // ratio)) > 0:
            sel = idx[:, t0:t1]
            if nvis <= sel.shape[2]:
                # no more rows are visible than top-k picks: every visible row is selected, so the
                # block reads them once, densely, instead of gathering a copy per query
                g = decode(rows[:, :nvis], kv_format, d, kv_rope_dim)  # [B, n, D]
                chosen = torch.zeros(b, t1 - t0, nvis + 1, dtype=torch.bool, device=q.device)
                chosen.scatter_(-1, torch.where(sel >= 0, sel, nvis), True)
                parts.append((_scores(qb, g).masked_fill_(~chosen[:, :, None, :nvis], neg), g))
            else:  # each query's own top-k rows, gathered: [B * t, K, D]
                tb, k = t1 - t0, sel.shape[2]
                bi = torch.arange(b, device=q.device)[:, None, None]
                g = decode(rows[bi, sel.clamp_min(0)], kv_format, d, kv_rope_dim).view(b * tb, k, d)
                cs = torch.bmm(qb.reshape(b * tb, h, d), g.transpose(1, 2)).view(b, tb, h, k)
                parts.append((cs.masked_fill_((sel < 0)[:, :, None], neg), g))
        # softmax over all parts and the sink, without concatenating the scores
        m = sink.expand(b, t1 - t0, h, 1)
        for p, _ in parts:
            m = torch.maximum(m, p.amax(-1, keepdim=True))
        denom = torch.exp(sink - m)
        o = None
        for p, vals in parts:
            p.sub_(m).exp_()
            denom = denom + p.sum(-1, keepdim=True)
            if vals.shape[0] == b:
                y = _weighted(p, vals)
            else:  # gathered rows: one small GEMM per query
                y = torch.bmm(p.reshape(-1, h, p.shape[-1]), vals).view(b, t1 - t0, h, d)
            o = y if o is None else o.add_(y)
        out[:, t0:t1] = o.div_(denom)
    return out.to(q.dtype)


def fused(attend_fn):
    """The ``sparse_attention`` op around one of the attention implementations above."""
    def sparse_attention(q, kv, ring, ring_pos, sinks, pos, *extra, rope_dim, theta, yarn=None, **attrs):
        return _fused(attend_fn, q, kv, ring, ring_pos, sinks, pos, *extra, rope_dim=rope_dim, theta=theta,
                      yarn=yarn, **attrs)
    return sparse_attention


def _fused(attend_fn, q, kv, ring, ring_pos, sinks, pos, *extra, rope_dim, theta, yarn=None, **attrs):
    """The fused op: attention, the ring append, the output de-rotation."""
    t = pos.shape[1]
    small = pos.shape[0] * t <= few.TOKENS and t <= ring.shape[1] and bounds(pos)[0] >= 0  # no padding
    if attend_fn is attend_native and small:  # the three steps in one C call (a plain cache: the checker's)
        c = _contiguous
        rot = rotations(pos, rope_dim, theta, yarn, inverse=True) if rope_dim else None
        o = native.attention_step_(c(q), c(_as_stored(kv, ring)), ring, ring_pos, sinks, c(pos), *map(c, extra),
                                   kind=attrs["kind"],
                                   window=attrs["window"], ratio=attrs.get("ratio", 0), scale=attrs["scale"], rot=rot,
                                   rope_dim=rope_dim)
        return o, ring, ring_pos
    o = attend_fn(q, kv, ring, ring_pos, sinks, pos, *extra, **attrs)
    fmt = {a: attrs[a] for a in ("kv_format", "kv_rope_dim") if a in attrs}
    if small:
        ring, ring_pos = few.window_append(ring, ring_pos, kv, pos, **fmt)
    else:
        ring, ring_pos = window_append(ring, ring_pos, kv, pos, **fmt)
    return rope_(o, pos, rope_dim, theta, yarn, inverse=True), ring, ring_pos  # o is this call's own


def indexer_topk_decode(q, w, keys, pos, *, topk, ratio, score_scale, weight_scale, key_format=None):
    """The ``indexer_topk`` op for a call of a few tokens (``attention_decode``)."""
    return few.indexer_topk(q, w, keys, pos, topk=topk, ratio=ratio, score_scale=score_scale,
                            weight_scale=weight_scale, key_format=key_format, hi=bounds(pos)[1])


_C_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what indexer.c reads


def _topk_c(pytorch_path, doc):
    def topk_c(q, w, keys, pos, *, topk, ratio, score_scale, weight_scale, key_format=None):
        if (key_format not in (None, "f32", "bf16", "f16") or keys.dtype not in _C_DTYPES or q.dtype not in _C_DTYPES
                or w.dtype != q.dtype):
            return pytorch_path(q, w, keys, pos, topk=topk, ratio=ratio, score_scale=score_scale,
                                weight_scale=weight_scale, key_format=key_format)
        return native.indexer_topk(q.contiguous(), w.contiguous(), keys.contiguous(), pos.contiguous(), topk, ratio,
                                   weight_scale * score_scale)
    topk_c.__doc__ = doc
    return topk_c


indexer_topk_c = _topk_c(indexer_topk_decode, """``indexer_topk_decode`` in one C call over plain fp32 / bf16
    keys (native/indexer.c: no fp32 copy of the key cache, no dozen small calls); packed keys (fp8, mxfp4) and
    other dtypes take the PyTorch path.""")


def indexer_topk(q, w, keys, pos, *, topk, ratio, score_scale, weight_scale, key_format=None):
    """The ``indexer_topk`` op, blocked over the queries: the same selected rows as the reference (as
    a set: the order of the indices within a row may differ)."""
    b, t, h, d = q.shape
    out = torch.full((b, t, topk), -1, dtype=torch.int64, device=q.device)
    nmax = max(0, (int(pos.max()) + 1) // ratio)
    if nmax == 0:
        return out
    if key_format == "mxfp4":
        q = round_trip(q, "mxfp4")
    kf = decode(keys[:, :nmax], key_format, d).transpose(1, 2)  # [B, D, n]
    wf = w.float() * (weight_scale * score_scale)  # relu(s) * a * w * b == relu(s) * (w * a * b)
    visible = (pos + 1).clamp_min(0) // ratio  # rows complete at each query
    for t0, t1 in _blocks(t, h * nmax):
        tb = t1 - t0
        n = int(visible[:, t0:t1].max())
        if n == 0:
            continue
        s = torch.matmul(q[:, t0:t1].float().reshape(b, tb * h, d), kf[..., :n]).relu_()
        total = torch.bmm(wf[:, t0:t1].reshape(b * tb, 1, h), s.view(b * tb, h, n)).view(b, tb, n)
        vis = visible[:, t0:t1, None]
        total.masked_fill_(torch.arange(n, device=q.device) >= vis, float("-inf"))
        k = min(topk, n)
        top = total.topk(k, dim=-1).indices
        out[:, t0:t1, :k] = torch.where(top >= vis, -1, top)
    return out


indexer_topk_c_prefill = _topk_c(indexer_topk, """``indexer_topk`` in one C call (native/indexer.c, the
    queries split across threads): each query's visible rows only, scored in bf16 pairs (AVX512-BF16). The
    registry binds it to bf16 prefills on such CPUs: 58 against 109 ms for ``indexer_topk`` on a 4,096-token
    layer of the 478m model (Zen 4, 2 threads); with fp32 products (164 ms) PyTorch's GEMMs are faster. The
    same fallback as ``indexer_topk_c``.""")


def fused_indexer(topk_fn, lin=linear, one_call=False):
    """The ``indexer`` op around one of the ``indexer_topk`` implementations above (``lin``: its
    products, a decode call's C one from ``dense``; ``one_call``: with those, the products, the RoPE and
    ``indexer_topk_c``'s selection in one C call where it takes the keys)."""
    def indexer(cq, h, wq, ww, keys, pos, *, shape, rope_dim, theta, yarn=None, **attrs):
        """The fused op: query GEMM + RoPE, head weights, scores, top-k."""
        if (one_call and rope_dim and cq.dim() == 3 and len(shape) == 4 and not isinstance(shape[2], str)
                and attrs.get("key_format") in (None, "f32", "bf16") and keys.dtype in _C_DTYPES
                and cq.dtype in _C_DTYPES):
            return native.indexer_step(cq, wq, h, ww, keys, pos, shape[2], rope_dim,
                                       rotations(pos, rope_dim, theta, yarn), attrs["topk"], attrs["ratio"],
                                       attrs["weight_scale"] * attrs["score_scale"])
        q = rope_(reshape(lin(cq, wq), shape), pos, rope_dim, theta, yarn)  # the product is this call's own
        return topk_fn(q, lin(h, ww), keys, pos, **attrs)
    return indexer
