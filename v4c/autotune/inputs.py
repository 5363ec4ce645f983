"""Well-formed random inputs for one node of a graph, for measuring its kernel: positions at the
end of the context, a ring holding the last window, caches of valid encoded rows, and integer
inputs another op computes (top-k indices, expert permutations) taken from that op's reference."""
from __future__ import annotations

import torch

from ..graph.ir import Graph, Node
from ..graph.registry import get_op
from ..graph.storage import encode
from ..graph.types import DTYPES, QUANT_DTYPES
from ..graph.weight_formats import FORMATS
from ..graph.weights import QuantizedWeight


def _random(graph: Graph, node: Node, bind: dict, context: int, device, gen) -> list[torch.Tensor]:
    types = graph.value_types()
    b, t = bind["B"], bind["T"]
    out = []
    for v in node.inputs:
        ty = types[v]
        shape = ty.concrete(bind)
        if v == "pos":
            x = torch.arange(context - t, context, device=device).repeat(b, 1)
        elif v == "ids":
            x = torch.randint(0, 1000, shape, device=device, generator=gen)
        elif v.endswith("win_pos"):
            w = shape[1]
            last = torch.arange(max(0, context - t - w), context - t, device=device)
            x = torch.full(shape, -1, dtype=torch.int64, device=device)
            x[:, last % w] = last
        elif ty.dtype in QUANT_DTYPES:  # random codes and scales as the checkpoint stores them
            x = _random_quantized(ty.dtype, shape, device, gen)
        elif ty.dtype in ("i64", "i32"):
            x = torch.randint(0, 2, shape, device=device, generator=gen)
        elif ty.dtype == "u8":  # an encoded cache: encode random rows of the logical width
            fmt = node.attr.get("kv_format") or node.attr.get("key_format") or node.attr.get("store")
            rope = node.attr.get("kv_rope_dim") or node.attr.get("rope_dim") or 0
            d = {"fp8_ds": None, "fp8": shape[-1] - 4, "mxfp4": shape[-1] * 32 // 17}[fmt]
            if d is None:  # fp8_ds width -> logical width: n + 2r + n/64 rounded up to 8
                d = next(x for x in range(shape[-1] * 2, 0, -1) if _kv_width(x, rope) == shape[-1])
            x = encode(torch.randn(*shape[:-1], d, device=device, generator=gen), fmt, rope)
        else:
            x = torch.randn(shape, device=device, generator=gen)
            if len(shape) >= 2 and v.startswith(("model.", "lm_head")):
                x = x * shape[-1] ** -0.5
            x = x.to(DTYPES[ty.dtype])
        out.append(x)
    return out


def _random_quantized(fmt: str, shape, device, gen) -> QuantizedWeight:
    """Random codes (e4m3 bytes without the NaN codes, or any e2m1 pairs) with scales near 2**-4, drawn
    directly in the stored form: a full-precision copy of an expert stack would not fit in memory."""
    f = FORMATS[fmt]
    raw = torch.randint(0, 256, f.storage_shape(shape), dtype=torch.int32, device=device, generator=gen)
    if fmt == "f8e4m3":
        raw = torch.where((raw & 0x7F) == 0x7F, raw - 1, raw)  # 0x7f / 0xff are NaN
        data = raw.to(torch.uint8).view(torch.float8_e4m3fn)
    else:
        data = raw.to(torch.uint8).view(torch.int8)
    scale = torch.randint(120, 124, f.scale_shape(shape), dtype=torch.int32, device=device, generator=gen)
    return QuantizedWeight(fmt, data, scale.to(torch.uint8).view(DTYPES["e8m0"]))


def _kv_width(d: int, rope: int) -> int:
    from ..graph.quant import kv_row_bytes
    try:
        return kv_row_bytes(d, rope)
    except ValueError:
        return -1


def node_inputs(graph: Graph, node: Node, bind: dict, context: int, device="cpu", seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    producer = {o: p for p in graph.nodes for o in p.outputs}
    types = graph.value_types()
    derived = {}
    for v in node.inputs:
        p = producer.get(v)
        if p is not None and types[v].dtype == "i64" and not get_op(p.op).state_io:
            outs = get_op(p.op).ref(*_random(graph, p, bind, context, device, gen), **p.attr)
            derived.update(zip(p.outputs, outs if isinstance(outs, tuple) else (outs,)))
    own = _random(graph, node, bind, context, device, gen)
    return [derived.get(v, x) for v, x in zip(node.inputs, own)]
