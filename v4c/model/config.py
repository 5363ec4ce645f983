"""``V4Config``: the single normalised form of a DeepSeek-V4 model config.

``V4Config.from_dict`` reads the three spellings found in the wild:

* Hugging Face transformers 5.24 (``DeepseekV4Config`` kwargs or its ``to_dict()``): ``layer_types``,
  ``mlp_layer_types``, ``compress_rates``, ``partial_rotary_factor``, ``rope_parameters`` (flat, or
  nested ``{"main": ..., "compress": ...}``);
* the official ``inference/config.json`` (``ModelArgs`` names: ``dim``, ``n_layers``, ``n_heads``,
  ``window_size``, ``compress_ratios``, ``original_seq_len``/``rope_factor``, ...);
* the released hub ``config.json``: HF names plus ``compress_ratios`` (one trailing MTP entry),
  ``num_hash_layers``, ``qk_rope_head_dim`` and a ``rope_scaling`` block.

Keys that are absent take transformers' ``DeepseekV4Config`` defaults (the V4-Flash numbers), except the
attention schedule: HF's default is shifted by one layer from the real one (spec A.11 item 7), so the
default here is the real V4-Pro pattern. Unknown keys are ignored; bad values of known keys raise
``ConfigError`` naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

SLIDING, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
LAYER_KINDS = (SLIDING, CSA, HCA)
HASH_MOE, MOE = "hash_moe", "moe"
MLP_KINDS = (HASH_MOE, MOE)
_NO_SCALING = (None, "default", "none")


# Upper bounds on sizes: far above the largest release (V4-Pro: hidden 7168, 61 layers, 128 heads, 384
# experts, 1M context), so real models pass with headroom, while configs that can never run (10**9 layers,
# a 10**12-token window) fail here instead of growing memory without end while the graph is built.
MAX_CONTEXT = 1 << 24
LIMITS = {
    "vocab_size": 1 << 24, "hidden_size": 1 << 16, "num_hidden_layers": 1024, "num_attention_heads": 1024,
    "head_dim": 4096, "q_lora_rank": 1 << 16, "o_groups": 1024, "o_lora_rank": 1 << 16,
    "n_routed_experts": 1 << 14, "n_shared_experts": 64, "moe_intermediate_size": 1 << 16,
    "index_n_heads": 1024, "index_head_dim": 4096, "hc_mult": 64, "hc_sinkhorn_iters": 1000,
    "max_position_embeddings": MAX_CONTEXT, "num_nextn_predict_layers": 64,
}
# bounded by the model's own context instead: a window or top-k longer than any sequence never fills
WITHIN_CONTEXT = ("sliding_window", "index_topk", "csa_ratio", "hca_ratio")

# messages quote user values: bounded in length and depth (a deeply nested list would overflow repr)
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 80, 80, 8, 8


def _show(v) -> str:
    return _REPR.repr(v)


# -- scalar checks (shared by V4Config, RopeScaling and the parser) --------------------------------------
def _int(name: str, v, minimum: int | None = None, maximum: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):  # bool is an int subclass; reject it
        raise ConfigError(f"{name}: expected an integer, got {_show(v)}")
    if minimum is not None and v < minimum:
        raise ConfigError(f"{name}: must be >= {minimum}, got {v}")
    if maximum is not None and v > maximum:
        raise ConfigError(f"{name}: {v} exceeds the limit of {maximum}")
    return v


def _float(name: str, v, positive: bool = True) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"{name}: expected a finite number, got {_show(v)}")
    if v < 0 or (positive and v == 0):
        raise ConfigError(f"{name}: must be {'> 0' if positive else '>= 0'}, got {v}")
    return float(v)


def _set(obj, name, value):
    object.__setattr__(obj, name, value)  # normalising a frozen dataclass in __post_init__


@dataclass(frozen=True)
class RopeScaling:
    """YaRN on the compressed (CSA/HCA) layers. V4 applies no attention-magnitude (mscale) factor."""
    type: str
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0

    def __post_init__(self):
        if self.type != "yarn":
            raise ConfigError(f"rope_scaling.type: {_show(self.type)} is not supported (only 'yarn' or no scaling)")
        _set(self, "factor", _float("rope_scaling.factor", self.factor))
        _int("rope_scaling.original_max_position_embeddings", self.original_max_position_embeddings, 1, MAX_CONTEXT)
        _set(self, "beta_fast", _float("rope_scaling.beta_fast", self.beta_fast))
        _set(self, "beta_slow", _float("rope_scaling.beta_slow", self.beta_slow))


@dataclass(frozen=True)
class V4Config:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    head_dim: int
    rope_head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    routed_scaling_factor: float
    scoring_func: str
    swiglu_limit: float
    norm_topk_prob: bool
    layer_types: tuple[str, ...]      # main stack only; the MTP block is always sliding
    mlp_layer_types: tuple[str, ...]
    csa_ratio: int = 4
    hca_ratio: int = 128
    sliding_window: int = 128
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_scaling: RopeScaling | None = None   # compressed layers only; sliding layers use plain RoPE
    max_position_embeddings: int = 1048576
    num_nextn_predict_layers: int = 1
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    # -- validation ----------------------------------------------------------------------------------
    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                  "rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
                  "num_experts_per_tok", "moe_intermediate_size", "sliding_window", "index_n_heads",
                  "index_head_dim", "index_topk", "hc_mult", "hc_sinkhorn_iters", "max_position_embeddings"):
            _int(f, getattr(self, f), 1, LIMITS.get(f))
        for f in ("n_shared_experts", "num_nextn_predict_layers"):
            _int(f, getattr(self, f), 0, LIMITS[f])
        for f in ("csa_ratio", "hca_ratio"):
            _int(f, getattr(self, f), 2)
        for f in WITHIN_CONTEXT:
            if getattr(self, f) > self.max_position_embeddings:
                raise ConfigError(f"{f}: {getattr(self, f)} exceeds max_position_embeddings="
                                  f"{self.max_position_embeddings} (the longest sequence the model takes)")
        # swiglu_limit 0 means "no clamp" in the official code but "clamp to 0" in HF: refuse it
        for f in ("routed_scaling_factor", "swiglu_limit", "rms_norm_eps", "rope_theta", "compress_rope_theta"):
            _set(self, f, _float(f, getattr(self, f)))
        _set(self, "hc_eps", _float("hc_eps", self.hc_eps, positive=False))
        for f in ("bos_token_id", "eos_token_id"):
            if getattr(self, f) is not None:
                _int(f, getattr(self, f), 0)
        if self.scoring_func != "sqrtsoftplus":
            raise ConfigError(f"scoring_func: {_show(self.scoring_func)} is not supported (DeepSeek-V4 uses 'sqrtsoftplus')")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError(f"norm_topk_prob: expected true/false, got {_show(self.norm_topk_prob)}")
        if not self.norm_topk_prob:  # every V4 release renormalises the selected weights
            raise ConfigError("norm_topk_prob: false is not supported (DeepSeek-V4 renormalises top-k weights)")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ConfigError(f"rope_scaling: expected a RopeScaling or None, got {_show(self.rope_scaling)}")
        self._check_schedule("layer_types", LAYER_KINDS)
        self._check_schedule("mlp_layer_types", MLP_KINDS)

        width = self.num_attention_heads * self.head_dim
        if width % self.o_groups:
            raise ConfigError(f"o_groups: num_attention_heads*head_dim={width} is not divisible by o_groups={self.o_groups}")
        r = self.rope_head_dim
        if r % 2:
            raise ConfigError(f"rope_head_dim: must be even (RoPE rotates pairs), got {r}")
        if r > self.head_dim:
            raise ConfigError(f"rope_head_dim: {r} exceeds head_dim={self.head_dim}")
        if CSA in self.layer_types and r > self.index_head_dim:  # the indexer rotates its last r dims
            raise ConfigError(f"rope_head_dim: {r} exceeds index_head_dim={self.index_head_dim} (needed by the CSA indexer)")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok: {self.num_experts_per_tok} exceeds n_routed_experts={self.n_routed_experts}")
        if self.csa_ratio == self.hca_ratio:
            raise ConfigError(f"csa_ratio: equals hca_ratio={self.hca_ratio}; the two kinds must differ")

    def _check_schedule(self, name: str, kinds: tuple[str, ...]):
        v = getattr(self, name)
        if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of strings, got {_show(v)}")
        v = tuple(v)
        _set(self, name, v)
        for i, k in enumerate(v):
            if k not in kinds:
                raise ConfigError(f"{name}[{i}]: unknown kind {_show(k)}; expected one of {', '.join(kinds)}")
        if len(v) != self.num_hidden_layers:
            raise ConfigError(f"{name}: {len(v)} entries but num_hidden_layers={self.num_hidden_layers}")

    # -- queries -------------------------------------------------------------------------------------
    def layer_ratio(self, i: int) -> int:
        """Compression ratio of layer ``i``: 0 (sliding), ``csa_ratio`` or ``hca_ratio``."""
        return {SLIDING: 0, CSA: self.csa_ratio, HCA: self.hca_ratio}[self.layer_types[i]]

    @property
    def n_hash_layers(self) -> int:
        return sum(k == HASH_MOE for k in self.mlp_layer_types)

    def replace(self, **kw) -> V4Config:
        """A re-validated copy with some fields changed."""
        unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"{sorted(unknown)[0]}: not a V4Config field")
        return dataclasses.replace(self, **kw)

    # -- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """Canonical Hugging Face spelling; ``DeepseekV4Config(**d)`` and ``V4Config.from_dict(d)`` both accept it."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        rs = d.pop("rope_scaling")
        for f in ("csa_ratio", "hca_ratio"):
            del d[f]
        rope = d.pop("rope_head_dim")
        d.update(
            model_type="deepseek_v4",
            num_key_value_heads=1,
            qk_rope_head_dim=rope,
            partial_rotary_factor=rope / self.head_dim,
            layer_types=list(self.layer_types),
            mlp_layer_types=list(self.mlp_layer_types),
            compress_rates={CSA: self.csa_ratio, HCA: self.hca_ratio},
            rope_parameters=None if rs is None else {
                "rope_type": "yarn", "factor": rs.factor,
                "original_max_position_embeddings": rs.original_max_position_embeddings,
                "beta_fast": rs.beta_fast, "beta_slow": rs.beta_slow},
        )
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> V4Config:
        if not isinstance(d, Mapping):
            raise ConfigError(f"config: expected a JSON object, got {type(d).__name__}")
        try:
            return cls(**_normalise(d))
        except RecursionError:  # comparing or quoting a value nested thousands deep; real configs nest 3 levels
            raise ConfigError("config: values nested too deeply to be a model config") from None

    @classmethod
    def from_json_file(cls, path) -> V4Config:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config ({e.strerror or e})") from e
        except ValueError as e:
            raise ConfigError(f"{p}: config is not valid JSON ({e})") from e
        except RecursionError:  # the JSON decoder recurses per nesting level
            raise ConfigError(f"{p}: config is not a model config (JSON nested too deeply to read)") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from e


