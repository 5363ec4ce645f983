"""Continuous batching: one scheduler thread owns the model and one ``Session`` of ``max_batch`` rows.

Usable without HTTP::

    with Engine(model, max_batch=8, max_context=4096) as engine:
        handle = engine.submit(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1))
        for ev in handle.events():          # TokenEvent ..., then one Finished
            ...
        engine.generate(prompt_ids, SamplingParams(max_tokens=8)).tokens   # or all at once

**Rows.** Every request holds one row of the session (``max_context`` tokens of state, allocated once
when the engine is made: the memory plan, ``session.memory()``) from its admission to its end; a
finished, stopped or cancelled request's row is emptied (``Session.reset_rows``) at the end of that
step and is free for the next admission at once. Beyond ``max_batch`` requests wait in a queue of
``max_queue``; beyond that ``submit`` raises ``QueueFullError`` with a ``retry_after`` estimate. A
request joins at the next step boundary, in arrival order, in the lowest free row (so the rows in use
stay packed at the bottom of the batch and a call over them holds few holes).

**A step.** Each step the decode rows (prompt done; one pending token each) take one token each of
the ``step_tokens`` budget, and the prompts being prefilled share the rest, in admission order, as
chunks of at most what is left (vLLM's chunked prefill; ``step_tokens >= max_batch`` so a prefilling
prompt always gets at least one token). The step then runs:

- one ``forward_rows`` call, T = 1, over the row range spanning the decode rows (a hole in the range,
  a free or prefilling row, is a length-0 padding row: never read nor written, costing one token slot),
  which also takes any prefill chunk of exactly one token;
- one ``forward_rows`` call per prefill chunk of more than one token, on that row alone; adjacent
  rows with chunks of equal length share a call (no padding: [k, T] computes exactly k x T slots).

The [B, T] layout computes B x T token slots whatever the lengths, so a chunk of T tokens mixed into
the decode call would cost (rows in the call) x T slots against T + rows for two calls. Measured on
the tiny test model (CPU, 2 cores shared with another job, so noisy: read the ratios; f32; the best
of 7; ms), 7 decode rows at position 40 and one prefill chunk of T tokens::

    T                           1     2     4     8    16    32    64   128
    mixed: one [8, T] call     19    46    56   114    82   192   262   274
    apart: [7, 1] + [1, T]     34    35    41    50    55    63    71    88

and k fresh rows with a chunk of T tokens each::

    k x T                      4x8   4x32  4x64  8x16  8x64
    one [k, T] call             56     88   128   111   194
    k calls [1, T]             120    273   214   473   415

Only a one-token chunk is cheaper mixed (one call instead of two, no padding); from two tokens on the
call of its own wins, by 3x and more at 32-128 tokens. Chunks of one length in adjacent rows are
cheaper in one call (no padding there, and one call's overhead instead of k). Chunks of different
lengths run apart: on this tiny model the per-call overhead dominates and padding looks cheap, but on
a real model compute does, and a padded slot costs as much as a real one.

**Sampling.** Per row, its own temperature / top-p / generator (``sampling.sample_rows``): a greedy
row is the exact argmax, a sampled row draws only from its request's generator (seeded: ``seed``),
so a request's tokens do not depend on which other requests share its steps beyond the rounding of
the forward itself: the same row computed in a call of 1 or of 8 rows, or with its prompt cut into
other chunks, differs in its fp32 logits by ~1e-6 (matrix products of other shapes), which can
change a token only at a near-tie of the top logits (greedy) or a draw landing within ~1e-6 of a
boundary (sampled). A request alone runs the very calls ``model.generate`` runs (its prompt in one
call when it fits the budget, then one-row steps) and gives its tokens bit for bit. A call of at most
16 token slots runs the decode implementations, a larger one (a decode call over more than 16 rows)
the prefill ones. Log-probabilities are those of the model (log-softmax of the raw logits).

**Prefix cache** (``prefix_cache=``: a ``v4c.runtime.prefix_cache.PrefixCache``, off by default).
A request resumes from the longest cached prefix of its prompt (a 256-token block boundary, or the
exact end of an earlier request it extends: the multi-turn case; ``Finished.cached_tokens``) and
prefills only the rest. With the cache on a prefill chunk ends at each 256-token boundary it reaches,
so every boundary a prompt (or a generation) passes is snapshotted there, and a finished request
(stop, length or cancelled) is snapshotted at its end before its row is emptied. Two requests that
are about to compute the same block (the same chain hash: the same tokens up to its end) do not
both compute it: the one further on (the first admitted, at a tie) does, the others wait a step and
then resume from its snapshot. The cache's failures never fail a request (they are logged).

**Speculative decoding** (``speculative="mtp"``, ``draft_tokens=k``, k = 1..3; the artifact must hold the MTP
block). The decode rows of a step then run apart from the prefill chunks (``serve.speculative.speculate``): the MTP block
(``v4c/serve/speculative.py``: its own state, one row per engine row) appends the entries the last step made
known and drafts k tokens per row, chained on its own streams; one ``forward_rows`` call over the decode
rows' range verifies them (row r appends its pending token and its drafts: k + 1 tokens, after a
``RewindPoint``); each row accepts with its own parameters (``runtime.speculative.accept``: the longest
agreeing prefix when greedy, rejection sampling with its own generator otherwise, so the tokens are
distributed as plain sampling's) and takes the accepted drafts and the main model's token after them one
by one as plain decoding takes its tokens: a stop token or ``max_tokens`` ends the row there and nothing
after it is emitted; with the prefix cache on, a run that would pass a 256-token block boundary is cut at
it (the rest is drafted again), so the row is snapshotted there as without speculation. The session is
then rewound to what each row kept (``Session.rewind``), and the kept positions' streams become the MTP
block's next entries. A row drafts at most ``max_tokens`` - 1 - (tokens generated) tokens, so its last
token is a plain step. A decode row counts one token of ``step_tokens``, whatever k (a verify call of a
few tokens per row costs about what a decode step costs where decoding is memory-bound). A prompt's MTP
entries are appended after each prefill chunk; a request resumed from the prefix cache starts its block
state empty at the resume point (the cache holds the main model's states), which lowers its first drafts'
acceptance and nothing else. Greedy requests give the tokens they give without speculation, up to the
rounding of calls of other shapes (a near-exact tie, as above). ``metrics()["speculative"]`` counts the
verify steps, drafts proposed and accepted, and accepted drafts per row-step.

**Ending.** EOS (the model config's ``eos_token_id``, unless ``ignore_eos``) and ``stop_token_ids``
end a request with ``"stop"``: the stop token counts in ``completion_tokens`` (the model generated
it) but is not emitted as a ``TokenEvent`` nor put in ``Completion.tokens`` (``Finished.stop_token``
names it). ``max_tokens`` generated ends it with ``"length"``; ``cancel()`` with ``"cancelled"`` (or
the reason given) at the next step boundary; an exception inside a call fails the requests of that
call with ``"error"`` (their rows are emptied; the other rows are intact: a call touches only its
own rows) and the engine goes on serving.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ..runtime.model import DEFAULT_MAX_CONTEXT
from ..runtime.sampling import sample_rows, token_logprobs
from .metrics_text import BATCH_BUCKETS, LATENCY_BUCKETS  # the histograms' bounds (seconds, sequences)
from .prefix import PrefixScheduler
from .requests import FINISH_REASONS, Finished, QueueFullError, RequestHandle, SamplingParams, TokenEvent, integer
from .speculative import feed_prefill, speculate

log = logging.getLogger("v4c.serve")


@dataclass(eq=False)
class _Request:
    """The scheduler's view of one request (touched by the engine thread only, once admitted)."""
    handle: RequestHandle
    prompt: list[int]
    params: SamplingParams
    stops: frozenset
    generator: torch.Generator
    t_submit: float
    row: int = -1
    fed: int = 0  # prompt tokens in the row so far
    pending: int | None = None  # the last token sampled, fed by the next decode step
    generated: int = 0  # tokens sampled (the stop token included)
    t_first: float | None = None
    t_last: float | None = None
    final: Finished | None = None  # its last event, sent once its row is free
    # the prefix cache's view: the chain hashes of the row's whole blocks (prompt, then generated tokens),
    # the prompt tokens restored, the generated tokens fed to the row, whether it waits on another's block
    chain: list[str] | None = None
    cached: int = 0
    history: list[int] = field(default_factory=list)
    deferred: bool = False
    # speculative decoding: the MTP entries made known and not yet appended to the block's state (start,
    # the main model's streams [T, n, D], the next tokens [T]; the last one missing until it is sampled)
    mtp: tuple | None = None

    def tokens(self) -> list[int]:
        """The tokens the row holds."""
        return self.prompt[:self.fed] + self.history


