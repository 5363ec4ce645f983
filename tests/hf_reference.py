"""Hugging Face DeepSeek-V4 reference ("the oracle") for v4c tests.

transformers' ``DeepseekV4ForCausalLM`` (5.24) is the executable reference that v4c's compiled
runtime is compared against.  This helper module (imported by tests; it is not a test file) builds
tiny, deterministic, CPU-friendly HF models and runs them in the ways the tests need:

* ``VARIANTS``           -- tiny HF-spelling config dicts (kwargs for ``DeepseekV4Config``) that
                            together cover every layer kind, hash/top-k routing, YaRN and plain
                            RoPE on the compressed layers, ``hc_mult`` 4 and 2 (see ``VARIANTS``).
* ``make_config``        -- dict -> ``DeepseekV4Config`` (silences HF's harmless YaRN-factor warning).
* ``make_hf_model``      -- fp32 eval model with deterministic random weights in which every
                            parameter that HF initialises to 0/1 (sinks, position biases, mHC
                            base/scale, tid2eid, correction bias, RMSNorm weights) is non-trivial;
                            ``clamp_scale > 1`` inflates expert gate/up weights so the SwiGLU clamp
                            is actually hit.
* ``save_checkpoint``    -- HF-layout checkpoint directory (config.json + safetensors, optionally
                            sharded with an index), exactly the names of ``model.state_dict()``.
* ``hf_logits``          -- logits through HF's incremental cache (``DynamicCache``), fed in chunks.
* ``hf_logits_nocache``  -- logits of one ``use_cache=False`` forward.
* ``hf_greedy``          -- ``model.generate`` greedy decoding that never stops early.
* ``swiglu_clamp_counts``-- how many SwiGLU pre-activations exceed the limit in a forward.

Everything runs on CPU in float32 with eager attention and the eager (per-expert loop) MoE
implementation, i.e. exactly the code in ``modeling_deepseek_v4.py``.  No pickles are written.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM, DynamicCache

__all__ = [
    "VARIANTS",
    "make_config",
    "make_hf_model",
    "save_checkpoint",
    "hf_logits",
    "hf_logits_nocache",
    "hf_greedy",
    "swiglu_clamp_counts",
    "param_count",
]


# --------------------------------------------------------------------------------------------
# Silence the (harmless) YaRN warning: with an explicit `factor` HF complains that it differs from
# max_position_embeddings / original_max_position_embeddings; the explicit factor is used.
# --------------------------------------------------------------------------------------------
class _DropYarnFactorWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:  # noqa: A003
        return "explicitly set RoPE scaling factor" not in record.getMessage()


logging.getLogger("transformers.modeling_rope_utils").addFilter(_DropYarnFactorWarning())


# --------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------
_SWA = "sliding_attention"
_CSA = "compressed_sparse_attention"
_HCA = "heavily_compressed_attention"

_YARN = {
    "rope_type": "yarn",
    "factor": 16.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
}

#: Spec E.1 tiny config: all three layer kinds, hash + top-k MoE, hc_mult 4, YaRN on CSA/HCA.
_TINY = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "q_lora_rank": 128,
    "partial_rotary_factor": 16 / 64,
    "o_groups": 2,
    "o_lora_rank": 64,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "routed_scaling_factor": 1.5,
    "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True,
    "swiglu_limit": 10.0,
    "index_n_heads": 16,
    "index_head_dim": 32,
    "index_topk": 4,
    "sliding_window": 8,
    "compress_rates": {_CSA: 4, _HCA: 16},
    "layer_types": [_SWA, _CSA, _HCA, _CSA],
    "mlp_layer_types": ["hash_moe", "moe", "moe", "moe"],
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_parameters": dict(_YARN),
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
}

#: hc_mult 2, a CSA layer first (no sliding layer in front), two hash layers, small heads, more
#: output groups, smaller window / top-k / HCA ratio, top-3 of 6 experts, and non-default RoPE
#: bases and Sinkhorn iteration count (so nothing may be hard-coded).
_HC2 = {
    **copy.deepcopy(_TINY),
    "hidden_size": 128,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "head_dim": 32,
    "partial_rotary_factor": 8 / 32,
    "q_lora_rank": 64,
    "o_groups": 4,
    "o_lora_rank": 32,
    "n_routed_experts": 6,
    "num_experts_per_tok": 3,
    "index_n_heads": 16,
    "index_head_dim": 16,
    "index_topk": 3,
    "sliding_window": 6,
    "compress_rates": {_CSA: 4, _HCA: 8},
    "layer_types": [_CSA, _HCA, _SWA],
    "mlp_layer_types": ["hash_moe", "hash_moe", "moe"],
    "hc_mult": 2,
    "hc_sinkhorn_iters": 10,
    "rope_theta": 50000.0,
    "compress_rope_theta": 80000.0,
    "max_position_embeddings": 1024,
}

#: V4-Pro-like schedule (HCA first, no sliding layer, no hash layer), plain RoPE (no YaRN) on the
#: compressed layers, Pro's routed_scaling_factor 2.5, a non-default SwiGLU limit, larger top-k
#: and window.
_PRO_LIKE = {
    **copy.deepcopy(_TINY),
    "layer_types": [_HCA, _HCA, _CSA, _HCA],
    "mlp_layer_types": ["moe", "moe", "moe", "moe"],
    "routed_scaling_factor": 2.5,
    "swiglu_limit": 7.0,
    "index_topk": 6,
    "sliding_window": 12,
    "rope_parameters": None,
}

VARIANTS: dict[str, dict] = {
    # [SWA, CSA, HCA, CSA] / [hash, moe, moe, moe] / hc 4 / YaRN  -- spec E.1, 5.37 M params
    "tiny": _TINY,
    # [CSA, HCA, SWA] / [hash, hash, moe] / hc 2 / YaRN, W=6, 4x32 heads (rope 8), G=4, KI=3, m'=8
    "hc2": _HC2,
    # [HCA, HCA, CSA, HCA] / all moe / hc 4 / plain RoPE, gamma=2.5, limit 7, KI=6, W=12
    "pro_like": _PRO_LIKE,
}


# --------------------------------------------------------------------------------------------
# Model construction
# --------------------------------------------------------------------------------------------
def make_config(config: dict | DeepseekV4Config) -> DeepseekV4Config:
    """HF config from an HF-spelling dict (deep-copied; the dict is not modified)."""
    if isinstance(config, DeepseekV4Config):
        return copy.deepcopy(config)
    cfg = DeepseekV4Config(**copy.deepcopy(config))
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    return cfg


def param_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _normal(gen: torch.Generator, shape, std: float, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


@torch.no_grad()
def make_hf_model(config: dict | DeepseekV4Config, seed: int = 0, clamp_scale: float = 1.0) -> DeepseekV4ForCausalLM:
    """Deterministic fp32 eval-mode HF model (same ``config`` and ``seed`` -> bit-identical weights).

    Every parameter and persistent buffer is overwritten from a private ``torch.Generator`` (the
    global RNG state is left untouched), with scales chosen so that activations stay O(1):

    * 2-D projection weights (incl. ``gate_up_proj``/``down_proj`` per expert, mHC ``fn``):
      N(0, 1/fan_in) -> unit-variance outputs for unit-RMS inputs; embedding N(0, 1);
      ``lm_head`` N(0, 1/D) -> logits ~ N(0, 1).
    * RMSNorm weights 1 + N(0, 0.1); attention ``sinks`` N(0, 1); compressor / indexer
      ``position_bias`` N(0, 0.5); mHC ``base`` N(0, 0.5) and ``scale`` U(0.5, 1.5) (likewise
      ``hc_head.hc_base`` / ``hc_scale``); ``e_score_correction_bias`` N(0, 0.1);
      ``tid2eid`` = ``num_experts_per_tok`` distinct random experts per token.
    * ``clamp_scale`` multiplies routed-expert ``gate_up_proj`` and shared-expert ``gate_proj`` /
      ``up_proj`` weights; with e.g. 30 many SwiGLU pre-activations exceed ``swiglu_limit``.

    Any parameter or buffer not covered by these rules raises (so HF additions are noticed).
    """
    cfg = make_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DeepseekV4ForCausalLM(cfg)
    model = model.to(torch.float32).eval()
    gen = torch.Generator().manual_seed(int(seed))
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok

    persistent = dict(model.state_dict(keep_vars=True))
    for name, t in persistent.items():
        leaf = name.rsplit(".", 1)[-1]
        shape = tuple(t.shape)
        if name == "model.embed_tokens.weight":
            new = _normal(gen, shape, 1.0)
        elif name == "lm_head.weight":
            new = _normal(gen, shape, 1.0 / math.sqrt(shape[1]))
        elif leaf == "tid2eid":
            new = torch.rand((shape[0], E), generator=gen).argsort(dim=-1)[:, :k].to(t.dtype)
        elif leaf == "e_score_correction_bias":
            new = _normal(gen, shape, 0.1)
        elif leaf == "sinks":
            new = _normal(gen, shape, 1.0)
        elif leaf == "position_bias":
            new = _normal(gen, shape, 0.5)
        elif leaf in ("base", "hc_base"):
            new = _normal(gen, shape, 0.5)
        elif leaf in ("scale", "hc_scale"):
            new = 0.5 + torch.rand(shape, generator=gen)
        elif leaf == "weight" and name.endswith("norm.weight"):
            new = _normal(gen, shape, 0.1, mean=1.0)
        elif leaf in ("gate_up_proj", "down_proj") and ".mlp.experts." in name:
            new = _normal(gen, shape, 1.0 / math.sqrt(shape[-1]))
            if leaf == "gate_up_proj":
                new = new * clamp_scale
        elif leaf in ("fn", "hc_fn") or (leaf == "weight" and t.dim() == 2):
            new = _normal(gen, shape, 1.0 / math.sqrt(shape[-1]))
            if ".shared_experts." in name and (".gate_proj." in name or ".up_proj." in name):
                new = new * clamp_scale
        else:
            raise AssertionError(f"make_hf_model: no init rule for {name} {shape}")
        t.copy_(new.to(t.dtype))
    return model


# --------------------------------------------------------------------------------------------
# Checkpoint writing
# --------------------------------------------------------------------------------------------
def save_checkpoint(model: DeepseekV4ForCausalLM, config: dict, directory, shards: int = 1) -> Path:
    """Write an HF-layout checkpoint: ``config.json`` + safetensors (never pickle).

    ``config.json`` is ``config`` (the HF-spelling dict, unchanged) plus
    ``"architectures": ["DeepseekV4ForCausalLM"]`` and ``"model_type": "deepseek_v4"``.
    Tensor names are exactly those of ``model.state_dict()``.  ``shards == 1`` writes
    ``model.safetensors``; ``shards > 1`` splits the tensors (in state_dict order, balanced by
    bytes) into ``model-0000i-of-0000N.safetensors`` plus ``model.safetensors.index.json``
    ``{"metadata": {"total_size": bytes}, "weight_map": {name: file}}``.  Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = copy.deepcopy(dict(config))
    cfg["architectures"] = ["DeepseekV4ForCausalLM"]
    cfg["model_type"] = "deepseek_v4"
    (directory / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    state = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(state, str(directory / "model.safetensors"), metadata=meta)
        return directory

    names = list(state)
    shards = min(int(shards), len(names))
    nbytes = {n: state[n].numel() * state[n].element_size() for n in names}
    total = sum(nbytes.values())
    # Greedy contiguous split: start a new shard once the running total passes i/N of the bytes,
    # keeping at least one tensor for each remaining shard.
    groups: list[list[str]] = [[] for _ in range(shards)]
    running, shard = 0, 0
    for i, n in enumerate(names):
        remaining_names = len(names) - i
        remaining_shards = shards - shard - 1
        if groups[shard] and shard < shards - 1 and (
            running >= total * (shard + 1) / shards or remaining_names <= remaining_shards
        ):
            shard += 1
        groups[shard].append(n)
        running += nbytes[n]
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(directory / fname), metadata=meta)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return directory