# -- parsing the three spellings ---------------------------------------------------------------------------
_MISSING = object()

# field -> other spellings (official ModelArgs / legacy HF), in order of preference
_ALIASES = {
    "hidden_size": ("dim",),
    "num_hidden_layers": ("n_layers",),
    "num_attention_heads": ("n_heads",),
    "num_experts_per_tok": ("n_activated_experts",),
    "moe_intermediate_size": ("moe_inter_dim",),
    "routed_scaling_factor": ("route_scale",),
    "scoring_func": ("score_func",),
    "sliding_window": ("window_size",),
    "rms_norm_eps": ("norm_eps",),
    "num_nextn_predict_layers": ("n_mtp_layers",),
}
_PLAIN = ("vocab_size", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
          "n_shared_experts", "swiglu_limit", "norm_topk_prob", "index_n_heads", "index_head_dim",
          "index_topk", "hc_mult", "hc_sinkhorn_iters", "hc_eps")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(V4Config) if f.default is not dataclasses.MISSING}
_DEFAULTS.update(vocab_size=129280, hidden_size=4096, num_hidden_layers=43, num_attention_heads=64, head_dim=512,
                 q_lora_rank=1024, o_groups=8, o_lora_rank=1024, n_routed_experts=256, n_shared_experts=1,
                 num_experts_per_tok=6, moe_intermediate_size=2048, routed_scaling_factor=1.5,
                 scoring_func="sqrtsoftplus", swiglu_limit=10.0, norm_topk_prob=True)

