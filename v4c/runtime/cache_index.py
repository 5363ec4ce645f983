"""The bookkeeping of one tier of the prefix cache (memory or disk), apart from what it stores.

A tier holds **entries** (snapshots: a sequence's ring slots and partial block) that reference
**blocks** (the compressed rows of one 256-token block, shared by every entry whose sequence starts
with that block's prefix). Bytes are counted once per block; a block lives while an entry references
it (a reference count), and goes with the last one. Entries are evicted least recently used first
until the tier is within its byte budget, except pinned ones (being restored, being written), so a
snapshot in use never loses its blocks. Not thread-safe: the tier that owns an index locks it.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass


@dataclass
class Entry:
    nbytes: int  # its own bytes, its blocks apart
    blocks: tuple[str, ...]  # the chain hashes of its whole blocks, in order
    base: str  # the chain hash its tail follows (of its last whole block, or the chain's root)
    tail: int  # its tokens after the whole blocks (0: a snapshot at a block boundary)
    pins: int = 0


class TierIndex:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # least recently used first
        self.blocks: dict[str, list[int]] = {}  # chain hash -> [bytes, references]
        self._tails: dict[str, Counter] = {}  # base -> how many entries with each tail length > 0
        self.nbytes = 0
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def tails(self, base: str) -> list[int]:
        """Tail lengths (> 0) of the entries that follow ``base``."""
        return [t for t, n in self._tails.get(base, {}).items() if n > 0]

    def touch(self, key: str) -> None:
        self.entries.move_to_end(key)

    def ref(self, h: str, nbytes: int = 0) -> None:
        """One more reference to block ``h`` (``nbytes``: its size, when it is new here)."""
        if h in self.blocks:
            self.blocks[h][1] += 1
        else:
            self.blocks[h] = [nbytes, 1]
            self.nbytes += nbytes

    def unref(self, h: str) -> bool:
        """One reference less; True when that was the last and the block is gone."""
        b = self.blocks[h]
        b[1] -= 1
        if b[1] > 0:
            return False
        del self.blocks[h]
        self.nbytes -= b[0]
        return True

    def add(self, key: str, entry: Entry, block_bytes: dict[str, int]) -> None:
        """``block_bytes``: the sizes of the entry's blocks that this tier does not hold yet."""
        if key in self.entries:
            self.touch(key)
            return
        for h in entry.blocks:
            self.ref(h, block_bytes.get(h, 0))
        self.entries[key] = entry
        self.nbytes += entry.nbytes
        if entry.tail:
            self._tails.setdefault(entry.base, Counter())[entry.tail] += 1

    def remove(self, key: str) -> list[str]:
        """Drops entry ``key``; returns the blocks that went with it."""
        e = self.entries.pop(key)
        self.nbytes -= e.nbytes
        if e.tail:
            c = self._tails[e.base]
            c[e.tail] -= 1
            if not +c:
                del self._tails[e.base]
        return [h for h in e.blocks if self.unref(h)]

    def drop_block(self, h: str) -> tuple[list[str], list[str]]:
        """Drops every entry that references block ``h`` (found bad): (entries, blocks) gone."""
        keys = [k for k, e in self.entries.items() if h in e.blocks]
        freed = [b for k in keys for b in self.remove(k)]
        return keys, freed

    def evict(self) -> tuple[list[str], list[str]]:
        """Evicts unpinned entries, oldest use first, until within capacity: (entries, blocks) gone."""
        keys, freed = [], []
        while self.nbytes > self.capacity:
            key = next((k for k, e in self.entries.items() if e.pins == 0), None)
            if key is None:
                break
            keys.append(key)
            freed += self.remove(key)
            self.evictions += 1
        return keys, freed