def _check_speculative(model, method, k, session) -> None:
    """``Engine(speculative=..., draft_tokens=...)``: a ``ValueError`` naming what is wrong."""
    from ..runtime.speculative import MAX_DRAFT, METHODS, window_problem
    if method not in METHODS:
        raise ValueError(f"speculative must be one of {', '.join(METHODS)} or None, got {method!r}")
    if not integer(k) or not 1 <= k <= MAX_DRAFT:
        raise ValueError(f"draft_tokens must be an integer from 1 to {MAX_DRAFT}, got {k!r}")
    sharded = hasattr(model, "world")  # a rank's DistributedModel
    if sharded or (session is not None and not callable(getattr(session, "rewind_point", None))):
        raise ValueError("speculative decoding is not supported for a sharded artifact yet: serve it without "
                         "--speculative")
    if getattr(model, "mtp", None) is None:
        note = getattr(model, "mtp_note", None)
        raise ValueError(f"{getattr(model, 'path', 'the model')}: speculative={method!r} needs the artifact's MTP "
                         f"block, and this artifact has none" + (f" ({note})" if note else "") + "; compile a "
                         "checkpoint that holds one (v4c compile --mtp on) or serve without speculative decoding")
    problem = window_problem(model, k)
    if problem:
        raise ValueError(problem)


