"""DeepSeek-V4 config -> IR graph (unfused, one op per step of the spec).

Params carry Hugging Face checkpoint names; states are the per-sequence decode
buffers (window ring, compressor pending slots, compressed rows, indexer keys),
sized by the symbolic dims ``B`` (batch) and ``L`` (maximum context).
"""
from __future__ import annotations

from ..graph.builder import GraphBuilder
from ..graph.ir import Graph
from .config import V4Config

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# params kept in fp32 whatever the activation dtype (as the reference implementations do)
F32 = "f32"


def _rope_attrs(cfg: V4Config, compressed: bool) -> dict:
    if not compressed:
        return {"rope_dim": cfg.rope_head_dim, "theta": float(cfg.rope_theta), "yarn": None}
    rs = cfg.rope_scaling
    yarn = None if rs is None else [float(rs.factor), int(rs.original_max_position_embeddings),
                                     float(rs.beta_fast), float(rs.beta_slow)]
    return {"rope_dim": cfg.rope_head_dim, "theta": float(cfg.compress_rope_theta), "yarn": yarn}


class _V4GraphBuilder:
    def __init__(self, cfg: V4Config, dtype: str):
        self.cfg, self.dt = cfg, dtype
        self.b = GraphBuilder("deepseek_v4")

    # -- mHC ------------------------------------------------------------------------------
    def hc_pre(self, x: str, prefix: str, tag: str):
        c, b = self.cfg, self.b
        n, d = c.hc_mult, c.hidden_size
        fn = b.param(f"{prefix}.fn", ((n + 2) * n, n * d), F32)
        base = b.param(f"{prefix}.base", ((n + 2) * n,), F32)
        scale = b.param(f"{prefix}.scale", (3,), F32)
        m = b.op("hc_logits", x, fn, out=f"{tag}.hc_logits", eps=c.rms_norm_eps)
        pre, post, comb = b.op("hc_weights", m, base, scale, out=(f"{tag}.hc_pre", f"{tag}.hc_post", f"{tag}.hc_comb0"),
                               n=n, eps=c.hc_eps)
        comb = b.op("sinkhorn", comb, out=f"{tag}.hc_comb", iters=c.hc_sinkhorn_iters, eps=c.hc_eps)
        u = b.op("hc_collapse", x, pre, out=f"{tag}.u")
        return u, post, comb

    # -- attention --------------------------------------------------------------------------
    def compressor(self, h, prefix, tag, holds, d, ratio, overlap):
        """``holds``: the kind of its rows, compressed_rows or indexer_keys."""
        c, b = self.cfg, self.b
        width = (2 if overlap else 1) * d
        wkv = b.param(f"{prefix}.kv_proj.weight", (width, c.hidden_size), self.dt)
        wgate = b.param(f"{prefix}.gate_proj.weight", (width, c.hidden_size), self.dt)
        ape = b.param(f"{prefix}.position_bias", (ratio, width), F32)
        norm = b.param(f"{prefix}.kv_norm.weight", (d,), F32)
        rows = b.state(f"{tag}.rows", ("B", f"L/{ratio}", d), self.dt, holds)
        pk = b.state(f"{tag}.pend_kv", ("B", width // d * ratio, width), F32, "compressor_state")
        pg = b.state(f"{tag}.pend_gate", ("B", width // d * ratio, width), F32, "compressor_state")
        a = b.op("linear", h, wkv, out=f"{tag}.kv")
        g = b.op("linear", h, wgate, out=f"{tag}.gate")
        rows, _, _ = b.op("compress", a, g, ape, norm, rows, pk, pg, "pos", out=(rows, pk, pg), ratio=ratio,
                          overlap=overlap, eps=c.rms_norm_eps, **_rope_attrs(c, True))
        return rows

    def attention(self, i: int, h: str, lp: str | None = None, tag: str | None = None, kind: str | None = None) -> str:
        """Layer ``i``'s attention; ``lp`` / ``tag`` / ``kind`` name another block's (the MTP block's)."""
        c, b, dt = self.cfg, self.b, self.dt
        lp, tag = lp or f"model.layers.{i}", tag or f"l{i}"
        p, t = f"{lp}.self_attn", f"{tag}.attn"
        kind = kind or c.layer_types[i]
        H, Dh, D, Q = c.num_attention_heads, c.head_dim, c.hidden_size, c.q_lora_rank
        rope = _rope_attrs(c, kind != SLIDING)
        cq = b.op("linear", h, b.param(f"{p}.q_a_proj.weight", (Q, D), dt), out=f"{t}.cq0")
        cq = b.op("rms_norm", cq, b.param(f"{p}.q_a_norm.weight", (Q,), F32), out=f"{t}.cq", eps=c.rms_norm_eps)
        q = b.op("linear", cq, b.param(f"{p}.q_b_proj.weight", (H * Dh, Q), dt), out=f"{t}.q0")
        q = b.op("reshape", q, out=f"{t}.q1", shape=["B", "T", H, Dh])
        q = b.op("rms_norm", q, out=f"{t}.q2", eps=c.rms_norm_eps)
        q = b.op("rope", q, "pos", out=f"{t}.q", **rope)
        kv = b.op("linear", h, b.param(f"{p}.kv_proj.weight", (Dh, D), dt), out=f"{t}.kv0")
        kv = b.op("rms_norm", kv, b.param(f"{p}.kv_norm.weight", (Dh,), F32), out=f"{t}.kv1", eps=c.rms_norm_eps)
        kv = b.op("rope", kv, "pos", out=f"{t}.kv", **rope)
        ring = b.state(f"{tag}.win", ("B", c.sliding_window, Dh), dt, "window")
        ring_pos = b.state(f"{tag}.win_pos", ("B", c.sliding_window), "i64", "window")
        sinks = b.param(f"{p}.sinks", (H,), F32)
        extra, kw = [], {}
        if kind == HCA:
            extra = [self.compressor(h, f"{p}.compressor", f"{tag}.comp", "compressed_rows", Dh, c.hca_ratio, False)]
            kw = {"ratio": c.hca_ratio}
        elif kind == CSA:
            m = c.csa_ratio
            rows = self.compressor(h, f"{p}.compressor", f"{tag}.comp", "compressed_rows", Dh, m, True)
            ip, it = f"{p}.compressor.indexer", f"{tag}.index"
            HI, DI = c.index_n_heads, c.index_head_dim
            keys = self.compressor(h, ip, it, "indexer_keys", DI, m, True)
            iq = b.op("linear", cq, b.param(f"{ip}.q_b_proj.weight", (HI * DI, Q), dt), out=f"{it}.q0")
            iq = b.op("reshape", iq, out=f"{it}.q1", shape=["B", "T", HI, DI])
            iq = b.op("rope", iq, "pos", out=f"{it}.q", **rope)
            iw = b.op("linear", h, b.param(f"{ip}.scorer.weights_proj.weight", (HI, D), dt), out=f"{it}.w")
            idx = b.op("indexer_topk", iq, iw, keys, "pos", out=f"{it}.topk", topk=c.index_topk, ratio=m,
                       score_scale=DI ** -0.5, weight_scale=HI ** -0.5)
            extra, kw = [rows, idx], {"ratio": m}
        short = {SLIDING: "sliding", CSA: "csa", HCA: "hca"}[kind]
        o = b.op("attention", q, kv, ring, ring_pos, sinks, "pos", *extra, out=f"{t}.o0", kind=short,
                 window=c.sliding_window, scale=Dh ** -0.5, **kw)
        b.op("window_append", ring, ring_pos, kv, "pos", out=(ring, ring_pos))
        o = b.op("rope", o, "pos", out=f"{t}.o1", inverse=True, **rope)
        G, R = c.o_groups, c.o_lora_rank
        o = b.op("reshape", o, out=f"{t}.o2", shape=["B", "T", G, H * Dh // G])
        o = b.op("grouped_linear", o, b.param(f"{p}.o_a_proj.weight", (G * R, H * Dh // G), dt), out=f"{t}.o3",
                 groups=G)
        o = b.op("reshape", o, out=f"{t}.o4", shape=["B", "T", G * R])
        return b.op("linear", o, b.param(f"{p}.o_b_proj.weight", (D, G * R), dt), out=f"{t}.out")

    # -- MoE --------------------------------------------------------------------------------
    def moe(self, i: int, h: str, lp: str | None = None, tag: str | None = None, hashed: bool | None = None) -> str:
        c, b, dt = self.cfg, self.b, self.dt
        p, t = f"{lp or f'model.layers.{i}'}.mlp", f"{tag or f'l{i}'}.ffn"
        E, D, I, k = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
        logits = b.op("linear", h, b.param(f"{p}.gate.weight", (E, D), dt), out=f"{t}.router")
        if c.mlp_layer_types[i] == "hash_moe" if hashed is None else hashed:
            table = b.param(f"{p}.gate.tid2eid", (c.vocab_size, k), "i64")
            idx, w = b.op("moe_hash_route", logits, table, "ids", out=(f"{t}.experts", f"{t}.weights"),
                          scaling=c.routed_scaling_factor)
        else:
            bias = b.param(f"{p}.gate.e_score_correction_bias", (E,), F32)
            idx, w = b.op("moe_route", logits, bias, out=(f"{t}.experts", f"{t}.weights"), topk=k,
                          scaling=c.routed_scaling_factor)
        w13 = b.param(f"{p}.experts.gate_up_proj", (E, 2 * I, D), dt)
        w2 = b.param(f"{p}.experts.down_proj", (E, D, I), dt)
        y = b.op("moe_experts", h, idx, w, w13, w2, out=f"{t}.routed", limit=c.swiglu_limit)
        if c.n_shared_experts:
            S = I * c.n_shared_experts
            s = f"{p}.shared_experts"
            g = b.op("linear", h, b.param(f"{s}.gate_proj.weight", (S, D), dt), out=f"{t}.shared_gate")
            u = b.op("linear", h, b.param(f"{s}.up_proj.weight", (S, D), dt), out=f"{t}.shared_up")
            a = b.op("swiglu", g, u, out=f"{t}.shared_act", limit=c.swiglu_limit)
            sy = b.op("linear", a, b.param(f"{s}.down_proj.weight", (D, S), dt), out=f"{t}.shared")
            y = b.op("add", y, sy, out=f"{t}.out")
        return y

    # -- whole model ------------------------------------------------------------------------
    def block(self, x: str, i: int, lp: str | None = None, tag: str | None = None, kind: str | None = None,
              hashed: bool | None = None):
        """One decoder block on the streams ``x``: (its output streams, the operands of its last post-mix)."""
        c, b = self.cfg, self.b
        lp, tag = lp or f"model.layers.{i}", tag or f"l{i}"
        for sub, norm_name in (("attn", "input_layernorm"), ("ffn", "post_attention_layernorm")):
            u, post, comb = self.hc_pre(x, f"{lp}.{sub}_hc", f"{tag}.{sub}")
            h = b.op("rms_norm", u, b.param(f"{lp}.{norm_name}.weight", (c.hidden_size,), F32), out=f"{tag}.{sub}.h",
                     eps=c.rms_norm_eps)
            y = self.attention(i, h, lp, tag, kind) if sub == "attn" else self.moe(i, h, lp, tag, hashed)
            mix = (x, y, post, comb)
            x = b.op("hc_expand_mix", *mix, out=f"{tag}.{sub}.x")
        return x, mix

    def head(self, x: str, mix, prefix: str, norm: str, tag: str, out: str, stream: str | None) -> list[str]:
        """hc_head collapse, final norm and LM head on the streams ``x`` (made by the post-mix ``mix``).
        With ``stream``, the streams are also an output: made by a second copy of that post-mix, since
        a value read outside the head would keep fuse-mhc from fusing the post-mix into the head."""
        c, b = self.cfg, self.b
        D, n, V = c.hidden_size, c.hc_mult, c.vocab_size
        m = b.op("hc_logits", x, b.param(f"{prefix}.hc_fn", (n, n * D), F32), out=f"{tag}.hc_logits",
                 eps=c.rms_norm_eps)
        pre = b.op("hc_head_weights", m, b.param(f"{prefix}.hc_base", (n,), F32),
                   b.param(f"{prefix}.hc_scale", (1,), F32), out=f"{tag}.hc_pre", eps=c.hc_eps)
        u = b.op("hc_collapse", x, pre, out=f"{tag}.u")
        u = b.op("rms_norm", u, b.param(norm, (D,), F32), out=f"{tag}.h", eps=c.rms_norm_eps)
        logits = b.op("linear", u, b.param("lm_head.weight", (V, D), self.dt), out=out)
        return [logits] + ([b.op("hc_expand_mix", *mix, out=stream)] if stream else [])

    def build(self, stream_output: bool = False) -> Graph:
        c, b, dt = self.cfg, self.b, self.dt
        D, n, V = c.hidden_size, c.hc_mult, c.vocab_size
        b.input("ids", ("B", "T"), "i64")
        b.input("pos", ("B", "T"), "i64")
        e = b.op("embedding", "ids", b.param("model.embed_tokens.weight", (V, D), dt), out="embed")
        x = b.op("hc_expand", e, out="x0", n=n)
        for i in range(c.num_hidden_layers):
            x, mix = self.block(x, i)
        outputs = self.head(x, mix, "model.hc_head", "model.norm.weight", "head", "logits",
                            "stream" if stream_output else None)
        return b.finish(outputs, meta={"dtype": dt, "model": "deepseek_v4"})


def build_graph(cfg: V4Config, dtype: str = "f32", stream_output: bool = False) -> Graph:
    """The unfused graph of one forward call (prefill chunk or decode step) of ``cfg``. ``stream_output``:
    the residual streams before ``hc_head`` [B, T, n, D] are a second output (what the MTP block reads)."""
    if dtype not in ("f32", "bf16", "f16"):
        raise ValueError(f"dtype must be f32, bf16 or f16, got {dtype!r}")
    return _V4GraphBuilder(cfg, dtype).build(stream_output)