# known keys whose other values describe a model V4 is not (or v4c cannot run)
_FIXED = {"model_type": "deepseek_v4", "num_key_value_heads": 1, "tie_word_embeddings": False,
          "attention_bias": False, "mlp_bias": False, "hidden_act": "silu"}
_AT_MOST = {"n_group": 1, "n_expert_groups": 1, "first_k_dense_replace": 0, "n_dense_layers": 0}


def _pick(d: Mapping, *keys, default=_MISSING):
    """First non-null value among ``keys``; every spelling given must agree."""
    found = [(k, d[k]) for k in keys if d.get(k) is not None]
    for k, v in found[1:]:
        if v != found[0][1]:
            raise ConfigError(f"{keys[0]}: conflicting values {found[0][0]}={_show(found[0][1])} and {k}={_show(v)}")
    return found[0][1] if found else default


def _check_fixed(d: Mapping):
    for k, want in _FIXED.items():
        v = d.get(k)
        if v is not None and (type(v) is not type(want) or v != want):
            raise ConfigError(f"{k}: {_show(v)} is not supported for DeepSeek-V4 (expected {want!r})")
    for k, most in _AT_MOST.items():
        v = d.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v > most):
            raise ConfigError(f"{k}: {_show(v)} is not supported for DeepSeek-V4 (at most {most})")


