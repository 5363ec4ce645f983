"""What the serving engine does with a prefix cache (the engine's docstring, "Prefix cache"): resume a
request from the longest cached prefix, end prefill chunks at block boundaries and snapshot there and
at a request's end, and let one of several requests computing the same block compute it.

Called by the engine's scheduler thread only. The cache is an optimisation: its failures are logged
and counted (``errors``), the request goes on as if nothing were cached."""
from __future__ import annotations

import logging

from ..graph.analysis import BLOCK_TOKENS

log = logging.getLogger("v4c.serve")

_SNAPSHOT_AT_END = ("stop", "length", "cancelled")  # (not "error": the row's state may be part-written)


class PrefixScheduler:
    def __init__(self, cache, session):
        for need in ("snapshot", "restore"):
            if not callable(getattr(session, need, None)):
                raise ValueError(f"the prefix cache needs a session with {need}(); {type(session).__name__} has "
                                 f"none (a sharded model's session)")
        self.cache, self.session = cache, session
        # per request, counted once its prompt is in its row
        self.requests_hit = self.requests_missed = self.hit_tokens = self.miss_tokens = 0
        self.errors = 0

    def admit(self, r) -> None:
        r.chain = self.cache.chain(r.prompt)
        self.resume(r)

    def resume(self, r) -> None:
        """Restores the longest cached prefix of ``r``'s prompt longer than what its row holds."""
        limit = len(r.prompt) - 1  # the last prompt token is computed: its logits give the first token
        if r.fed >= limit:
            return
        emptied = False
        try:
            hit = self.cache.lookup(r.prompt, limit, r.chain, longer_than=r.fed)
            if hit is None:
                return
            try:
                if r.fed:
                    emptied = True
                    self.session.reset_rows([r.row])
                self.session.restore(r.row, hit.snapshot)
            finally:
                self.cache.release(hit)
            r.fed = r.cached = hit.length
        except Exception:
            self.errors += 1
            log.exception("prefix cache: resuming a request failed; it computes its prompt")
            if emptied or self.session.broken is not None:
                self.session.reset_rows([r.row])
                r.fed = r.cached = 0

    def chunk(self, r, n: int) -> int:
        """A prefill chunk of at most ``n`` tokens that does not cross a block boundary."""
        return min(n, BLOCK_TOKENS - r.fed % BLOCK_TOKENS)

    def defer(self, prefilling: list) -> None:
        """Marks ``deferred`` the requests (in admission order) that would compute a block another
        computes: the one furthest into it (the first at a tie) goes on, the others wait for its
        snapshot."""
        groups: dict[str, list] = {}
        for r in prefilling:
            b = r.fed // BLOCK_TOKENS
            r.deferred = False
            if b + 1 < len(r.chain):  # the block it is in lies whole within its prompt
                groups.setdefault(r.chain[b + 1], []).append(r)
        for group in groups.values():
            lead = max(group, key=lambda r: r.fed)
            for r in group:
                r.deferred = r is not lead

    def fed(self, r) -> None:
        """After a call appended to ``r``'s row: a snapshot when the row is at a block boundary."""
        n = r.fed + len(r.history)
        if n % BLOCK_TOKENS == 0 and n > 0:
            self._store(r)

    def prefilled(self, r) -> None:
        """``r``'s prompt is all in its row: counted, and its cached tokens become final."""
        r.handle.cached_tokens = r.cached
        if r.cached:
            self.requests_hit += 1
        else:
            self.requests_missed += 1
        self.hit_tokens += r.cached
        self.miss_tokens += len(r.prompt) - r.cached

    def finished(self, r) -> None:
        """Before ``r``'s row is emptied: a snapshot of where it stopped (what a next turn extends)."""
        if r.row >= 0 and r.final is not None and r.final.reason in _SNAPSHOT_AT_END and r.fed + len(r.history):
            self._store(r)

    def _store(self, r) -> None:
        try:
            if self.session.broken is not None:
                return
            tokens = r.tokens()
            chain = self.cache.chain(tokens, r.chain)
            if len(chain) > len(r.chain):  # (in a prompt, r.chain already covers its whole blocks)
                r.chain = chain
            self.cache.store(self.session, r.row, tokens, chain)
        except Exception:
            self.errors += 1
            log.exception("prefix cache: a snapshot failed")

    def metrics(self) -> dict:
        return {"requests_hit": self.requests_hit, "requests_missed": self.requests_missed,
                "hit_tokens": self.hit_tokens, "miss_tokens": self.miss_tokens, "errors": self.errors,
                **self.cache.stats()}
