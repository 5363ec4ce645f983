"""Deterministic random checkpoints, for the demo and for tests that need no download.

Parameters that real checkpoints train away from their neutral initial values
(attention sinks, compressor position biases, mHC bases and scales, routing
bias and hash table) get non-trivial values, so that every code path is live.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..graph.ir import Graph
from ..graph.types import DTYPES
from ..io.safetensors import write_safetensors
from .build import build_graph
from .config import V4Config


def random_params(graph: Graph, cfg: V4Config, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std=1.0, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    out = {}
    for name, t in graph.params:
        shape = tuple(t.shape)
        if name.endswith("tid2eid"):  # distinct experts per token
            v = torch.rand(shape[0], cfg.n_routed_experts, generator=gen).argsort(dim=-1)[:, :shape[1]]
        elif name.endswith(("norm.weight", "layernorm.weight")):
            v = normal(shape, 0.1, 1.0)
        elif name.endswith("sinks"):
            v = normal(shape)
        elif name.endswith("position_bias"):
            v = normal(shape, 0.5)
        elif name.endswith("e_score_correction_bias"):
            v = normal(shape, 0.1)
        elif name.endswith(("hc.base", "hc_base")):
            v = normal(shape, 0.5)
        elif name.endswith(("hc.scale", "hc_scale")):
            v = normal(shape, 0.2, 1.0)
        elif name.endswith("embed_tokens.weight"):
            v = normal(shape)
        else:  # a weight matrix [..., out, in]: unit-variance outputs
            v = normal(shape, shape[-1] ** -0.5)
        out[name] = v.to(DTYPES[t.dtype])
    return out


def write_random_checkpoint(config: dict, directory: str | Path, seed: int = 0, dtype: str = "f32",
                            mtp: bool = False) -> Path:
    """Write ``config.json`` and a ``model.safetensors`` of random weights into ``directory``; ``mtp``: with an
    MTP block (``mtp.0.*``, the graph's names), drawn after the main model's (which stay as without it)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = V4Config.from_dict(config)
    params = random_params(build_graph(cfg, dtype), cfg, seed)
    if mtp:
        from .mtp import build_mtp_graph
        block = random_params(build_mtp_graph(cfg, dtype), cfg, seed + 1)
        params.update({n: v for n, v in block.items() if n not in params})
    (directory / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    write_safetensors(directory / "model.safetensors", params)
    return directory
