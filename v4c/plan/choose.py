"""Serving profiles and how a plan picks its layout, MTP depth and concurrency for one.

Each candidate (attention tensor- or data-parallel over the GPUs of an instance, the experts split over all of
them or whole on each; the GPUs as one instance or as identical replicas of fewer, each serving its share of
the requests; MTP off or 1-3 draft tokens) is costed by the step and queue models at the profile's
concurrency, and the profile's objective picks one:

* ``low-latency``: one request at a time (unless given), the shortest time per output token;
* ``balanced``: the knee of the Pareto curve, the concurrency (powers of two up to what fits) and
  candidate with the highest tokens/s per GPU x tokens/s per user;
* ``max-throughput``: as many requests as fit, the most tokens/s per GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import ConfigError
from .memory import max_concurrency, memory_per_gpu
from .pool import Layout, Pool
from .serving import SteadyState, Speculation, Workload, colocated, disaggregated

PROFILES = ("low-latency", "balanced", "max-throughput")
# V4 ships one MTP layer; engines chain it for at most 3 draft steps (SGLang's low-latency recipe,
# TensorRT-LLM's latency setting), beyond which acceptance has decayed
MAX_DRAFT = 3
# SGLang's cookbook: 3 draft steps accept ~2.5 tokens per step on V4-Flash and V4-Pro. Taking each draft
# token as accepted with one probability p given its predecessors were, 1 + p + p^2 + p^3 = 2.5.
PUBLISHED_ACCEPT = (3, 2.5)


def _solve_p(k: int, a: float) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        p = (lo + hi) / 2
        lo, hi = (p, hi) if sum(p ** i for i in range(k + 1)) < a else (lo, p)
    return lo


ACCEPT_P = _solve_p(*PUBLISHED_ACCEPT)


def default_accept(draft_tokens: int) -> float:
    """Expected tokens per verify step with ``draft_tokens`` chained drafts: 1 + p + ... + p^k."""
    return sum(ACCEPT_P ** i for i in range(draft_tokens + 1))


@dataclass
class Option:
    """One costed candidate: its layout, speculation, concurrency and what they give."""
    layout: Layout
    spec: Speculation
    concurrency: int
    state: SteadyState
    memory: dict
    max_concurrency: int
    prefill: dict | None = None  # disaggregated: {"gpus", "layout"}
    replicas: int = 1  # identical instances of ``layout``, each serving concurrency / replicas requests

    def describe(self) -> str:
        return (f"{self.replicas} x " if self.replicas > 1 else "") + self.layout.describe()

    def score(self, profile: str) -> float:
        s = self.state
        if profile == "low-latency":
            return -s.tpot.seconds
        if profile == "balanced":
            return s.tokens_per_s_per_gpu * s.tokens_per_s_per_user
        return s.tokens_per_s_per_gpu


@dataclass
class Choice:
    best: Option
    considered: list = field(default_factory=list)  # (description, score or the reason it was refused)


def candidate_layouts(gpus: int, parallel: str | None) -> list[Layout]:
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    if gpus == 1:
        if parallel:
            raise ValueError("--parallel needs --gpus of 2 or more")
        return [Layout(1, "dp")]
    if parallel:
        from ..passes.shard import parse_parallel
        par = parse_parallel(parallel, gpus)
        return [Layout(gpus, par.attn, par.ep)]
    # experts over every GPU, or on each (ep=1: replicas of the MoE, no all-to-all; for models whose experts
    # do not split that far, or that are small enough for the collectives to cost more than the weights)
    return [Layout(gpus, attn, ep) for ep in (0, 1) for attn in ("tp", "dp")]


def candidate_specs(speculative: str | None, draft_tokens: int | None, accept: float | None) -> list[Speculation]:
    if speculative == "none":
        return [Speculation()]
    if speculative == "mtp":
        ks = [draft_tokens] if draft_tokens is not None else list(range(1, MAX_DRAFT + 1))
        return [Speculation(k, accept if accept is not None else default_accept(k)) for k in ks]
    if draft_tokens is not None or accept is not None:
        raise ValueError("--draft-tokens and --accept-length need --speculative mtp")
    return [Speculation(k, default_accept(k)) for k in range(MAX_DRAFT + 1)]


def replica_counts(gpus: int, parallel: str | None, disagg: bool, given: int | None = None) -> list[int]:
    """How many identical instances the GPUs may form: every divisor of ``gpus`` (``given``: that one, which must
    divide it); one instance where a layout is given for all of them (``--parallel`` without ``replicas``) or
    prefill runs apart (``--disagg``)."""
    if given is not None:
        if given < 1 or gpus % given:
            raise ValueError(f"replicas {given} must divide --gpus {gpus}")
        return [given]
    if parallel or disagg:
        return [1]
    return [r for r in range(1, gpus + 1) if gpus % r == 0]


def replicated(opt: Option, replicas: int) -> Option:
    """``opt`` (one instance at its share of the requests) as ``replicas`` identical instances: the same latency
    and tokens/s per GPU, ``replicas`` times the requests, GPUs and sequences that fit."""
    if replicas == 1:
        return opt
    s = opt.state
    state = replace(s, concurrency=s.concurrency * replicas, decoding=s.decoding * replicas,
                    requests_per_s=s.requests_per_s * replicas, gpus=s.gpus * replicas)
    return replace(opt, concurrency=opt.concurrency * replicas, state=state,
                   max_concurrency=opt.max_concurrency * replicas, replicas=replicas)


def _concurrencies(profile: str, given: int | None, most: int) -> list[int]:
    if given is not None:
        return [given]
    if profile == "low-latency":
        return [1]
    if profile == "max-throughput":
        return [most]
    powers = [1 << i for i in range(most.bit_length()) if 1 << i <= most]
    return sorted(set(powers + [most]))


def pool_for(src, gpu, eff, layout: Layout) -> Pool:
    """One Pool per model, GPU, factors and layout, so that its step times are worked out once per plan."""
    key = (gpu.key, id(eff), layout)
    if key not in src.pools:
        src.pools[key] = Pool(src, gpu, eff, layout)
    return src.pools[key]


def pools(src, gpu, eff, gpus: int, parallel: str | None):
    """(pool, None) per layout the shard pass accepts, (layout, reason) for the others."""
    out = []
    for layout in candidate_layouts(gpus, parallel):
        try:
            out.append((pool_for(src, gpu, eff, layout), None))
        except ConfigError as e:
            out.append((layout, str(e)))
    return out


def prefill_layout(src, gpu, eff, w: Workload) -> Pool:
    """Disaggregated prefill instances: data-parallel attention over the fewest GPUs (a power of two) that
    hold the weights, one prefilling sequence per GPU and the activations of a chunk."""
    n = 1
    while n <= 1024:
        layout = Layout(n, "dp")
        try:
            pool = pool_for(src, gpu, eff, layout)
        except ConfigError:
            n *= 2
            continue
        mem = memory_per_gpu(pool, n, w.input_len, chunk=w.prefill_chunk, tokens=1, mtp=False)
        if mem["fits"]:
            return pool
        n *= 2
    raise ValueError(f"{src.path}: the weights do not fit any prefill instance of up to 1024 {gpu.key} GPUs")


def evaluate(pool: Pool, w: Workload, spec: Speculation, concurrency: int, most: int,
             prefill: tuple[Pool, int] | None = None) -> Option:
    k = spec.draft_tokens
    # only the admitted requests hold a KV cache
    mem = memory_per_gpu(pool, w.running(concurrency), w.max_context, chunk=w.prefill_chunk, tokens=k + 1, mtp=k > 0)
    if prefill is None:
        state = colocated(pool, w, spec, concurrency)
        pre = None
    else:
        ppool, pgpus = prefill
        state = disaggregated(ppool, pgpus, pool, w, spec, concurrency)
        pre = {"gpus": pgpus, "layout": ppool.layout.parallel or "1 GPU"}
    return Option(pool.layout, spec, concurrency, state, mem, most, pre)


def _prefill_sizes(ppool: Pool, decode_gpus: int, given: int | None, max_gpus: int | None) -> list[int]:
    """Prefill pool sizes to try: whole instances, up to four times the decode pool or ``max_gpus`` in all."""
    unit = ppool.layout.world
    if given is not None:
        if given % unit:
            raise ValueError(f"--prefill-gpus {given}: prefill instances take {unit} GPUs each (the fewest that hold "
                             f"the weights), so a multiple of {unit}")
        return [given]
    cap = 4 * decode_gpus if max_gpus is None else max_gpus - decode_gpus
    if cap < unit:
        raise ValueError(f"--max-gpus {max_gpus} leaves {cap} GPUs for prefill; one prefill instance needs {unit}")
    return sorted({unit * m for m in range(1, cap // unit + 1)})


def choose(profile: str, src, gpu, eff, w: Workload, *, gpus: int, parallel: str | None = None,
           concurrency: int | None = None, specs: list[Speculation], disagg: bool = False,
           prefill_gpus: int | None = None, max_gpus: int | None = None, replicas: int | None = None) -> Choice:
    """The best option for ``profile``; ``replicas`` (with ``parallel`` for one instance's GPUs) fixes the
    instances, else every count that divides ``gpus`` is tried (see ``replica_counts``)."""
    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
    ppool = prefill_layout(src, gpu, eff, w) if disagg else None
    considered, best = [], None
    for r in replica_counts(gpus, parallel if replicas is None else None, disagg, replicas):
        each = f"{r} x " if r > 1 else ""
        for pool, refused in pools(src, gpu, eff, gpus // r, parallel):
            if refused:
                considered.append((each + pool.describe(), refused))
                continue
            for spec in specs:
                name = each + f"{pool.layout.describe()}, " + (f"MTP {spec.draft_tokens}" if spec.draft_tokens
                                                                 else "no MTP")
                most = max_concurrency(pool, w.max_context, chunk=w.prefill_chunk, tokens=spec.draft_tokens + 1,
                                       mtp=spec.draft_tokens > 0)
                if most == 0:
                    need = memory_per_gpu(pool, 1, w.max_context, chunk=w.prefill_chunk,
                                          tokens=spec.draft_tokens + 1, mtp=spec.draft_tokens > 0)
                    considered.append((name, f"one sequence of {w.max_context} tokens does not fit: "
                                             f"{need['total_bytes'] / 1e9:.1f} GB per GPU of "
                                             f"{need['usable_bytes'] / 1e9:.1f} GB usable"))
                    continue
                if concurrency is not None and (concurrency % r or w.running(concurrency // r) > most):
                    considered.append((name, f"--concurrency {concurrency} does not split into {r} instances"
                                       if concurrency % r else f"--concurrency {concurrency} does not fit: at most "
                                       f"{most * r} sequences of {w.max_context} tokens"))
                    continue
                # each instance serves an equal share: the deployment's concurrencies are multiples of r
                for c in (c for c in _concurrencies(profile, concurrency, most * r) if c % r == 0):
                    for p in _prefill_sizes(ppool, gpus, prefill_gpus, max_gpus) if disagg else [None]:
                        opt = replicated(evaluate(pool, w, spec, c // r, most, (ppool, p) if disagg else None), r)
                        considered.append((f"{name}, concurrency {c}" + (f", {p} prefill GPUs" if p else ""),
                                           opt.score(profile)))
                        if best is None or opt.score(profile) > best.score(profile):
                            best = opt
    if best is None:
        raise ValueError("no layout fits: " + "; ".join(f"{n}: {why}" for n, why in considered))
    return Choice(best, considered)
