"""What a request is to the code that submits it: how it generates (``SamplingParams``), the events it
yields (``TokenEvent`` ..., then one ``Finished``), its ``Completion``, and the ``RequestHandle`` that streams
them to any number of readers, threads or asyncio tasks. The engine (``engine.py``) makes the handles and
emits the events from its scheduler thread."""
from __future__ import annotations

import asyncio
import numbers
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Iterator

from ..errors import V4CError
from ..runtime.sampling import check_sampling

if TYPE_CHECKING:
    from .engine import Engine

MAX_LOGPROBS = 20  # top alternatives per token, as the OpenAI API allows
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFullError(V4CError):
    """``submit`` while ``max_batch`` requests run and ``max_queue`` wait; ``retry_after``: seconds until
    a place is likely to free up (an estimate, for an HTTP 429's Retry-After)."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


def integer(v) -> bool:
    """An int (numpy's too), not a bool."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates. Checked when made: a bad field is a ``ValueError`` naming it."""
    max_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; k in 0..20: the token's and its top-k alternatives
    ignore_eos: bool = False

    def __post_init__(self):
        if not integer(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        t, p = check_sampling(self.temperature, self.top_p)  # its messages name temperature / top_p
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_p", p)
        if self.seed is not None and not (integer(self.seed) and -2**63 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in -2**63..2**64-1 or None, got {self.seed!r}")
        stops = self.stop_token_ids
        if isinstance(stops, (str, bytes)) or not hasattr(stops, "__iter__"):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {stops!r}")
        stops = tuple(stops)
        if not all(integer(s) and s >= 0 for s in stops):
            raise ValueError(f"stop_token_ids must hold token ids (integers >= 0), got {list(stops)!r}")
        object.__setattr__(self, "stop_token_ids", tuple(int(s) for s in stops))
        if self.logprobs is not None and not (integer(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in 0..{MAX_LOGPROBS}, got {self.logprobs!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")


@dataclass
class TokenEvent:
    """One generated token; ``logprob`` (and ``top_logprobs``, most likely first) when asked for."""
    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    """The last event of a request. ``reason``: "stop" (EOS or a stop token: ``stop_token``), "length"
    (``max_tokens``), "cancelled" (or the reason given to ``cancel``), "error" (``error`` says why)."""
    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    stop_token: int | None = None
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache, not computed


@dataclass
class Completion:
    """A finished request: its tokens (without the stop token) and how it ended."""
    tokens: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    error: str | None = None
    stop_token: int | None = None
    cached_tokens: int = 0


class RequestHandle:
    """A submitted request: its events as they come (``events``, ``aevents``), its ``result``, ``cancel``.

    Every event is kept until the handle goes: each iterator (``events`` or ``aevents``, any number, from
    any thread) sees all of them from the first."""

    def __init__(self, engine: "Engine", rid: str, prompt_tokens: int, params: SamplingParams):
        self.id = rid
        self.prompt_tokens = prompt_tokens
        self.params = params
        self._engine = engine
        self._cv = threading.Condition()
        self._log: list[TokenEvent | Finished] = []
        self._done = False
        self._cancel: str | None = None  # the reason asked for, until the scheduler acts on it
        self.cached_tokens = 0  # prompt tokens resumed from the prefix cache; final once the first token came
        self._sinks: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []

    @property
    def finished(self) -> bool:
        return self._done

    def _emit(self, ev: TokenEvent | Finished) -> None:
        """Called by the engine thread only."""
        with self._cv:
            if self._done:
                return
            self._log.append(ev)
            self._done = isinstance(ev, Finished)
            self._cv.notify_all()
            sinks = list(self._sinks)  # taken with the append: a sink bound later has ev in its backlog
        for loop, queue in sinks:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # that loop is closed: nobody is listening there any more
                pass

    def events(self, timeout: float | None = None) -> Iterator[TokenEvent | Finished]:
        """The request's events, blocking until each comes; the last is a ``Finished``. ``timeout``: the
        longest wait for one event (``TimeoutError`` after it; None waits for ever)."""
        i = 0
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: i < len(self._log), timeout):
                    raise TimeoutError(f"request {self.id}: no event within {timeout} s")
                batch = self._log[i:]
            for ev in batch:
                i += 1
                yield ev
                if isinstance(ev, Finished):
                    return

    async def aevents(self, cancel_on_exit: bool = True) -> AsyncIterator[TokenEvent | Finished]:
        """``events`` for asyncio code, without a thread per stream: the engine thread hands each event
        to this loop (``call_soon_threadsafe``) into a queue bound here, on first use; the events before
        that come first. Leaving the iteration before the ``Finished`` event (``break``, the task
        cancelled, as when an HTTP client disconnects) cancels the request unless ``cancel_on_exit``
        is False."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        with self._cv:
            backlog = list(self._log)
            if not self._done:
                self._sinks.append((loop, queue))
        finished = False
        try:
            for ev in backlog:
                yield ev
                if isinstance(ev, Finished):
                    finished = True
                    return
            while True:
                ev = await queue.get()
                yield ev
                if isinstance(ev, Finished):
                    finished = True
                    return
        finally:
            with self._cv:
                if (loop, queue) in self._sinks:
                    self._sinks.remove((loop, queue))
            if not finished and cancel_on_exit:
                self.cancel()

    def cancel(self, reason: str = "cancelled") -> None:
        """Ends the request at the next step boundary (its row is freed then); its last event is
        ``Finished(reason)``. Nothing happens to a request that has already finished."""
        if not isinstance(reason, str) or not reason:
            raise ValueError(f"reason must be a non-empty string, got {reason!r}")
        self._engine._cancel(self, reason)

    def result(self, timeout: float | None = None) -> Completion:
        """Waits for the end (``TimeoutError`` after ``timeout`` seconds) and returns the whole ``Completion``."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            evs = list(self._log)
        fin = evs[-1]
        toks = [e for e in evs if isinstance(e, TokenEvent)]
        want = self.params.logprobs is not None
        return Completion(tokens=[e.token for e in toks], finish_reason=fin.reason,
                          prompt_tokens=fin.prompt_tokens, completion_tokens=fin.completion_tokens,
                          logprobs=[e.logprob for e in toks] if want else None,
                          top_logprobs=[e.top_logprobs for e in toks] if want else None,
                          error=fin.error, stop_token=fin.stop_token, cached_tokens=fin.cached_tokens)