class _Histogram:
    def __init__(self, bounds):
        self.bounds, self.counts, self.sum, self.count = tuple(bounds), [0] * len(bounds), 0.0, 0

    def observe(self, x: float) -> None:
        i = bisect.bisect_left(self.bounds, x)  # the first bound >= x: Prometheus' "le"
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += x
        self.count += 1

    def snapshot(self) -> dict:
        cum = list(itertools.accumulate(self.counts))
        return {"buckets": {**dict(zip(self.bounds, cum)), "+Inf": self.count}, "sum": self.sum, "count": self.count}


class Engine:
    """The scheduler (see the module docstring). ``submit`` starts it if ``start`` was not called;
    ``stop`` (or leaving the ``with``) cancels every request and joins the thread."""

    def __init__(self, model, max_batch: int = 8, max_context: int | None = None, step_tokens: int = 256,
                 max_queue: int = 64, session=None, prefix_cache=None, speculative: str | None = None,
                 draft_tokens: int = 2):
        for name, v, lo in (("max_batch", max_batch, 1), ("step_tokens", step_tokens, 1), ("max_queue", max_queue, 0)):
            if not integer(v) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
        if step_tokens < max_batch:
            raise ValueError(f"step_tokens ({step_tokens}) must be >= max_batch ({max_batch}): a step holds one "
                             f"token of every decoding row and at least one of a prompt")
        if max_context is None:
            max_context = min(model.config.max_position_embeddings, DEFAULT_MAX_CONTEXT)
        if speculative is not None:  # refused before the session is allocated
            _check_speculative(model, speculative, draft_tokens, session)
        self.model = model
        # the memory plan: refused here if it does not fit (``session``: one made by the caller, e.g. rank 0's
        # of a sharded model, with max_batch rows)
        self.session = session if session is not None else model.new_session(max_batch, max_context)
        if self.session.batch_size != max_batch:
            raise ValueError(f"the session has {self.session.batch_size} rows, max_batch is {max_batch}")
        self.max_batch, self.max_context = max_batch, self.session.max_context
        self.step_tokens, self.max_queue = step_tokens, max_queue
        self.vocab_size = model.config.vocab_size
        eos = getattr(model.config, "eos_token_id", None)
        self.eos_token_ids = frozenset() if eos is None else frozenset([eos] if integer(eos) else eos)
        mem = self.session.memory()["total"]
        self.kv_bytes_capacity, self.kv_bytes_per_row = mem, mem // max_batch
        self.prefix_cache = prefix_cache
        self._prefix = PrefixScheduler(prefix_cache, self.session) if prefix_cache is not None else None
        self.speculative, self.draft_tokens = speculative, draft_tokens if speculative is not None else 0
        self._drafter = None
        if speculative is not None:
            from .speculative import RowDrafter
            try:  # a ring shorter than a verify call cannot be rewound: refused now, not at the first request
                self.session.rewind_point(torch.full((max_batch,), draft_tokens + 1))
            except ValueError as e:
                raise ValueError(f"speculative decoding with draft_tokens={draft_tokens}: {e}") from None
            self._drafter = RowDrafter(model.mtp, max_batch, self.max_context)

        self._cv = threading.Condition()  # guards the queue, the running list, flags and metrics
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []  # admission order
        self._free = list(range(max_batch))  # a heap: the lowest free row first
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ids = itertools.count()
        self._step_seconds: float | None = None  # a moving average, for retry_after
        self._requests_total = dict.fromkeys(FINISH_REASONS, 0)
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._ttft, self._tpot, self._e2e = (_Histogram(LATENCY_BUCKETS) for _ in range(3))
        self._batch = _Histogram(BATCH_BUCKETS)
        self._batch_last = 0
        self._step_tokens_last = 0
        self._steps_total = 0
        # speculative decoding: verify calls, drafts proposed and accepted, accepted drafts per row-step
        self._spec_steps = self._spec_drafts = self._spec_accepted = 0
        self._spec_hist = _Histogram(range(self.draft_tokens + 1))

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "Engine":
        with self._cv:
            if self._stopping:
                raise RuntimeError("this engine is stopped; make a new one")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="v4c-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self) -> None:
        """Cancels every request (running or waiting: ``Finished("cancelled")``) and joins the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._cancel_everything()  # (when the thread never ran; else it did this itself)

    def __enter__(self) -> "Engine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- requests ------------------------------------------------------------------------------------

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> RequestHandle:
        """Queues a request (``prompt``: token ids); a ``ValueError`` naming the bad field, or
        ``QueueFullError`` when ``max_batch`` requests run and ``max_queue`` wait."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = self._check_prompt(prompt)
        bad = [s for s in params.stop_token_ids if s >= self.vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary 0..{self.vocab_size - 1}")
        if len(prompt) >= self.max_context:
            raise ValueError(f"prompt has {len(prompt)} tokens: no room for any new token within this engine's "
                             f"max_context {self.max_context}")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(f"max_tokens {params.max_tokens} with a prompt of {len(prompt)} tokens passes this "
                             f"engine's max_context {self.max_context} (at most {self.max_context - len(prompt)})")
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        stops = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_token_ids)
        with self._cv:
            if self._stopping:
                raise RuntimeError("this engine is stopped; make a new one")
            n_run, n_wait = len(self._running), len(self._waiting)
            if n_run + n_wait >= self.max_batch + self.max_queue:
                wait = self._retry_after()
                raise QueueFullError(f"{n_run} requests running and {n_wait} waiting: the engine holds at most "
                                     f"{self.max_batch} running + {self.max_queue} waiting; retry in {wait:.0f} s",
                                     wait)
            rid = request_id if request_id is not None else f"req-{next(self._ids)}-{secrets.token_hex(4)}"
            handle = RequestHandle(self, rid, len(prompt), params)
            self._waiting.append(_Request(handle, prompt, params, stops, torch.Generator().manual_seed(seed),
                                          time.perf_counter()))
            self._cv.notify_all()
        self.start()
        return handle

    def generate(self, prompt, params: SamplingParams | None = None, timeout: float | None = None) -> Completion:
        """``submit`` and wait for the ``Completion``."""
        return self.submit(prompt, params).result(timeout)

    def _check_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, torch.Tensor):
            if prompt.dim() != 1 or prompt.is_floating_point() or prompt.dtype == torch.bool:
                raise ValueError(f"prompt must be a 1-d sequence of token ids, got a {prompt.dtype} tensor "
                                 f"of shape {tuple(prompt.shape)}")
            prompt = prompt.tolist()
        if isinstance(prompt, (str, bytes)) or not hasattr(prompt, "__iter__"):
            raise ValueError(f"prompt must be a sequence of token ids, got {type(prompt).__name__}")
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt must hold at least one token id")
        for i, t in enumerate(prompt):
            if not integer(t) or not 0 <= t < self.vocab_size:
                raise ValueError(f"prompt token {i} is {t!r}, outside the vocabulary 0..{self.vocab_size - 1}")
        return [int(t) for t in prompt]

    def _cancel(self, handle: RequestHandle, reason: str) -> None:
        with self._cv:
            if not handle._done and handle._cancel is None:
                handle._cancel = reason
                self._cv.notify_all()

    def _retry_after(self) -> float:
        """Seconds until the soonest running request is likely to end (at least 1): its steps left times the
        recent step time."""
        step = self._step_seconds if self._step_seconds is not None else 0.1
        left = [r.params.max_tokens - r.generated + math.ceil((len(r.prompt) - r.fed) / self.step_tokens)
                for r in self._running]
        return float(max(1, math.ceil(step * min(left, default=1))))

    # -- metrics -------------------------------------------------------------------------------------

    def metrics(self) -> dict:
        """A snapshot: ``running``, ``waiting``, ``requests_total`` by finish reason, ``prompt_tokens_total``
        (of admitted requests), ``generation_tokens_total``, the histograms ``ttft_seconds``, ``tpot_seconds``
        (per request, mean time between its tokens after the first), ``e2e_seconds`` (submit to the end, for
        requests that ended with stop or length) and ``batch_size`` (requests per step; also ``last``), each
        ``{"buckets": {le: cumulative count, ..., "+Inf": count}, "sum", "count"}``; ``kv_cache_bytes_in_use``
        (rows in use x bytes per row) and ``kv_cache_bytes_capacity``, ``steps_total``, the limits, and
        ``prefix_cache`` (None without one): requests that resumed from it (``requests_hit``) or not, their
        ``hit_tokens`` and ``miss_tokens``, ``errors``, and the cache's own ``stats()``; ``speculative`` (None
        without it): ``steps`` (verify calls), ``draft_tokens_total`` (drafts proposed),
        ``accepted_tokens_total`` (drafts the main model accepted), ``histogram`` (row-steps by accepted
        drafts, 0..k; a row's last token, drafted for by nobody, is not a row-step) and the same as
        ``accepted_per_step``, a histogram."""
        with self._cv:
            return {
                "running": len(self._running), "waiting": len(self._waiting),
                "requests_total": dict(self._requests_total),
                "prompt_tokens_total": self._prompt_tokens_total,
                "generation_tokens_total": self._generation_tokens_total,
                "ttft_seconds": self._ttft.snapshot(), "tpot_seconds": self._tpot.snapshot(),
                "e2e_seconds": self._e2e.snapshot(),
                "kv_cache_bytes_in_use": len(self._running) * self.kv_bytes_per_row,
                "kv_cache_bytes_capacity": self.kv_bytes_capacity,
                "batch_size": {**self._batch.snapshot(), "last": self._batch_last},
                "batch_size_last": self._batch_last, "step_tokens_last": self._step_tokens_last,
                "steps_total": self._steps_total,
                "prefix_cache": self._prefix.metrics() if self._prefix is not None else None,
                "speculative": None if self._drafter is None else {
                    "method": self.speculative, "draft_tokens": self.draft_tokens, "steps": self._spec_steps,
                    "draft_tokens_total": self._spec_drafts, "accepted_tokens_total": self._spec_accepted,
                    "histogram": list(self._spec_hist.counts), "accepted_per_step": self._spec_hist.snapshot()},
                "max_batch": self.max_batch, "max_queue": self.max_queue, "max_context": self.max_context,
                "step_tokens": self.step_tokens,
            }

    # -- the scheduler thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stopping and not self._waiting and not self._running:
                        self._cv.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception as e:  # a fault of the scheduler itself: fail what runs, start clean, go on
                    log.exception("engine step failed")
                    self._fail_everything(f"{type(e).__name__}: {e}")
        self._cancel_everything()

    def _finish(self, r: _Request, reason: str, error: str | None = None, stop_token: int | None = None) -> None:
        """Ends ``r``: counts it and makes its last event, sent by ``_release`` once its row is free."""
        now = time.perf_counter()
        with self._cv:
            self._requests_total[reason if reason in self._requests_total else "cancelled"] += 1
            if reason in ("stop", "length"):
                self._e2e.observe(now - r.t_submit)
                if r.generated >= 2 and r.t_first is not None:
                    self._tpot.observe((r.t_last - r.t_first) / (r.generated - 1))
        r.final = Finished(reason, len(r.prompt), r.generated, error, stop_token, r.cached)

    def _release(self, reqs: list[_Request]) -> None:
        """Empties the rows of ``reqs`` (ended: ``_finish``), frees them, then sends their last events (so
        a caller who has seen its ``Finished`` sees the row free in ``metrics()``)."""
        if self._prefix is not None:
            for r in reqs:
                self._prefix.finished(r)
        rows = [r.row for r in reqs if r.row >= 0]
        if rows:
            try:
                self.session.reset_rows(rows)
            except Exception:
                log.exception("resetting rows %s failed; resetting the session", rows)
                self._fail_everything("the session's state was lost")
            if self._drafter is not None:
                self._drafter.reset_rows(rows)
        for r in reqs:
            r.mtp = None
        with self._cv:
            for r in reqs:
                if r in self._running:
                    self._running.remove(r)
                if r.row >= 0:
                    heapq.heappush(self._free, r.row)
                    r.row = -1
        for r in reqs:
            r.handle._emit(r.final)

    def _end_all(self, reason: str | None, error: str | None = None) -> None:
        """Ends every request, running or waiting (``reason`` None: each with its own cancel reason or
        "cancelled"), and empties the session."""
        with self._cv:
            reqs = list(self._running) + list(self._waiting)
            self._waiting.clear()
            self._running = []
            self._free = list(range(self.max_batch))
        for r in reqs:
            if r.final is None:  # (one already ended is only waiting for its row to be emptied)
                self._finish(r, reason or r.handle._cancel or "cancelled", error)
            r.row = -1
        try:
            self.session.reset()
        except Exception:
            log.exception("resetting the session failed")
        if self._drafter is not None:
            self._drafter.reset()
        for r in reqs:
            r.mtp = None
            r.handle._emit(r.final)

    def _fail_everything(self, msg: str) -> None:
        with self._cv:  # the waiting requests stay queued: only the rows' states were lost
            waiting, self._waiting = self._waiting, deque()
        self._end_all("error", msg)
        with self._cv:
            self._waiting.extendleft(reversed(waiting))

    def _cancel_everything(self) -> None:
        self._end_all(None)

    def _step(self) -> None:
        t0 = time.perf_counter()
        # 1. cancellations take effect, and their rows are free before the admissions
        with self._cv:
            gone = [r for r in self._waiting if r.handle._cancel is not None]
            for r in gone:
                self._waiting.remove(r)
            ended = [r for r in self._running if r.handle._cancel is not None]
        for r in gone + ended:
            self._finish(r, r.handle._cancel)
        self._release(gone + ended)
        # 2. admissions, in arrival order, into the lowest free rows
        with self._cv:
            admitted = []
            while self._waiting and self._free:
                r = self._waiting.popleft()
                r.row = heapq.heappop(self._free)
                self._running.append(r)
                self._prompt_tokens_total += len(r.prompt)
                admitted.append(r)
            running = list(self._running)
        if not running:
            return
        if self._prefix is not None:  # resume from the cache: the new requests, and those that waited on a block
            for r in running:
                if r in admitted:
                    self._prefix.admit(r)
                elif r.deferred:
                    self._prefix.resume(r)
            self._prefix.defer([r for r in running if r.fed < len(r.prompt)])
        # 3. the plan: every decode row one token, the prompts the rest of the budget
        decode = [r for r in running if r.fed == len(r.prompt)]
        budget = self.step_tokens - len(decode)
        chunks: list[tuple[_Request, list[int]]] = []
        for r in running:
            if r.fed < len(r.prompt) and budget > 0 and not r.deferred:
                n = min(len(r.prompt) - r.fed, budget)
                if self._prefix is not None:
                    n = self._prefix.chunk(r, n)
                chunks.append((r, r.prompt[r.fed:r.fed + n]))
                budget -= n
        n_spec = spec_tokens = 0
        if self._drafter is not None and decode:  # the decode rows draft, verify and accept in calls of their own
            n_spec, spec_tokens = len(decode), speculate(self, decode)
            decode = []
            if spec_tokens < 0:  # a rewind failed: every request ended with an error
                return
        single = [(r, [r.pending]) for r in decode] + [(r, c) for r, c in chunks if len(c) == 1]
        multi = sorted(((r, c) for r, c in chunks if len(c) > 1), key=lambda rc: rc[0].row)
        calls = []
        if single:
            calls.append(single)
        for r, c in multi:  # adjacent rows with chunks of one length share a call: no padding
            last = calls[-1] if len(calls) > (1 if single else 0) else None
            if last is not None and last[-1][0].row + 1 == r.row and len(last[-1][1]) == len(c):
                last.append((r, c))
            else:
                calls.append([(r, c)])
        # 4. the calls; the last logits of each row whose prompt is done
        want: list[tuple[_Request, torch.Tensor]] = []
        failed: list[_Request] = []
        for members in calls:
            try:
                logits = self._run_call(members)
                if self._drafter is not None:
                    feed_prefill(self, members)
            except Exception as e:
                msg = f"{type(e).__name__}: {e}"
                log.warning("a forward call failed (%s); its %d requests end with an error", msg, len(members))
                for r, _ in members:
                    self._finish(r, "error", msg)
                failed += [r for r, _ in members]
                continue
            a = min(r.row for r, _ in members)
            for r, toks in members:
                if r.pending is None:
                    r.fed += len(toks)
                    if r.fed == len(r.prompt) and self._prefix is not None:
                        self._prefix.prefilled(r)
                else:
                    r.history.append(r.pending)
                if self._prefix is not None:
                    self._prefix.fed(r)
                if r.fed == len(r.prompt):
                    want.append((r, logits[r.row - a, 0]))  # (each row's last token of the call)
        self._release(failed)
        if self.session.broken is not None:  # (cannot happen: a failed call's rows were reset just now)
            self._fail_everything(f"the session's state was lost ({self.session.broken})")
            return
        # 5. sampling, events, ends
        done = self._sample(want)
        if self._drafter is not None:  # a prompt's last MTP entry reads the first token sampled after it
            for r, _ in want:
                if r not in done and r.mtp is not None and len(r.mtp[2]) < r.mtp[1].shape[0]:
                    r.mtp = (r.mtp[0], r.mtp[1], r.mtp[2] + [r.pending])
        self._release(done)
        now = time.perf_counter()
        with self._cv:
            self._steps_total += 1
            self._batch_last = len(single) + len(multi) + n_spec
            self._batch.observe(self._batch_last)
            self._step_tokens_last = len(single) + sum(len(c) for _, c in multi) + spec_tokens
            dt = now - t0
            self._step_seconds = dt if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * dt

    def _run_call(self, members: list[tuple[_Request, list[int]]]) -> torch.Tensor:
        rows = [r.row for r, _ in members]
        a, b = min(rows), max(rows) + 1
        t = max(len(c) for _, c in members)
        ids = [[0] * t for _ in range(b - a)]
        lengths = [0] * (b - a)
        for r, c in members:
            ids[r.row - a][:len(c)] = c
            lengths[r.row - a] = len(c)
        full = all(n == t for n in lengths) and self._drafter is None  # (lengths given: never a CUDA graph,
        return self.session.forward_rows(a, b, torch.tensor(ids, dtype=torch.int64),  # which keeps no streams)
                                         None if full else lengths, logits="last")

    def _fail_requests(self, reqs: list[_Request], what: str, e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}"
        log.warning("%s failed (%s); its %d requests end with an error", what, msg, len(reqs))
        for r in reqs:
            if r.final is None:
                self._finish(r, "error", msg)
        self._release(reqs)

    def _sample(self, want: list[tuple[_Request, torch.Tensor]]) -> list[_Request]:
        """Samples a token for each row of ``want``, emits it, and returns the requests that ended."""
        if not want:
            return []
        reqs = [r for r, _ in want]
        logits = torch.stack([lg for _, lg in want])
        temps = [r.params.temperature for r in reqs]
        tops = [r.params.top_p for r in reqs]
        gens = [r.generator for r in reqs]
        try:
            tokens = sample_rows(logits, temps, tops, gens).tolist()
        except Exception:  # find the row at fault, the others go on
            tokens = []
            for i in range(len(reqs)):
                try:
                    tokens.append(int(sample_rows(logits[i:i + 1], temps[i:i + 1], tops[i:i + 1], gens[i:i + 1])))
                except Exception as e:
                    tokens.append(e)
        k = max((r.params.logprobs for r in reqs if r.params.logprobs is not None), default=None)
        lps = [None] * len(reqs)
        if k is not None:
            idx = [i for i, r in enumerate(reqs) if r.params.logprobs is not None and isinstance(tokens[i], int)]
            if idx:
                got = token_logprobs(logits[idx], torch.tensor([tokens[i] for i in idx]), k)
                for i, (lp, alts) in zip(idx, got):
                    lps[i] = (lp, alts[:reqs[i].params.logprobs])
        now = time.perf_counter()
        done = []
        n_tokens = 0
        for r, tok, lp in zip(reqs, tokens, lps):
            if isinstance(tok, Exception):
                self._finish(r, "error", f"sampling failed: {type(tok).__name__}: {tok}")
                done.append(r)
                continue
            n_tokens += 1
            if self._take(r, tok, lp, now):
                done.append(r)
        with self._cv:
            self._generation_tokens_total += n_tokens
        return done

    def _take(self, r: _Request, tok: int, lp, now: float) -> bool:
        """One token ``r`` generated: counted, emitted (unless it is a stop token), made the row's pending
        token; True when it ends ``r`` (a stop token, or ``max_tokens``)."""
        r.generated += 1
        if r.t_first is None:
            r.t_first = now
            with self._cv:
                self._ttft.observe(now - r.t_submit)
        r.t_last = now
        if tok in r.stops:
            self._finish(r, "stop", stop_token=tok)
            return True
        r.handle._emit(TokenEvent(tok, *(lp if lp is not None else (None, None))))
        if r.generated >= r.params.max_tokens:
            self._finish(r, "length")
            return True
        r.pending = tok
        return False
