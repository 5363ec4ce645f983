"""Draft sources for the speculative-decoding tests (not a test file).

Random weights make the MTP block's drafts almost always wrong, which tests rejections only. These drafters
know the plain greedy continuation and get each draft right with a chosen probability, so a test controls
the acceptance and knows, step by step, how many drafts must be accepted and which positions are rejected.
"""
from __future__ import annotations

import torch

from v4c.runtime.speculative import MTPDrafter


class OracleDrafter:
    """Drafts ``truth[b]`` (row b's prompt + plain greedy continuation), each draft replaced by another token
    with probability ``miss``. ``expected[a]`` counts row-steps whose first a drafts were right (and the next
    wrong, or a = k); ``rejected`` lists the positions of drafts a verify step must take back."""

    def __init__(self, truth: list[list[int]], miss: float, vocab: int, seed: int = 0):
        self.truth, self.miss, self.vocab = truth, miss, vocab
        self.gen = torch.Generator().manual_seed(seed)
        self.entries = [0] * len(truth)  # per row: MTP entries fed, i.e. the position of the token x
        self.expected: list[int] = []
        self.rejected: list[int] = []

    def feed(self, hidden, ids, counts) -> None:
        for b, c in enumerate(counts.tolist()):
            self.entries[b] += c

    def _drafts(self, k: int, active) -> torch.Tensor:
        if len(self.expected) < k + 1:
            self.expected = [0] * (k + 1)
        out = torch.zeros(len(self.truth), k, dtype=torch.int64)
        for b, row in enumerate(self.truth):
            x = self.entries[b]
            right = [x + 1 + j < len(row) for j in range(k)]
            for j in range(k):
                want = row[x + 1 + j] if right[j] else 0
                wrong = bool(torch.rand(1, generator=self.gen) < self.miss)
                out[b, j] = (want + 1 + int(torch.randint(self.vocab - 1, (1,), generator=self.gen))) % self.vocab \
                    if wrong else want
                right[j] = right[j] and not wrong
            if active[b]:
                a = next((j for j in range(k) if not right[j]), k)
                self.expected[a] += 1
                self.rejected += [x + 1 + j for j in range(a, k)]
        return out

    def draft(self, k, temperature, top_p, gen, active):
        return self._drafts(k, active), None


class SteeredMTPDrafter(MTPDrafter):
    """The model's own MTP drafter, run as in production (its state advances, chains and is rewound), whose
    drafts are then replaced by an ``OracleDrafter``'s: real MTP state handling at a chosen acceptance."""

    def __init__(self, model, batch_size, max_context, oracle: OracleDrafter):
        super().__init__(model, batch_size, max_context)
        self.oracle = oracle

    def feed(self, hidden, ids, counts) -> None:
        super().feed(hidden, ids, counts)
        self.oracle.feed(hidden, ids, counts)

    def draft(self, k, temperature, top_p, gen, active):
        super().draft(k, temperature, top_p, gen, active)
        return self.oracle.draft(k, temperature, top_p, gen, active)