def _normalise(d: Mapping) -> dict:
    _check_fixed(d)
    out = {f: _pick(d, f, default=_DEFAULTS[f]) for f in _PLAIN}
    for f, alts in _ALIASES.items():
        out[f] = _pick(d, f, *alts, default=_DEFAULTS[f])
    # official max_seq_len is a runtime context cap: only a fallback, never a conflict
    out["max_position_embeddings"] = _pick(d, "max_position_embeddings", default=None)
    if out["max_position_embeddings"] is None:
        out["max_position_embeddings"] = _pick(d, "max_seq_len", default=_DEFAULTS["max_position_embeddings"])
    for f in ("bos_token_id", "eos_token_id"):  # null is a real value here
        v = d.get(f, _DEFAULTS[f])
        if isinstance(v, list):  # HF allows a list of EOS ids; one is all v4c can use
            if len(v) != 1:
                raise ConfigError(f"{f}: a list of {len(v)} ids is not supported (need exactly one)")
            v = v[0]
        out[f] = v
    # bounded before the per-layer schedules are built from it
    n = _int("num_hidden_layers", out["num_hidden_layers"], 1, LIMITS["num_hidden_layers"])
    out["layer_types"], out["csa_ratio"], out["hca_ratio"] = _attention_schedule(d, n)
    out["mlp_layer_types"] = _mlp_schedule(d, n)
    out.update(_rope(d, _int("head_dim", out["head_dim"], 1)))
    return out


def _compress_rates(d: Mapping) -> tuple[int | None, int | None]:
    """(csa, hca) from ``compress_rates`` or HF's legacy ``compress_rate_csa/hca`` (None where not given)."""
    rates = d.get("compress_rates")
    if rates is None:
        rates = {}
    elif not isinstance(rates, Mapping) or set(rates) - {CSA, HCA}:
        raise ConfigError(f"compress_rates: expected {{{CSA!r}: int, {HCA!r}: int}}, got {_show(rates)}")
    return tuple(_pick({"compress_rates": rates.get(kind), legacy: d.get(legacy)}, "compress_rates", legacy, default=None)
                 for kind, legacy in ((CSA, "compress_rate_csa"), (HCA, "compress_rate_hca")))


def _attention_schedule(d: Mapping, n: int) -> tuple[tuple, int, int]:
    """(layer_types, csa_ratio, hca_ratio): explicit layer_types > compress_ratios > real Pro pattern."""
    csa, hca = _compress_rates(d)
    lt = d.get("layer_types")
    ratios = d.get("compress_ratios")
    if lt is None and ratios is not None:
        if isinstance(ratios, (str, bytes)) or not isinstance(ratios, (list, tuple)):
            raise ConfigError(f"compress_ratios: expected a list of integers, got {_show(ratios)}")
        if len(ratios) < n:
            raise ConfigError(f"compress_ratios: {len(ratios)} entries but num_hidden_layers={n} "
                              "(need one per layer, plus an optional trailing MTP entry)")
        ratios = [_int(f"compress_ratios[{i}]", r, 0) for i, r in enumerate(ratios)][:n]  # drop the MTP entry
        if csa is None:
            csa = 4  # the official code keys CSA (overlap + indexer) on ratio == 4
        if hca is None:  # infer the HCA ratio from the list itself
            others = sorted({r for r in ratios if r not in (0, csa)})
            if len(others) > 1:
                raise ConfigError(f"compress_ratios: more than one heavily-compressed ratio {others}")
            hca = others[0] if others else 128
        kind = {0: SLIDING, csa: CSA, hca: HCA}
        for i, r in enumerate(ratios):
            if r not in kind:
                raise ConfigError(f"compress_ratios[{i}]: {r} is none of 0, csa={csa}, hca={hca}")
        lt = tuple(kind[r] for r in ratios)
    elif lt is None:
        lt = tuple(HCA if i < 2 or i % 2 else CSA for i in range(n))  # 0,1 HCA; even>=2 CSA; odd>=3 HCA
    return lt, (4 if csa is None else csa), (128 if hca is None else hca)


