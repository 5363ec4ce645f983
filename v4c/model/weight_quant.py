"""Which graph weights are quantised, and retyping a graph accordingly.

The official release stores the attention linears, the indexer's query projection and the shared
experts as FP8 with 128x128 UE8M0 block scales, and the routed experts as MXFP4 (``expert_dtype:
"fp4"``); everything else is bf16 or fp32 (spec B.3). With a checkpoint, its tensors' dtypes decide
(a weight stored as ``F8_E4M3`` becomes ``f8e4m3``, one stored as ``I8`` becomes ``mxfp4``); a
config-only compile follows the config's quantisation fields, so the real footprint can be seen
before downloading anything. Only params that ops use as GEMM weights can be quantised.
"""
from __future__ import annotations

import re
from typing import Mapping

from ..errors import ConfigError
from ..graph.ir import Graph
from ..graph.registry import operands_with_role
from ..graph.types import TensorType
from ..graph.weight_formats import FORMATS
from ..graph.weights import scale_name

# a layer's or the MTP block's (which also stores its e_proj / h_proj as FP8)
_RELEASE_FP8 = re.compile(r"^(model\.layers\.\d+|mtp\.\d+)\.(self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj)"
                          r"|self_attn\.compressor\.indexer\.q_b_proj"
                          r"|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))\.weight$"
                          r"|^mtp\.\d+\.(e_proj|h_proj)\.weight$")
_RELEASE_EXPERTS = re.compile(r"^(model\.layers\.\d+|mtp\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def weight_params(graph: Graph) -> list[str]:
    """Params some op multiplies by as a weight (the only ones that may be quantised), in declaration order."""
    params = dict(graph.params)
    used = {v for node in graph.nodes for _, v in operands_with_role(node, "weight", gemm=True) if v in params}
    return [n for n, _ in graph.params if n in used]


def release_formats(config: Mapping, graph: Graph) -> dict[str, str]:
    """Param -> format for the official release's layout, if the raw ``config`` says the weights are FP8."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping):
        method, fmt = qc.get("quant_method"), qc.get("fmt", "e4m3")
        block, scale_fmt = qc.get("weight_block_size"), qc.get("scale_fmt", config.get("scale_fmt"))
        if method != "fp8":
            raise ConfigError(f"quantization_config.quant_method: {method!r} is not supported (only 'fp8')")
    elif config.get("dtype") == "fp8":  # the official inference/config.json
        fmt, block, scale_fmt = "e4m3", None, config.get("scale_fmt")
    else:
        return {}
    if fmt != "e4m3":
        raise ConfigError(f"quantization_config.fmt: {fmt!r} is not supported (only 'e4m3')")
    if block is not None and list(block) != [128, 128]:
        raise ConfigError(f"quantization_config.weight_block_size: {block!r} is not supported (only [128, 128])")
    if scale_fmt not in (None, "ue8m0"):
        raise ConfigError(f"scale_fmt: {scale_fmt!r} is not supported (only 'ue8m0' power-of-two block scales)")
    experts = config.get("expert_dtype")
    if experts not in (None, "fp4", "fp8"):
        raise ConfigError(f"expert_dtype: {experts!r} is not supported (expected 'fp4' or 'fp8')")
    out = {}
    for n in weight_params(graph):
        if _RELEASE_FP8.match(n):
            out[n] = "f8e4m3"
        elif _RELEASE_EXPERTS.match(n):
            out[n] = "mxfp4" if experts == "fp4" else "f8e4m3"
    return out


_FROM_CHECKPOINT = {"F8_E4M3": "f8e4m3", "I8": "mxfp4"}


def checkpoint_formats(dtypes: Mapping[str, str], graph: Graph) -> dict[str, str]:
    """Param -> format from the checkpoint's dtypes (graph name -> safetensors code, ``naming.checkpoint_dtypes``)."""
    return {n: _FROM_CHECKPOINT[dtypes[n]] for n in weight_params(graph) if dtypes.get(n) in _FROM_CHECKPOINT}


def apply_formats(graph: Graph, formats: Mapping[str, str]) -> Graph:
    """``graph`` with each param in ``formats`` retyped to its quantised dtype and followed by its scale param."""
    if not formats:
        return graph
    params = []
    for n, t in graph.params:
        fmt = formats.get(n)
        if fmt is None:
            params.append((n, t))
            continue
        f = FORMATS[fmt]
        try:
            f.check_shape(t.shape, f"param {n}")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        params.append((n, TensorType(t.shape, fmt)))
        params.append((scale_name(n), TensorType(f.scale_shape(t.shape), "e8m0")))
    return graph.replace(params=tuple(params))


def quantized_graph(graph: Graph, config_path, checkpoint=None, part: str = "main") -> Graph:
    """``graph`` with the weight formats of ``checkpoint`` (a path; its dtypes decide) or, without one, of the
    release layout the config at ``config_path`` describes. ``part="mtp"``: ``graph`` is the MTP block's,
    whose params are its own tensors and the main graph's it shares."""
    import json
    from pathlib import Path

    from ..io.checkpoint import Checkpoint
    from ..io.naming import checkpoint_dtypes

    if checkpoint is not None:
        with Checkpoint.open(checkpoint) as ck:
            dtypes = checkpoint_dtypes(ck)
            if part != "main":
                dtypes.update(checkpoint_dtypes(ck, part))
            return apply_formats(graph, checkpoint_formats(dtypes, graph))
    return apply_formats(graph, release_formats(json.loads(Path(config_path).read_text()), graph))
