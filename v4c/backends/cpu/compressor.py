"""The compressor's decode step (one token per row) without the prefill pooling machinery.

A decode token lands in its pending slot; every ``ratio`` tokens it also completes a window. The
reference walks each row through the general path either way. Here the token is written first
(fp32 pending slots hold exactly what the reference pools), so a closing window's tokens are all
in the pending ring: the closing rows are pooled together, in token order, from one gather.
Calls with padding, several tokens per row, or a CSA window with no predecessor yet (its first
half is masked) take the reference; a prefill's calls take ``compressor_prefill``, the same ring and pooling
token after token in C.
"""
from __future__ import annotations

import torch

from ...graph.ops.attention import compress
from ...graph.ops.core import apply_rope, linear, rms_norm, rope_cos_sin
from ...graph.storage import PLAIN, encode
from . import native
from .positions import values
from .rope import rotations_at
from .rope import table as rope_table


def compressor(h, wkv, wgate, ape, norm_w, rows, pend_kv, pend_gate, pos, *, ratio, overlap, eps, rope_dim, theta,
               yarn=None, store=None, lin=linear):
    kv, gate = lin(h, wkv), lin(h, wgate)  # (lin: the C product where the registry binds it, see dense)
    vals = values(pos) if pos.shape[1] == 1 else None  # the call's positions on the host, read once per call
    slots = pend_kv.shape[1]  # the pending ring holds the last (1 + overlap) windows
    closing = [i for i, v in enumerate(vals or ()) if (v + 1) % ratio == 0]
    if (vals is None or min(vals) < 0 or pend_kv.dtype != torch.float32 or pend_gate.dtype != torch.float32
            or any(vals[i] + 1 < slots for i in closing)):
        return compress(kv, gate, ape, norm_w, rows, pend_kv, pend_gate, pos, ratio=ratio, overlap=overlap, eps=eps,
                        rope_dim=rope_dim, theta=theta, yarn=yarn, store=store)
    new_gate = gate[:, 0].float() + ape.float()[pos[:, 0] % ratio]
    if vals == vals[:1] * len(vals):  # every row at the same position: one slot, a slice
        pend_kv[:, vals[0] % slots] = kv[:, 0]
        pend_gate[:, vals[0] % slots] = new_gate
    else:
        b = torch.arange(len(vals), device=pos.device)
        slot = pos[:, 0] % slots
        pend_kv[b, slot] = kv[:, 0].float()
        pend_gate[b, slot] = new_gate
    if closing:
        _close(closing, [vals[i] for i in closing], rows, pend_kv, pend_gate, norm_w, ratio=ratio, overlap=overlap,
               eps=eps, rope_dim=rope_dim, theta=theta, yarn=yarn, store=store)
    return rows, pend_kv, pend_gate


