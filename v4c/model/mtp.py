"""The multi-token-prediction (MTP, "nextn") block as a graph of its own (spec A.10).

One call appends entries to the block's own sequence: entry ``p`` pairs the main model's residual
streams at position ``p`` (``hidden``, what the main graph outputs as ``stream``) with the token at
``p + 1`` (``ids``) and runs at position ``p`` (``pos``), so its logits at ``p`` predict the token at
``p + 2``. Chained drafting feeds the block's own output streams back in as ``hidden``.

The block is one decoder block (always sliding-window attention with the main RoPE, never
hash-routed) between an input combination, ``e_proj(enorm(Emb[ids])) + h_proj(hnorm(hidden))`` (the
projected embedding broadcast over the streams; hnorm and h_proj act on each stream), and its own
``hc_head`` and final norm; the embedding and the LM head are the main model's. Params are named
``mtp.0.<the graph's leaf names>`` (``v4c/io/naming.py`` maps the release's names onto them); every
value of the graph starts with ``mtp.`` so it can sit beside the main graph's (the kernel emitter sees
both graphs as one).
"""
from __future__ import annotations

from ..graph.ir import Graph
from .build import F32, SLIDING, _V4GraphBuilder
from .config import V4Config

PREFIX = "mtp.0"  # the one block of the release (num_nextn_predict_layers = 1), chained for longer drafts
HIDDEN = "hidden"  # the input holding the streams the entries read
OUTPUTS = ("mtp.logits", "mtp.stream")


def build_mtp_graph(cfg: V4Config, dtype: str = "f32") -> Graph:
    """The unfused graph of one call of the MTP block of ``cfg``: inputs ``ids``, ``pos`` [B, T] and
    ``hidden`` [B, T, n, D]; outputs logits [B, T, vocab] and the block's streams [B, T, n, D]."""
    if dtype not in ("f32", "bf16", "f16"):
        raise ValueError(f"dtype must be f32, bf16 or f16, got {dtype!r}")
    gb = _V4GraphBuilder(cfg, dtype)
    gb.b.name = "deepseek_v4_mtp"
    b, c, p = gb.b, cfg, PREFIX
    D, n, V = c.hidden_size, c.hc_mult, c.vocab_size
    b.input("ids", ("B", "T"), "i64")
    b.input("pos", ("B", "T"), "i64")
    b.input(HIDDEN, ("B", "T", n, D), dtype)
    e = b.op("embedding", "ids", b.param("model.embed_tokens.weight", (V, D), dtype), out="mtp.embed")
    e = b.op("rms_norm", e, b.param(f"{p}.enorm.weight", (D,), F32), out="mtp.enorm", eps=c.rms_norm_eps)
    e = b.op("linear", e, b.param(f"{p}.e_proj.weight", (D, D), dtype), out="mtp.e")
    h = b.op("rms_norm", HIDDEN, b.param(f"{p}.hnorm.weight", (D,), F32), out="mtp.hnorm", eps=c.rms_norm_eps)
    h = b.op("linear", h, b.param(f"{p}.h_proj.weight", (D, D), dtype), out="mtp.h")
    x = b.op("add", b.op("hc_expand", e, out="mtp.e_streams", n=n), h, out="mtp.x0")
    # the layer index only names defaults; the block's own prefix, kind and routing are given
    x, mix = gb.block(x, c.num_hidden_layers, lp=p, tag="mtp", kind=SLIDING, hashed=False)
    outputs = gb.head(x, mix, f"{p}.hc_head", f"{p}.norm.weight", "mtp.head", OUTPUTS[0], OUTPUTS[1])
    return b.finish(outputs, meta={"dtype": dtype, "model": "deepseek_v4_mtp"})
