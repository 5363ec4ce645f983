"""Writes small checkpoints in the official release's quantised format, from float weights (no download needed).

As the release stores them (spec B.3): attention linears, the indexer's query projection and the shared
experts FP8 e4m3 with one UE8M0 scale per 128x128 block; routed experts MXFP4 (e2m1 packed two per
byte along the input dim, one UE8M0 scale per 32 inputs) per expert; LM head, router, compressor
projections, indexer head weights, norms and the embedding bf16; sinks, position biases, routing
bias and mHC params fp32; ``tid2eid`` int64. Two namings:

* ``official``: ``layers.N.attn.wq_a.weight`` + ``layers.N.attn.wq_a.scale``, per-expert ``w1/w2/w3``;
* ``hf``: transformers' names, ``...q_a_proj.weight`` + ``...q_a_proj.weight_scale_inv``, stacked experts.

``dequantised`` returns what each graph param holds after decoding, computed here independently of
v4c's decoder (bit patterns read by hand), for bit-exact comparisons.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from official_names import official_name
from v4c.graph.weight_formats import quantize_fp8_block, quantize_mxfp4
from v4c.io.safetensors import write_safetensors

FP8 = re.compile(r"^(model\.layers\.\d+|mtp\.0)\.(self_attn\.(q_a_proj|q_b_proj|kv_proj|o_a_proj|o_b_proj)"
                 r"|self_attn\.compressor\.indexer\.q_b_proj|mlp\.shared_experts\.(gate_proj|up_proj|down_proj))"
                 r"\.weight$|^mtp\.0\.(e_proj|h_proj)\.weight$")  # the MTP block's as a layer's, and its e/h_proj
EXPERTS = re.compile(r"^(model\.layers\.\d+|mtp\.0)\.mlp\.experts\.(gate_up_proj|down_proj)$")
F32 = re.compile(r"(sinks|position_bias|e_score_correction_bias|_hc\.(fn|base|scale)|hc_head\.hc_(fn|base|scale))$")

HUB_QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
             "weight_block_size": [128, 128]}

def _decode_e8m0(s: torch.Tensor) -> torch.Tensor:
    return torch.pow(2.0, s.view(torch.uint8).double() - 127).float()  # exact for every finite byte


_FP4 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def decode_fp8(data: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = data.shape
    s = _decode_e8m0(scale)
    rows = torch.arange(n) // 128
    cols = torch.arange(k) // 128
    return data.float() * s[rows][:, cols]


def decode_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    u = packed.view(torch.uint8).long()
    codes = torch.stack([u & 15, u >> 4], dim=-1).flatten(-2)  # element 2j low nibble, 2j+1 high
    table = torch.tensor(_FP4 + [-v for v in _FP4])
    vals = table[codes]
    return vals * _decode_e8m0(scale).repeat_interleave(32, dim=-1)


def _expert_prefix(name: str) -> str:
    """``layers.N`` (or ``mtp.0``) for a stacked expert param of layer N (of the MTP block)."""
    return "mtp.0" if name.startswith("mtp.0.") else f"layers.{name.split('.')[2]}"


def _release_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    if not t.is_floating_point():
        return t.to(torch.int64)
    return t.float() if F32.search(name) else t.to(torch.bfloat16)


def write_official_checkpoint(params: dict[str, torch.Tensor], config: dict, directory, naming: str = "official",
                              shards: int = 1, expert_format: str = "mxfp4", quantize_experts: bool = True):
    """Write ``config.json`` (with the hub's ``quantization_config``) and the quantised ``params`` (graph names,
    float values) into ``directory``. Returns (directory, graph name -> float32 value each param decodes to)."""
    if naming not in ("official", "hf"):
        raise ValueError(naming)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}

    def put(graph: str, official: str, t: torch.Tensor):
        tensors[official if naming == "official" else graph] = t

    for name, w in params.items():
        if FP8.match(name):
            data, scale = quantize_fp8_block(w)
            deq[name] = decode_fp8(data, scale)
            base = official_name(name)[:-len(".weight")]
            put(name, base + ".weight", data)
            put(name + "_scale_inv", base + ".scale", scale)
        elif EXPERTS.match(name) and quantize_experts:
            stacked_parts = []
            layer = _expert_prefix(name)
            parts = (("w1", "w3") if name.endswith("gate_up_proj") else ("w2",))
            if naming == "hf":
                data, scale = quantize_mxfp4(w)
                tensors[name], tensors[name + "_scale_inv"] = data, scale
                deq[name] = decode_mxfp4(data, scale)
                continue
            for e in range(w.shape[0]):
                chunks = w[e].chunk(len(parts))
                rows = []
                for part, c in zip(parts, chunks):
                    data, scale = quantize_mxfp4(c)
                    tensors[f"{layer}.ffn.experts.{e}.{part}.weight"] = data
                    tensors[f"{layer}.ffn.experts.{e}.{part}.scale"] = scale
                    rows.append(decode_mxfp4(data, scale))
                stacked_parts.append(torch.cat(rows))
            deq[name] = torch.stack(stacked_parts)
        else:
            t = _release_dtype(name, w)
            deq[name] = t.float() if t.is_floating_point() else t
            if EXPERTS.match(name):  # unquantised experts: only the HF naming stacks them
                if naming == "hf":
                    tensors[name] = t
                else:
                    layer = _expert_prefix(name)
                    parts = ("w1", "w3") if name.endswith("gate_up_proj") else ("w2",)
                    for e in range(t.shape[0]):
                        for part, c in zip(parts, t[e].chunk(len(parts))):
                            tensors[f"{layer}.ffn.experts.{e}.{part}.weight"] = c.clone()
            else:
                put(name, official_name(name) if naming == "official" else name, t)
    if naming == "official" and not any(n.startswith("mtp.") for n in params):
        # the release ships an MTP block; a stray tensor of one is an incomplete block, compiled without it
        data, scale = quantize_fp8_block(torch.ones(4, 4))
        tensors["mtp.0.attn.wq_a.weight"], tensors["mtp.0.attn.wq_a.scale"] = data, scale
    cfg = dict(config, quantization_config=dict(HUB_QUANT), expert_dtype="fp4" if expert_format == "mxfp4" else "fp8")
    (directory / "config.json").write_text(json.dumps(cfg, indent=1) + "\n")
    _write(tensors, directory, shards)
    return directory, deq


def _write(tensors: dict, directory: Path, shards: int) -> None:
    names = sorted(tensors)
    if shards == 1:
        write_safetensors(directory / "model.safetensors", tensors)
        return
    wmap = {}
    for i in range(shards):
        part = names[i::shards]
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(directory / fname, {n: tensors[n] for n in part})
        wmap.update({n: fname for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
