"""MTP speculative decoding in the serving engine (``Engine(..., speculative="mtp")``): the MTP block's state
for the engine's rows, run on row ranges as ``Session.forward_rows`` runs the main graph.

Each row of the engine has a row of the block's state (its sliding window). Entry ``p`` of a row pairs the
main model's streams at position ``p`` with the token at ``p + 1`` (``v4c/runtime/mtp.py``). The engine
hands this class the entries each call makes known (``append``): a prefill chunk's at once (the next tokens
are the prompt's), except its last, whose next token is the first one sampled; a verify step's kept
positions with the next drafts' own draft call. ``draft`` appends those pending entries, whose last logits
give draft 1, then chains the block on its own streams for drafts 2..k, and takes the chained entries back
(``RewindPoint``): the next step appends them again from the main model's streams.

A row resumed from the prefix cache starts its block state empty at the resume position (the cache holds
the main model's states only): the first drafts after it see fewer earlier entries, which can only lower
their acceptance, never change the tokens (every token is the main model's).
"""
from __future__ import annotations

import logging
import time

import torch

from ..graph.analysis import BLOCK_TOKENS
from ..runtime.rewind import RewindPoint
from ..runtime.sampling import sample_rows, token_logprobs
from ..runtime.speculative import _pick, accept
from ..runtime.state_layout import fill_value

log = logging.getLogger("v4c.serve")


class RowDrafter:
    """The MTP block's state for ``batch_size`` engine rows of up to ``max_context`` tokens."""

    def __init__(self, block, batch_size: int, max_context: int):
        self.block = block
        self.state = block.new_state(batch_size, max_context)
        self.layouts = block.layouts

    # -- rows ----------------------------------------------------------------------------------------

    def reset_rows(self, rows) -> None:
        if not rows:
            return
        idx = torch.tensor(sorted(rows), dtype=torch.int64, device=self.state.lengths.device)
        for t in self.state.states.values():
            t.index_fill_(0, idx, fill_value(t))
        self.state.lengths.index_fill_(0, idx, 0)

    def reset(self) -> None:
        for t in self.state.states.values():
            t.fill_(fill_value(t))
        self.state.lengths.zero_()

    def _views(self, a: int, b: int):
        return {k: v[a:b] for k, v in self.state.states.items()}, self.state.lengths[a:b]

    def _run(self, a: int, b: int, ids: torch.Tensor, hidden: torch.Tensor, counts: torch.Tensor):
        """``MTPState.forward`` on the rows ``a..b-1`` alone (views of the buffers, updated in place): row i
        appends its first ``counts[i]`` entries. Returns float32 logits [b - a, T, V] and the streams."""
        st = self.state
        dev = self.block.device
        states, lens = self._views(a, b)
        ids = ids.to(dev, torch.int64)
        counts = counts.to(dev, torch.int64)
        if bool((lens + counts > st.allocated).any()):
            raise ValueError(f"the MTP state holds {st.allocated} entries per row; this call would pass it")
        steps = torch.arange(ids.shape[1], device=dev)[None, :]
        pos = torch.where(steps < counts[:, None], lens[:, None] + steps, torch.full_like(steps, -1))
        ids = ids.masked_fill(pos < 0, 0)
        logits, stream = self.block.executor.run(
            {"ids": ids, "pos": pos, "hidden": hidden.to(dev, st._hidden_dtype)}, states)
        lens += counts
        return logits.float(), stream

    def append(self, entries: dict) -> dict:
        """Appends ``entries``: row -> (start, hidden [T, n, D], next ids [T]), the row's entries at positions
        ``start..start + T - 1`` (the row's state is taken to hold every entry before ``start``: a row resumed
        from the prefix cache starts there). One call over the rows' range (the rows between: padding).
        Returns row -> (logits [V], stream [n, D]) of its last entry."""
        entries = {r: e for r, e in entries.items() if e[1].shape[0] > 0}
        if not entries:
            return {}
        rows = sorted(entries)
        a, b = rows[0], rows[-1] + 1
        t = max(e[1].shape[0] for e in entries.values())
        h0 = next(iter(entries.values()))[1]
        hidden = torch.zeros((b - a, t, *h0.shape[1:]), dtype=h0.dtype, device=h0.device)
        ids = torch.zeros((b - a, t), dtype=torch.int64)
        counts = torch.zeros(b - a, dtype=torch.int64)
        for r, (start, h, nxt) in entries.items():
            n = h.shape[0]
            hidden[r - a, :n] = h
            ids[r - a, :n] = torch.as_tensor(nxt, dtype=torch.int64)
            counts[r - a] = n
            self.state.lengths[r] = start
        logits, stream = self._run(a, b, ids, hidden, counts)
        return {r: (logits[r - a, int(counts[r - a]) - 1], stream[r - a, int(counts[r - a]) - 1]) for r in rows}

    def draft(self, rows: list[tuple]) -> dict:
        """Drafts for ``rows``: (row, pending entries (start, hidden, next ids), k, temperature, top_p,
        generator), every pending set non-empty and k >= 1. Returns row -> (k draft tokens, the distributions
        they were drawn from [k, V] when sampling, else None)."""
        if not rows:
            return {}
        first = self.append({row: pend for row, pend, *_ in rows})
        spec = {row: (k, temp, top_p, gen) for row, _, k, temp, top_p, gen in rows}
        a, b = min(spec), max(spec) + 1
        kmax = max(k for k, *_ in spec.values())
        logits = {row: first[row][0] for row in spec}
        stream = {row: first[row][1] for row in spec}
        toks: dict = {row: [] for row in spec}
        dists: dict = {row: [] for row in spec}
        chain = None
        if kmax > 1:
            chained = torch.zeros(b - a, dtype=torch.int64)
            for row, (k, *_) in spec.items():
                chained[row - a] = k - 1
            states, lens = self._views(a, b)
            chain = RewindPoint.take(states, self.layouts, lens, chained.to(lens.device))
        try:
            for j in range(kmax):
                for row, (k, temp, top_p, gen) in spec.items():
                    if j < k:
                        tok, q = _pick(logits[row][None], temp, top_p, gen)
                        toks[row].append(int(tok[0]))
                        dists[row].append(q)
                more = [row for row, (k, *_) in spec.items() if j + 1 < k]
                if not more:
                    continue
                lo, hi = min(more), max(more) + 1
                s0 = stream[more[0]]
                hidden = torch.zeros((hi - lo, 1, *s0.shape), dtype=s0.dtype, device=s0.device)
                ids = torch.zeros((hi - lo, 1), dtype=torch.int64)
                counts = torch.zeros(hi - lo, dtype=torch.int64)
                for row in more:
                    hidden[row - lo, 0] = stream[row]
                    ids[row - lo, 0] = toks[row][-1]
                    counts[row - lo] = 1
                lg, st = self._run(lo, hi, ids, hidden, counts)
                for row in more:
                    logits[row], stream[row] = lg[row - lo, 0], st[row - lo, 0]
        finally:
            if chain is not None:  # the chained entries are taken back
                states, lens = self._views(a, b)
                lens.copy_(chain.restore(states, torch.zeros_like(chain.counts)))
        return {row: (toks[row], torch.cat(dists[row]) if spec[row][1] > 0 else None) for row in spec}