def _close(which, last, rows, pend_kv, pend_gate, norm_w, *, ratio, overlap, eps, rope_dim, theta, yarn, store):
    """Pool the windows that rows ``which`` complete with their tokens at positions ``last``."""
    slots, d = pend_kv.shape[1], norm_w.shape[0]
    dev = pend_kv.device
    # the row's last `slots` tokens, oldest first: the previous window (CSA), then this one
    order = torch.tensor([[(p + 1 + j) % slots for j in range(slots)] for p in last], device=dev)
    sel = torch.tensor(which, device=dev)[:, None]
    seq_kv, seq_gate = pend_kv[sel, order], pend_gate[sel, order]
    if overlap:  # first half of the channels from the previous window, second half from this one
        seq_kv = torch.cat([seq_kv[:, :ratio, :d], seq_kv[:, ratio:, d:]], dim=1)
        seq_gate = torch.cat([seq_gate[:, :ratio, :d], seq_gate[:, ratio:, d:]], dim=1)
    pooled = rms_norm((seq_kv * torch.softmax(seq_gate, dim=1)).sum(dim=1), norm_w, eps=eps)
    win = torch.tensor([p // ratio for p in last], device=dev)
    cos, sin = rope_cos_sin(win * ratio, rope_dim, theta, yarn)
    rows[sel[:, 0], win] = encode(apply_rope(pooled, cos, sin), store, rope_dim, rows.dtype)


def compressor_c(h, wkv, wgate, ape, norm_w, rows, pend_kv, pend_gate, pos, *, ratio, overlap, eps, rope_dim, theta,
                 yarn=None, store=None, lin, one_call=False):
    """``compressor``'s decode step with the slot writes and the pooling in one C call (native/compress.c)
    and a closing window's RMSNorm + RoPE in another (norm_rope.c, the rotations from the exact tables of
    ``rope``): 3 calls a step, 6 when a window closes, instead of ~8 and ~25 (with a plain row store the
    closing's norm, RoPE and write are one more C++ call, ``compress_close_``). Calls the C step does not
    take (padding, several tokens a row, a CSA window with no predecessor) take the general path. ``one_call``
    (plain weights): the products inside the step's C call too, one trip through Python instead of three."""
    vals = values(pos) if pos.shape[1] == 1 else None
    if vals is None or min(vals) < 0 or any((v + 1) % ratio == 0 and v + 1 < ratio * (1 + overlap) for v in vals):
        return compressor(h, wkv, wgate, ape, norm_w, rows, pend_kv, pend_gate, pos, ratio=ratio, overlap=overlap,
                          eps=eps, rope_dim=rope_dim, theta=theta, yarn=yarn, store=store, lin=lin)
    if one_call:  # plain weights: the two products and the step in one C call (``lin`` is dense.gemv's product)
        pooled = native.compress_decode_(h, wkv, wgate, ape, pend_kv, pend_gate, pos, ratio, bool(overlap))
    else:
        pooled = native.compress_step_(lin(h, wkv), lin(h, wgate), _f32(ape), pend_kv, pend_gate, pos, ratio,
                                       bool(overlap))
    closing = [i for i, v in enumerate(vals) if (v + 1) % ratio == 0]
    if closing and (store is None or store in PLAIN):  # norm, RoPE and the store's write in the same C++ call
        table = rope_table(rope_dim, theta, yarn, pos.device, max(vals[i] for i in closing) + 1)
        native.compress_close_(pooled, pos, ratio, norm_w, eps, rope_dim, table, rows)
    elif closing:  # a packed store: encoded in PyTorch
        win = [vals[i] // ratio for i in closing]
        sel = torch.tensor(closing, device=pos.device)
        x = pooled.index_select(0, sel)[:, None]  # [n, 1, d]: norm_rope_'s [B, T, d]
        rot = rotations_at([w * ratio for w in win], rope_dim, theta, yarn, pos.device)[:, None]
        native.norm_rope_(x, norm_w, eps, rope_dim, rot)
        rows[sel, torch.tensor(win, device=pos.device)] = encode(x[:, 0], store, rope_dim, rows.dtype)
    return rows, pend_kv, pend_gate


def compressor_prefill(h, wkv, wgate, ape, norm_w, rows, pend_kv, pend_gate, pos, *, ratio, overlap, eps, rope_dim,
                       theta, yarn=None, store=None, lin=linear):
    """A prefill call's compressor: the products through ``lin``; each row's tokens through the decode step's
    pending ring and pooling in one C call (native/compress.c), so a window pools the same values however its
    tokens were split between calls; the closed windows' RMSNorm, RoPE and store as the reference makes them,
    all rows' windows at once. (The reference pools with ~15 PyTorch passes over the call's rows per batch row:
    a 4,096-token call of hidden 512 took ~6-8 ms a compressor, a 64-token one ~0.7 ms.)"""
    kv, gate = lin(h, wkv), lin(h, wgate)
    pooled, win = native.compress_prefill_(kv.contiguous(), gate.contiguous(), _f32(ape), pend_kv, pend_gate,
                                           pos.contiguous(), ratio, bool(overlap))
    b, k = (win >= 0).nonzero(as_tuple=True)
    if b.numel():
        w = win[b, k]
        cos, sin = rope_cos_sin(w * ratio, rope_dim, theta, yarn)
        x = apply_rope(rms_norm(pooled[b, k], norm_w, eps=eps), cos, sin)
        rows[b, w] = encode(x, store, rope_dim, rows.dtype)
    return rows, pend_kv, pend_gate


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()
