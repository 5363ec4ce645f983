"""`v4c plan`: a deployment's layout, formats, batch and MTP depth for a serving profile, and what it gives
(memory per GPU, latency, throughput, cost), as plain JSON-ready data."""
from __future__ import annotations

from pathlib import Path

from .choose import PROFILES, candidate_specs, choose
from .devices import gpu as gpu_named
from .efficiency import efficiency_for
from .serving import Workload
from .source import load_model
from .sweep import sweep as run_sweep


def _ms(terms: dict) -> dict:
    return {k: v * 1e3 for k, v in terms.items()}


def make_plan(model, *, gpu, gpus: int, input_len: int, output_len: int, concurrency: int | None = None,
              sweep: bool = False, profile: str = "balanced", parallel: str | None = None,
              speculative: str | None = None, draft_tokens: int | None = None, accept_length: float | None = None,
              price_per_gpu_hour: float | None = None, disagg: bool = False, prefill_gpus: int | None = None,
              max_gpus: int | None = None, chunk_tokens: int = 4096, max_running: int | None = None,
              cuda_graphs: bool = True, results_dir: Path | None = None) -> dict:
    """The plan for ``model`` on ``gpus`` of ``gpu`` (a name or a ``devices.GPU``); the arguments are the
    CLI's. ``results_dir``: where gpu_check results are looked for (default: the checkout's)."""
    if sweep and concurrency is not None:
        raise ValueError("--sweep goes over the concurrency itself; leave out --concurrency")
    if price_per_gpu_hour is not None and not price_per_gpu_hour > 0:
        raise ValueError(f"--price-per-gpu-hour must be > 0, got {price_per_gpu_hour}")
    if (prefill_gpus is not None or max_gpus is not None) and not disagg:
        raise ValueError("--prefill-gpus and --max-gpus need --disagg")
    if prefill_gpus is not None and prefill_gpus < 1:
        raise ValueError(f"--prefill-gpus must be >= 1, got {prefill_gpus}")
    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    g = gpu_named(gpu) if isinstance(gpu, str) else gpu  # a name, or a devices.GPU row
    w = Workload(input_len, output_len, chunk_tokens, max_running)
    specs = candidate_specs(speculative, draft_tokens, accept_length)
    eff = efficiency_for(g, cuda_graphs, results_dir)
    src = load_model(model, g)
    if w.max_context > src.config.max_position_embeddings:
        raise ValueError(f"--input-len + --output-len = {w.max_context} tokens is beyond the model's maximum context "
                         f"of {src.config.max_position_embeddings}")
    choice = choose(profile, src, g, eff, w, gpus=gpus, parallel=parallel, concurrency=concurrency, specs=specs,
                    disagg=disagg, prefill_gpus=prefill_gpus, max_gpus=max_gpus)
    best, s = choice.best, choice.best.state
    out_tps = s.output_tokens_per_s_per_gpu
    cost = None if price_per_gpu_hour is None else price_per_gpu_hour * 1e6 / (3600 * out_tps)
    cost_all = None if price_per_gpu_hour is None else price_per_gpu_hour * 1e6 / (3600 * s.tokens_per_s_per_gpu)
    k = best.spec.draft_tokens
    result = {
        "model": str(src.path),
        "config": {"layers": src.config.num_hidden_layers, "hidden_size": src.config.hidden_size,
                   "experts": src.config.n_routed_experts, "experts_per_token": src.config.num_experts_per_tok},
        "gpu": {"key": g.key, "name": g.name, "memory_bytes": g.memory, "hbm_bytes_per_s": g.hbm,
                "flops_per_s": g.flops, "nvlink_bytes_per_s": g.nvlink, "network_bytes_per_s": g.network,
                "nvlink_domain": g.nvlink_domain},
        "gpus": gpus,
        "disaggregated": disagg,
        "prefill": best.prefill,
        "total_gpus": s.gpus,
        "profile": profile,
        "workload": {"input_len": input_len, "output_len": output_len, "chunk_tokens": w.prefill_chunk,
                     "max_running": max_running},
        # one instance's layout; ``replicas`` identical instances share the requests
        "layout": {"parallel": best.layout.parallel, "world_size": best.layout.world, "attn": best.layout.attn,
                   "ep": best.layout.experts_split, "replicas": best.replicas},
        "kv_cache_format": src.kv_cache,
        "indexer_cache_format": src.indexer_cache,
        "formats_from": src.formats_from,
        "speculative": {"method": "mtp" if k else None, "draft_tokens": k, "accept_length": best.spec.accept_length},
        "concurrency": best.concurrency,
        "max_concurrency": best.max_concurrency,
        "memory_per_gpu": best.memory,
        "ttft_ms": s.ttft_s * 1e3,
        "tpot_ms": s.tpot.seconds * 1e3,
        "tokens_per_s_per_user": s.tokens_per_s_per_user,
        "tokens_per_s_per_gpu": s.tokens_per_s_per_gpu,
        "output_tokens_per_s_per_gpu": out_tps,
        "cost_per_million_output_tokens": cost,
        "cost_per_million_tokens": cost_all,
        "price_per_gpu_hour": price_per_gpu_hour,
        "bounds": {"ttft_ms": s.ttft_bound, "tpot_ms": s.tpot.bound, "tokens_per_s_per_user": s.tpot.bound,
                   "tokens_per_s_per_gpu": s.throughput_bound, "cost_per_million_output_tokens": s.throughput_bound},
        "tpot_terms_ms": _ms(s.tpot.terms),
        "steady_state": {"decoding": s.decoding, "admitted": w.running(s.concurrency), "requests_per_s": s.requests_per_s,
                         "prefill_utilisation": s.prefill_utilisation},
        "efficiency": eff.to_json(),
        "cuda_graphs": cuda_graphs,
        "considered": [{"option": n, **({"score": v} if isinstance(v, float) else {"refused": v})}
                       for n, v in choice.considered],
    }
    if sweep:
        result["sweep"] = run_sweep(src, g, eff, w, gpus=gpus, parallel=parallel, specs=specs, disagg=disagg,
                                    prefill_gpus=prefill_gpus, max_gpus=max_gpus)
    return result