# ---- the engine's steps with speculation (``Engine`` calls these with itself) -------------------------

def feed_prefill(engine, members: list) -> None:
    """After a call of prefill chunks: their MTP entries (the main model's streams at each position, with
    the token after it) go into the block's state now; a prompt's last entry waits (``_Request.mtp``) for
    the token sampled after it."""
    stream = engine.session.stream
    if stream is None:
        raise RuntimeError("the main graph gave no streams for the MTP block")
    a = min(r.row for r, _ in members)
    now = {}
    for r, toks in members:
        if r.pending is not None:
            continue
        s, e = r.fed, r.fed + len(toks)
        h = stream[r.row - a, :len(toks)]
        if e < len(r.prompt):
            now[r.row] = (s, h, r.prompt[s + 1:e + 1])
        else:
            if len(toks) > 1:
                now[r.row] = (s, h[:-1], r.prompt[s + 1:e])
            r.mtp = (e - 1, h[-1:].clone(), [])
    if now:
        engine._drafter.append(now)


def speculate(engine, decode: list) -> int:
    """The decode rows' step with speculative decoding (the module docstring): the MTP block drafts up
    to ``draft_tokens`` per row, one call over the rows' range verifies them (each row's pending token
    and its drafts), each row takes its accepted run (and the main model's token after it) up to its
    first stop, its ``max_tokens`` or, with the prefix cache, the next block boundary, and the session
    is rewound to what each row kept. Releases the requests that ended; returns the verify call's
    token count (-1: a rewind failed and every request ended)."""
    k = engine.draft_tokens
    plan = []  # (request, tokens in its row, drafts it makes)
    for r in decode:
        n = r.fed + len(r.history)
        kr = min(k, r.params.max_tokens - r.generated - 1, engine.max_context - n - 1) if r.mtp is not None else 0
        plan.append((r, n, max(0, kr)))
    # 1. drafts (a row's last token is never drafted for: nothing would follow it)
    try:
        drafted = engine._drafter.draft([(r.row, r.mtp, kr, r.params.temperature, r.params.top_p, r.generator)
                                       for r, _, kr in plan if kr > 0])
    except Exception as e:
        engine._fail_requests(decode, "drafting", e)
        return 0
    for r, _, kr in plan:
        if kr > 0:
            r.mtp = None  # appended by draft
    # 2. one verify call: row r appends its pending token and its drafts
    a, b = min(r.row for r in decode), max(r.row for r in decode) + 1
    t = max(kr for *_, kr in plan) + 1
    ids = torch.zeros((b - a, t), dtype=torch.int64)
    lengths = [0] * (b - a)
    counts = torch.zeros(engine.max_batch, dtype=torch.int64)
    for r, _, kr in plan:
        ids[r.row - a, :kr + 1] = torch.tensor([r.pending] + (drafted[r.row][0] if kr else []))
        lengths[r.row - a] = counts[r.row] = kr + 1
    try:
        point = engine.session.rewind_point(counts)
        logits = engine.session.forward_rows(a, b, ids, lengths)
        stream = engine.session.stream
        if stream is None:
            raise RuntimeError("the main graph gave no streams for the MTP block")
    except Exception as e:
        engine._fail_requests(decode, "a verify call", e)
        return 0
    # 3. acceptance, per row with its own sampling parameters and generator; the tokens taken
    now = time.perf_counter()
    keep = torch.zeros(engine.max_batch, dtype=torch.int64)
    ended = []
    accepted: list[tuple[int, int]] = []  # (drafts, accepted) per row-step that drafted
    n_tokens = 0
    for r, n, kr in plan:
        i, x, p = r.row - a, r.pending, r.params
        try:
            if kr:
                d, q = drafted[r.row]
                acc, y = accept(logits[i:i + 1, :kr + 1], torch.tensor([d], device=logits.device),
                                None if q is None else q[None], p.temperature, p.top_p, r.generator)
                acc, y = int(acc[0]), int(y[0])
                accepted.append((kr, acc))
            else:
                d, acc = [], 0
                y = int(sample_rows(logits[i:i + 1, 0], [p.temperature], [p.top_p], [r.generator])[0])
            new = d[:acc] + [y]
            if engine._prefix is not None:  # land on a block boundary rather than pass it: snapshotted there
                new = new[:BLOCK_TOKENS - n % BLOCK_TOKENS]
            lps = [None] * len(new)
            if p.logprobs is not None:
                got = token_logprobs(logits[i, :len(new)], torch.tensor(new), p.logprobs)
                lps = [(lp, alts[:p.logprobs]) for lp, alts in got]
        except Exception as e:
            engine._finish(r, "error", f"sampling failed: {type(e).__name__}: {e}")
            ended.append(r)
            continue
        for j, tok in enumerate(new):
            n_tokens += 1
            if engine._take(r, tok, lps[j], now):
                ended.append(r)
                break
        keep[r.row] = j + 1  # the row holds x and the tokens before the last one taken
        r.history += [x] + new[:j]
        if r not in ended:  # positions n..n + j: entry n + i reads the token after it, new[i]
            h = stream[i, :j + 1].clone()
            if r.mtp is not None:  # (not drafted this step: what it had waits with it)
                h, nxt = torch.cat([r.mtp[1], h]), r.mtp[2] + new[:j + 1]
                r.mtp = (r.mtp[0], h, nxt)
            else:
                r.mtp = (n, h, new[:j + 1])
    # 4. every state back to what the rows kept
    try:
        engine.session.rewind(point, keep)
    except Exception as e:
        log.exception("rewinding the session failed; every request ends with an error")
        engine._fail_everything(f"rewinding after a verify call failed: {type(e).__name__}: {e}")
        return -1
    if engine._prefix is not None:
        for r, *_ in plan:
            if r.row >= 0 and (r.final is None or r.final.reason != "error"):
                engine._prefix.fed(r)
    with engine._cv:
        engine._generation_tokens_total += n_tokens
        engine._spec_steps += 1
        for kr, acc in accepted:
            engine._spec_drafts += kr
            engine._spec_accepted += acc
            engine._spec_hist.observe(acc)
    engine._release(ended)
    return sum(kr + 1 for *_, kr in plan)