# --------------------------------------------------------------------------------------------
# Running the reference
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def hf_logits(model: DeepseekV4ForCausalLM, ids: torch.LongTensor, chunks: list[int] | None = None) -> torch.Tensor:
    """Logits ``[B, T, V]`` (float32) through HF's incremental cache.

    A fresh ``DynamicCache(config=model.config)`` (window / CSA / HCA cache layers) is fed the
    chunk sizes in order (``sum(chunks) == T``; default ``[T]``); positions come from the cache
    length, no attention mask (all rows are the same length, no padding).  The per-chunk logits
    are concatenated.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    T = ids.shape[1]
    chunks = [T] if chunks is None else [int(c) for c in chunks]
    if sum(chunks) != T or any(c <= 0 for c in chunks):
        raise ValueError(f"chunks {chunks} must be positive and sum to T={T}")
    cache = DynamicCache(config=model.config)
    out, start = [], 0
    for c in chunks:
        res = model(input_ids=ids[:, start : start + c], cache=cache, use_cache=True)
        cache = res.cache if res.cache is not None else cache
        out.append(res.logits.float())
        start += c
    return torch.cat(out, dim=1)


@torch.no_grad()
def hf_logits_nocache(model: DeepseekV4ForCausalLM, ids: torch.LongTensor) -> torch.Tensor:
    """Logits ``[B, T, V]`` (float32) of one full forward with ``use_cache=False``."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    return model(input_ids=ids, use_cache=False).logits.float()


