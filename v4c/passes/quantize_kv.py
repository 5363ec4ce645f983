"""The KV-cache storage pass: window rings and compressed rows in ``kv``, indexer keys in ``indexer``."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import GraphError
from ..graph.ir import Graph, Node, StateDecl
from ..graph.registry import get_op, operands_with_role
from ..graph.storage import KEY_FORMATS, KV_FORMATS, PLAIN, stored_dtype, stored_width
from ..graph.types import TensorType
from .base import Pass, PassResult


def _roots(g: Graph) -> dict[str, str]:
    """Every state version -> the state it is a version of."""
    root = {s: s for s, _ in g.states}
    for n in g.nodes:
        for i, o in get_op(n.op).state_io:
            root[n.outputs[o]] = root[n.inputs[i]]
    return root


@dataclass
class QuantizeKVCache(Pass):
    """Cache buffers hold rows in the chosen formats; every op that reads or writes them decodes or encodes in place."""

    kv: str = "fp8_ds"
    indexer: str = "mxfp4"
    name = "quantize-kv-cache"

    def __post_init__(self):
        if self.kv not in KV_FORMATS:
            raise ValueError(f"kv cache format must be one of {', '.join(KV_FORMATS)}, got {self.kv!r}")
        if self.indexer not in KEY_FORMATS:
            raise ValueError(f"indexer cache format must be one of {', '.join(KEY_FORMATS)}, got {self.indexer!r}")

    def run(self, g: Graph) -> PassResult:
        meta = dict(g.meta)
        if "kv_cache" in meta or "indexer_cache" in meta:  # the caches were laid out already
            if (meta.get("kv_cache"), meta.get("indexer_cache")) == (self.kv, self.indexer):
                return PassResult(g, False)
            raise GraphError(f"{self.name}: the caches are already {meta.get('kv_cache')}/"
                             f"{meta.get('indexer_cache')}; re-laying them out as {self.kv}/{self.indexer} "
                             "needs the unquantised graph")
        root = _roots(g)
        rope_dims = {n.attr["rope_dim"] for n in g.nodes if "rope_dim" in n.attr}
        if len(rope_dims) > 1:
            raise GraphError(f"{self.name}: layers disagree on the RoPE width {sorted(rope_dims)}")
        kv_rope = rope_dims.pop() if rope_dims else 0
        caches = {root[v] for n in g.nodes for _, v in operands_with_role(n, "cache")}
        decls = dict(g.state_decls)
        by_kind = {"window": self.kv, "compressed_rows": self.kv, "indexer_keys": self.indexer}
        new_states, fmt_of = [], {}
        for s, t in g.states:
            fmt = by_kind.get(decls[s].kind) if s in caches else None
            if fmt is None or (fmt in PLAIN and fmt == t.dtype):
                new_states.append((s, t))
                continue
            d = t.shape[-1]
            if fmt == "fp8_ds" and (not kv_rope or (d - kv_rope) % 8):
                raise GraphError(f"state {s}: fp8_ds needs RoPE dims and 8-aligned nope dims (d={d}, rope={kv_rope})")
            fmt_of[s] = fmt
            new_states.append((s, TensorType((*t.shape[:-1], stored_width(d, fmt, kv_rope)), stored_dtype(fmt, t.dtype))))
        if not fmt_of:
            return PassResult(g, False)
        types = dict(g.inputs) | dict(g.params) | dict(new_states)
        nodes = []
        for n in g.nodes:
            attrs, key = n.attr, get_op(n.op).cache_format
            for _, v in operands_with_role(n, "cache"):
                if root[v] in fmt_of:
                    attrs[key] = fmt = fmt_of[root[v]]
                    if key == "kv_format":  # fp8_ds rows keep their RoPE dims in bf16
                        attrs["kv_rope_dim"] = kv_rope if fmt == "fp8_ds" else 0
            node = Node.make(n.op, n.inputs, n.outputs, (), attrs)
            out = get_op(n.op).infer([types[v] for v in n.inputs], node.attr)
            types.update(zip(n.outputs, out))
            nodes.append(Node(n.op, n.inputs, n.outputs, tuple(out), node.attrs))
        meta = dict(g.meta) | {"kv_cache": self.kv, "indexer_cache": self.indexer}
        state_decls = tuple((s, StateDecl(d.kind, fmt_of.get(s, d.format))) for s, d in g.state_decls)
        return PassResult(g.replace(states=tuple(new_states), nodes=tuple(nodes), meta=tuple(sorted(meta.items())),
                                    state_decls=state_decls), True)