def _mlp_schedule(d: Mapping, n: int):
    """explicit mlp_layer_types > first num_hash_layers are hash-routed (default 3)."""
    mt = d.get("mlp_layer_types")
    if mt is not None:
        return mt
    k = _int("num_hash_layers", _pick(d, "num_hash_layers", "n_hash_layers", default=3), 0)
    return tuple(HASH_MOE if i < k else MOE for i in range(n))


def _scaling(name: str, block) -> RopeScaling | None:
    """A rope_scaling / rope_parameters block -> RopeScaling (yarn) or None (plain RoPE)."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"{name}: expected an object, got {_show(block)}")
    kind = block.get("rope_type", block.get("type"))
    if kind in _NO_SCALING:
        return None
    if kind != "yarn":
        raise ConfigError(f"{name}.type: {_show(kind)} is not supported (only 'yarn' or no scaling)")
    # mscale / mscale_all_dim are ignored: V4 has no magnitude scaling. An explicit non-unit one is refused.
    if block.get("attention_factor", 1.0) != 1.0:
        raise ConfigError(f"{name}.attention_factor: {_show(block['attention_factor'])} is not supported (V4 uses 1.0)")
    if block.get("truncate", True) is not True:
        raise ConfigError(f"{name}.truncate: only the truncated (floor/ceil) YaRN ramp of V4 is supported")
    for k in ("factor", "original_max_position_embeddings"):
        if block.get(k) is None:
            raise ConfigError(f"{name}.{k}: missing from the yarn block")
    return RopeScaling("yarn", block["factor"], block["original_max_position_embeddings"],
                       block.get("beta_fast", 32.0), block.get("beta_slow", 1.0))


def _rope(d: Mapping, head_dim: int) -> dict:
    """rope_head_dim, rope_theta, compress_rope_theta, rope_scaling from whichever spelling is present."""
    thetas = {"rope_theta": d.get("rope_theta"), "compress_rope_theta": d.get("compress_rope_theta")}
    dims = [(k, d.get(k)) for k in ("qk_rope_head_dim", "rope_head_dim")]
    factors = [("partial_rotary_factor", d.get("partial_rotary_factor"))]
    rp = d.get("rope_parameters")
    if isinstance(rp, Mapping) and ("main" in rp or "compress" in rp):
        # HF's nested form: its values are what HF's rotary embeddings actually use
        main, comp = rp.get("main") or {}, rp.get("compress") or {}
        if _scaling("rope_parameters.main", main) is not None:
            raise ConfigError("rope_parameters.main: sliding layers use plain RoPE; scaling is not supported there")
        scaling = _scaling("rope_parameters.compress", comp)
        for key, block in (("rope_theta", main), ("compress_rope_theta", comp)):
            extra = block.get("rope_theta")
            if extra is not None and thetas[key] is not None and extra != thetas[key]:
                raise ConfigError(f"{key}: conflicting values {_show(thetas[key])} and rope_parameters={_show(extra)}")
            thetas[key] = extra if extra is not None else thetas[key]
        factors += [(f"rope_parameters.{s}.partial_rotary_factor", b.get("partial_rotary_factor"))
                    for s, b in (("main", main), ("compress", comp))]
    elif rp is not None:
        scaling = _scaling("rope_parameters", rp)  # flat: HF applies it to the compressed layers only
    elif d.get("rope_scaling") is not None:
        scaling = _scaling("rope_scaling", d["rope_scaling"])
    else:  # official spelling: YaRN is on iff original_seq_len > 0
        orig = _int("original_seq_len", d.get("original_seq_len", 0), 0)
        scaling = None if orig == 0 else RopeScaling(
            "yarn", d.get("rope_factor", 40.0), orig, d.get("beta_fast", 32.0), d.get("beta_slow", 1.0))
    for k, f in factors:
        if f is not None:
            r = _float(k, f) * head_dim
            if abs(r - round(r)) > 1e-6:
                raise ConfigError(f"{k}: {f}*head_dim={r} is not a whole number of dims")
            dims.append((k, int(round(r))))
    given = [(k, v) for k, v in dims if v is not None]
    for k, v in given[1:]:
        if v != given[0][1]:
            raise ConfigError(f"rope_head_dim: conflicting values {given[0][0]} -> {_show(given[0][1])}, {k} -> {_show(v)}")
    return {
        "rope_head_dim": given[0][1] if given else 64,
        "rope_theta": _DEFAULTS["rope_theta"] if thetas["rope_theta"] is None else thetas["rope_theta"],
        "compress_rope_theta": (_DEFAULTS["compress_rope_theta"] if thetas["compress_rope_theta"] is None
                                else thetas["compress_rope_theta"]),
        "rope_scaling": scaling,
    }
