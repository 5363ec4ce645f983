"""The compressor's decode step without the pooling machinery when no window closes.

A decode token only lands in its pending slot unless it completes a window (every ``ratio``
tokens); the reference walks each row through the general prefill path either way. Calls that
close a window, carry padding or hold more than one token take the reference.
"""
from __future__ import annotations

import torch

from ...graph.ops.attention import compress
from ...graph.ops.core import linear


def compressor(h, wkv, wgate, ape, norm_w, rows, pend_kv, pend_gate, pos, *, ratio, overlap, **attrs):
    kv, gate = linear(h, wkv), linear(h, wgate)
    p = pos[:, 0]
    if pos.shape[1] != 1 or bool(((p < 0) | ((p + 1) % ratio == 0)).any()):
        return compress(kv, gate, ape, norm_w, rows, pend_kv, pend_gate, pos, ratio=ratio, overlap=overlap, **attrs)
    slot = p % pend_kv.shape[1]  # the pending ring holds the last (1 + overlap) windows
    b = torch.arange(p.shape[0], device=p.device)
    pend_kv[b, slot] = kv[:, 0].float().to(pend_kv.dtype)
    pend_gate[b, slot] = (gate[:, 0].float() + ape.float()[p % ratio]).to(pend_gate.dtype)
    return rows, pend_kv, pend_gate