@torch.no_grad()
def hf_greedy(model: DeepseekV4ForCausalLM, ids: torch.LongTensor, max_new_tokens: int) -> torch.LongTensor:
    """Greedy ``model.generate`` output ``[B, T + max_new_tokens]`` (prompt included).

    Uses ``do_sample=False``, ``num_beams=1`` and an all-ones attention mask (rows have equal
    length; no padding tricks).  EOS is disabled by passing ``eos_token_id=None`` and
    ``pad_token_id=None`` as explicit keyword arguments (``None`` fields of a passed
    ``GenerationConfig`` object would be re-filled from ``model.generation_config``, whose
    eos_token_id is 1; explicit kwargs are not).  So generation never stops or pads on EOS, and no logits processor is installed -- in
    particular *not* ``min_new_tokens``, which would mask the EOS logit and change the argmax.
    Generation is one prefill call over the prompt followed by one-token decode steps through
    HF's ``DynamicCache``; the result equals a plain argmax-append loop over
    ``hf_logits_nocache`` (checked in tests/test_hf_reference.py, also with EOS set to a token
    that gets generated).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=None,
        use_cache=True,
    )
    if out.shape[1] != ids.shape[1] + max_new_tokens:
        raise AssertionError(f"generate stopped early: {tuple(out.shape)} for prompt {tuple(ids.shape)}")
    return out


@torch.no_grad()
def swiglu_clamp_counts(model: DeepseekV4ForCausalLM, ids: torch.LongTensor) -> dict[str, int]:
    """Run a no-cache forward and count SwiGLU pre-activations beyond ``swiglu_limit``.

    Returns ``{"routed_gate": n, "routed_up": n, "shared_gate": n, "shared_up": n, "total": n}``
    where *gate* counts values ``> limit`` and *up* counts ``|value| > limit`` (the values the
    clamp changes), for routed experts (only the tokens actually routed to them) and for the
    shared expert.  Hooks are removed afterwards.
    """
    counts = {"routed_gate": 0, "routed_up": 0, "shared_gate": 0, "shared_up": 0}
    limit = float(model.config.swiglu_limit)
    handles, patched = [], []

    def wrap_apply_gate(experts):
        orig = experts._apply_gate

        def _apply_gate(gate_up):
            gate, up = gate_up.chunk(2, dim=-1)
            counts["routed_gate"] += int((gate > limit).sum())
            counts["routed_up"] += int((up.abs() > limit).sum())
            return orig(gate_up)

        experts._apply_gate = _apply_gate
        patched.append(experts)

    def hook(key, absolute):
        def fn(_mod, _inp, out):
            counts[key] += int(((out.abs() if absolute else out) > limit).sum())

        return fn

    for layer in model.model.layers:
        wrap_apply_gate(layer.mlp.experts)
        handles.append(layer.mlp.shared_experts.gate_proj.register_forward_hook(hook("shared_gate", False)))
        handles.append(layer.mlp.shared_experts.up_proj.register_forward_hook(hook("shared_up", True)))
    try:
        hf_logits_nocache(model, ids)
    finally:
        for h in handles:
            h.remove()
        for experts in patched:
            del experts._apply_gate  # back to the class method
    counts["total"] = sum(counts.values())
    return counts
