"""The steady state of a benchmark that keeps ``concurrency`` requests in flight (sglang.bench_serving /
vllm bench serve with --max-concurrency): requests of ``input_len`` prompt tokens and ``output_len``
output tokens, each replaced by a new one when it finishes.

Colocated (one pool prefills and decodes): every iteration decodes the ``b`` requests past their prefill
and carries at most one prefill chunk per lane (a data-parallel rank; tensor-parallel ranks are one lane).
The pool is never idle while a request is in flight, so its time splits into chunks and decode iterations:

    1 / r = chunks * t_chunk / lanes + (output_len - 1) * t_iteration(b) / (accept_length * b)

(r: requests finished per second). A request's prefill waits behind the chunks of requests ahead on its
lane, as an M/D/1 queue does (Poisson-like arrivals: requests finish, and are replaced, at scattered
times); its chunks ride on iterations that also decode the others. Little's law, concurrency = b +
r * TTFT, then fixes b, found by bisection. Disaggregated: a separate prefill pool feeds the decode pool,
whose iterations carry no chunks; the same queue and law hold.

An engine that admits at most ``max_running`` requests at once (SGLang's --max-running-requests) runs the
steady state of that many; the others wait unadmitted, (concurrency - max_running) / r seconds each by
Little's law, before their prefill starts.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .pool import Pool
from .step import StepTime

# ρ above this is a saturated prefill queue: its wait is capped rather than infinite
_RHO_MAX = 0.995


@dataclass(frozen=True)
class Workload:
    input_len: int
    output_len: int
    chunk: int = 4096  # prefill chunk tokens (SGLang's --chunked-prefill-size in the low-latency recipe)
    max_running: int | None = None  # requests the engine admits at once (None: every one in flight)

    def __post_init__(self):
        if self.input_len < 1 or self.output_len < 2:
            raise ValueError(f"--input-len must be >= 1 and --output-len >= 2, got {self.input_len} and "
                             f"{self.output_len}")
        if self.chunk < 1:
            raise ValueError(f"--chunk-tokens must be >= 1, got {self.chunk}")
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"--max-running must be >= 1, got {self.max_running}")

    def running(self, concurrency: int) -> int:
        """Requests admitted (prefilling or decoding, holding a KV cache) with ``concurrency`` in flight."""
        return concurrency if self.max_running is None else min(concurrency, self.max_running)

    @property
    def max_context(self) -> int:
        return self.input_len + self.output_len

    @property
    def decode_context(self) -> int:
        """The context of an average decode step: half-way through the output."""
        return self.input_len + self.output_len // 2

    @property
    def prefill_chunk(self) -> int:
        return min(self.chunk, self.input_len)

    @property
    def chunks(self) -> float:
        return self.input_len / self.prefill_chunk

    @property
    def prefill_context(self) -> int:
        """Chunks are costed at the prompt's mid-point: the context-linear terms average to it."""
        return max(1, self.input_len // 2)


@dataclass(frozen=True)
class Speculation:
    draft_tokens: int = 0        # MTP draft steps per iteration (0: no speculation)
    accept_length: float = 1.0   # tokens emitted per iteration, the bonus token included

    def __post_init__(self):
        if self.draft_tokens < 0:
            raise ValueError(f"--draft-tokens must be >= 0, got {self.draft_tokens}")
        if not 1.0 <= self.accept_length <= self.draft_tokens + 1:
            raise ValueError(f"--accept-length must be between 1 and draft tokens + 1 = {self.draft_tokens + 1}, "
                             f"got {self.accept_length}")


@dataclass(frozen=True)
class SteadyState:
    concurrency: int
    decoding: float          # requests past their prefill, on average
    requests_per_s: float
    ttft_s: float
    tpot: StepTime           # time per output token, by term
    ttft_bound: str
    throughput_bound: str
    gpus: int
    tokens: int              # input + output tokens per request
    output_len: int
    prefill_utilisation: float

    @property
    def tokens_per_s_per_user(self) -> float:
        """Output tokens a user sees per second: one over the time per output token."""
        return 1.0 / self.tpot.seconds

    @property
    def tokens_per_s_per_gpu(self) -> float:
        """Input plus output tokens, as the published serving benchmarks count them."""
        return self.requests_per_s * self.tokens / self.gpus

    @property
    def output_tokens_per_s_per_gpu(self) -> float:
        return self.requests_per_s * self.output_len / self.gpus


def _bisect(h, hi: float, steps: int = 40) -> float:
    """The root of increasing ``h`` on (0, hi] (``hi`` itself when h(hi) <= 0), approached from below so
    that ``h`` is finite there (it is infinite where the prefill queue saturates)."""
    if h(hi) <= 0:
        return hi
    lo = 0.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if h(mid) <= 0 else (lo, mid)
    return lo


def _queue(service: float, rho: float) -> float:
    """Mean wait of an M/D/1 queue with this service time and utilisation."""
    rho = min(rho, _RHO_MAX)
    return service * rho / (2 * (1 - rho))


def _others(b: float, c: int) -> float:
    """Requests other than a given one that are decoding, on average."""
    return b * (c - 1) / c


def _admitted(s: SteadyState, concurrency: int) -> SteadyState:
    """``s``, the steady state of the admitted requests, with ``concurrency`` in flight: the rest wait to
    be admitted, (concurrency - admitted) / r each (Little's law), before their prefill."""
    if s.concurrency == concurrency:
        return s
    wait = (concurrency - s.concurrency) / s.requests_per_s
    return replace(s, concurrency=concurrency, ttft_s=s.ttft_s + wait, ttft_bound="admission")


def colocated(pool: Pool, w: Workload, spec: Speculation, concurrency: int) -> SteadyState:
    return _admitted(_colocated(pool, w, spec, w.running(concurrency)), concurrency)


def disaggregated(prefill: Pool, prefill_gpus: int, decode: Pool, w: Workload, spec: Speculation,
                  concurrency: int) -> SteadyState:
    """``prefill_gpus`` GPUs in instances of ``prefill``'s layout (data-parallel: each GPU a lane) feed
    ``decode``; the KV cache moves between them over NVLink or the network (not costed)."""
    return _admitted(_disaggregated(prefill, prefill_gpus, decode, w, spec, w.running(concurrency)), concurrency)


def _colocated(pool: Pool, w: Workload, spec: Speculation, concurrency: int) -> SteadyState:
    ctx, k, a, n_c, out = w.decode_context, spec.draft_tokens, spec.accept_length, w.chunks, w.output_len - 1
    chunk = pool.prefill_chunk(w.prefill_chunk, w.prefill_context, mtp=k > 0)
    it = lambda b: pool.iteration(max(b, 1.0), ctx, k)  # noqa: E731

    def state(b):
        lanes = min(pool.lanes, max(1.0, concurrency - b))  # chunks available to run side by side
        b_o = _others(b, concurrency)
        with_chunk = chunk + it(b_o) * min(1.0, b_o)  # an iteration carrying one of this request's chunks
        per_request = chunk * (n_c / lanes) + it(b) * (out / (a * max(b, 1.0)))  # pool time per request
        r = 1.0 / per_request.seconds
        rho = r * (concurrency - 1) / concurrency * n_c * with_chunk.seconds / lanes
        service = n_c * with_chunk.seconds
        return r, service, _queue(service, rho) if rho < 1 else float("inf"), with_chunk, per_request, rho

    def h(b):
        r, service, wait, *_ = state(b)
        return b + r * (service + wait) - concurrency

    b = _bisect(h, float(concurrency))
    r, service, wait, with_chunk, per_request, rho = state(b)
    # past saturation the queue model has no root below ρ = 1: the requests that are not decoding wait for
    # prefill, and Little's law sets their wait
    ttft = max(service + wait, (concurrency - b) / r)
    # Little's law for the decoding requests gives the time per output token; what a decode iteration does
    # not explain is the other requests' chunks riding on the iterations (their share of them, by term)
    per_token = b / (r * out)
    riding = max(0.0, (a * per_token - it(b).seconds) / chunk.seconds)
    tpot = (it(b) + chunk * riding) * (1.0 / a)
    return SteadyState(concurrency, b, r, ttft, tpot, "queueing" if ttft > 2 * service else with_chunk.bound,
                       per_request.bound, pool.layout.world, w.input_len + w.output_len, w.output_len, min(rho, 1.0))


def _disaggregated(prefill: Pool, prefill_gpus: int, decode: Pool, w: Workload, spec: Speculation,
                   concurrency: int) -> SteadyState:
    ctx, k, a, n_c, out = w.decode_context, spec.draft_tokens, spec.accept_length, w.chunks, w.output_len - 1
    chunk = prefill.prefill_chunk(w.prefill_chunk, w.prefill_context, mtp=k > 0)
    lanes_max = prefill_gpus if prefill.layout.attn == "dp" else prefill_gpus // prefill.layout.world
    it = lambda b: decode.iteration(max(b, 1.0), ctx, k)  # noqa: E731

    def state(b):
        r = a * b / (out * it(b).seconds)
        lanes = min(lanes_max, max(1.0, concurrency - b))
        rho = r * (concurrency - 1) / concurrency * n_c * chunk.seconds / lanes  # the others' chunks ahead
        service = n_c * chunk.seconds
        return r, service, _queue(service, rho) if rho < 1 else float("inf"), rho

    def h(b):
        r, service, wait, _ = state(b)
        return b + r * (service + wait) - concurrency

    b = _bisect(h, float(concurrency))
    r, service, wait, rho = state(b)
    ttft = max(service + wait, (concurrency - b) / r)  # as in colocated(): Little's law past saturation
    tpot = it(b) * (1.0 / a)
    # throughput: the pool that saturates first bounds it
    bound = chunk.bound if rho >= 0.99 else it(b).bound
    return SteadyState(concurrency, b, r, ttft, tpot, "queueing" if ttft > 2 * service else chunk.bound, bound,
                       prefill_gpus + decode.layout.world, w.input_len + w.output_len, w.output_len, min(rho, 1.0))
