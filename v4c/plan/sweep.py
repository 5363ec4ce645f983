"""The Pareto view: for each profile, its chosen layout and MTP depth at every concurrency (powers of two
up to what fits, and that limit), as tokens/s per user against tokens/s per GPU."""
from __future__ import annotations

from .choose import PROFILES, _concurrencies, choose


def pareto(points: list[dict]) -> list[dict]:
    """Marks each point ``pareto``: no other point is at least as fast per user and per GPU and faster in one."""
    for p in points:
        u, g = p["tokens_per_s_per_user"], p["tokens_per_s_per_gpu"]
        p["pareto"] = not any(q["tokens_per_s_per_user"] >= u and q["tokens_per_s_per_gpu"] >= g
                              and (q["tokens_per_s_per_user"] > u or q["tokens_per_s_per_gpu"] > g) for q in points)
    return points


def point(profile: str, opt) -> dict:
    s = opt.state
    return {"profile": profile, "concurrency": opt.concurrency, "parallel": opt.layout.parallel,
            "replicas": opt.replicas,
            "draft_tokens": opt.spec.draft_tokens, "accept_length": opt.spec.accept_length,
            "prefill_gpus": opt.prefill["gpus"] if opt.prefill else None, "gpus": s.gpus,
            "tokens_per_s_per_user": s.tokens_per_s_per_user, "tokens_per_s_per_gpu": s.tokens_per_s_per_gpu,
            "ttft_ms": s.ttft_s * 1e3, "tpot_ms": s.tpot.seconds * 1e3}


def sweep(src, gpu, eff, w, *, gpus: int, parallel, specs, disagg: bool = False, prefill_gpus=None,
          max_gpus=None, profiles=PROFILES) -> list[dict]:
    points = []
    pools = dict(disagg=disagg, prefill_gpus=prefill_gpus, max_gpus=max_gpus)
    for profile in profiles:
        chosen = choose(profile, src, gpu, eff, w, gpus=gpus, parallel=parallel, specs=specs, **pools).best
        fixed = dict(parallel=chosen.layout.parallel, specs=[chosen.spec], replicas=chosen.replicas)
        # every power of two up to the limit (that the instances share equally)
        for c in (c for c in _concurrencies("balanced", None, chosen.max_concurrency) if c % chosen.replicas == 0):
            opt = choose(profile, src, gpu, eff, w, gpus=gpus, concurrency=c, **pools, **fixed).best
            points.append(point(profile, opt))
    return pareto(points)


def at_user_speed(points: list[dict], tokens_per_s_per_user: float) -> float | None:
    """The most tokens/s per GPU the Pareto frontier gives at no less than ``tokens_per_s_per_user``: read
    off the frontier, interpolated linearly between the points around that speed (as InferenceX reads its
    curves), or its slowest point's throughput when every point is faster; None when none is that fast."""
    front = sorted((p["tokens_per_s_per_user"], p["tokens_per_s_per_gpu"]) for p in points if p["pareto"])
    if not front or front[-1][0] < tokens_per_s_per_user:
        return None
    if front[0][0] >= tokens_per_s_per_user:
        return max(g for _, g in front)
    for (u0, g0), (u1, g1) in zip(front, front[1:]):
        if u0 <= tokens_per_s_per_user <= u1:
            return g0 + (g1 - g0) * (tokens_per_s_per_user - u0) / (u1 - u0) if u1 > u0 else max(g0, g1)
    return None
