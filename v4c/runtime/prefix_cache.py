"""The prefix cache: sequences' states kept by their tokens, so a prompt that starts like an earlier
one computes only the rest.

**Keys.** A hash chain over 256-token blocks of token ids: ``h0`` hashes the artifact's state
identity (``Artifact.state_identity``: config, graph with its cache formats, weights), and
``h[k+1] = sha256(h[k] + the ids of block k)``, so one hash names a whole prefix and nothing of
another model or cache format can ever match. A snapshot at a block boundary (``256 k`` tokens) is
keyed ``h[k]``; one at any other length (the end of a finished request: the multi-turn case) by
the hash of ``h[k]`` and its remaining ids. Snapshots share their blocks (``snapshot.Block``) by
the blocks' chain hashes.

**Lookup.** ``lookup(tokens)`` finds the longest cached snapshot whose sequence is a prefix of
``tokens``, shorter than ``tokens`` (the last token must be computed for its logits): per whole
block from the longest down, first the exact lengths cached after that block, then the boundary.

**Tiers.** Memory (a byte budget, least recently used first, reference counts so a snapshot being
restored is never evicted; tensors stay on the session's device) and optionally disk
(``context_store``, which survives a restart). A disk hit is read back into memory.
"""
from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..graph.analysis import BLOCK_TOKENS
from .cache_index import Entry, TierIndex
from .snapshot import Snapshot

DEFAULT_MEMORY_BYTES = 1 << 30
DEFAULT_DISK_BYTES = 16 << 30
_VERSION = b"v4c-prefix-chain/1\0"


def _ids_bytes(tokens) -> bytes:
    return np.asarray(tokens, dtype="<i8").tobytes()


def tail_key(base: str, tail) -> str:
    """The key of a snapshot of the blocks hashed by ``base`` followed by the ids ``tail``."""
    return hashlib.sha256(bytes.fromhex(base) + b"tail" + _ids_bytes(tail)).hexdigest()


@dataclass(frozen=True, eq=False)
class Hit:
    """A snapshot found by ``lookup``: held (not evicted) until ``release``."""
    key: str
    length: int
    snapshot: Snapshot
    tier: str  # "memory" or "disk"


class PrefixCache:
    """Snapshots of sequences by their token ids; ``v4c.runtime.prefix_cache`` says how.

    ``memory_bytes``: the memory tier's budget (0: none); ``disk_dir`` and ``disk_bytes``: the disk
    tier, off without a directory. ``identity``: what keys are bound to (``for_model`` takes the
    artifact's)."""

    def __init__(self, identity: str, memory_bytes: int = DEFAULT_MEMORY_BYTES, disk_dir=None,
                 disk_bytes: int = DEFAULT_DISK_BYTES):
        for name, v in (("memory_bytes", memory_bytes), ("disk_bytes", disk_bytes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        self.identity = identity
        self.root = hashlib.sha256(_VERSION + identity.encode()).hexdigest()
        self._lock = threading.RLock()
        self._index = TierIndex(memory_bytes)
        self._snaps: dict[str, Snapshot] = {}
        self._blocks: dict = {}  # chain hash -> Block, every block of a snapshot in memory
        self.counts = {"lookups": 0, "hits": 0, "misses": 0, "hit_tokens": 0, "stores": 0}
        self.disk = None
        if disk_dir is not None:
            from .context_store import DiskTier
            self.disk = DiskTier(Path(disk_dir), disk_bytes, identity)

    @classmethod
    def for_model(cls, model, **kw) -> "PrefixCache":
        from ..artifact import Artifact
        return cls(Artifact(model.manifest, Path(model.path)).state_identity(), **kw)

    # -- keys --------------------------------------------------------------------------------------

    def chain(self, tokens: Sequence[int], known: Sequence[str] | None = None) -> list[str]:
        """``[h0, h1, ..., hk]`` for the ``k`` whole blocks of ``tokens``; ``known``: a chain already
        computed for a prefix of ``tokens`` (only the blocks past it are hashed)."""
        out = list(known[:len(tokens) // BLOCK_TOKENS + 1]) if known else [self.root]
        for k in range(len(out) - 1, len(tokens) // BLOCK_TOKENS):
            block = tokens[k * BLOCK_TOKENS:(k + 1) * BLOCK_TOKENS]
            out.append(hashlib.sha256(bytes.fromhex(out[k]) + _ids_bytes(block)).hexdigest())
        return out

    def _key(self, tokens: Sequence[int], chain: list[str]) -> str:
        k = len(tokens) // BLOCK_TOKENS
        return chain[k] if len(tokens) % BLOCK_TOKENS == 0 else tail_key(chain[k], tokens[k * BLOCK_TOKENS:])

    # -- lookup ------------------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int], limit: int | None = None, chain: Sequence[str] | None = None,
               longer_than: int = 0) -> Hit | None:
        """The longest cached prefix of ``tokens`` of at most ``limit`` tokens (default: all but the
        last) and more than ``longer_than``, held until ``release(hit)``; None when there is none."""
        n = len(tokens)
        limit = n - 1 if limit is None else min(limit, n)
        chain = self.chain(tokens[:max(limit, 0)], chain)
        with self._lock:
            self.counts["lookups"] += 1
        for k in range(len(chain) - 1, -1, -1):
            start = k * BLOCK_TOKENS
            if start + BLOCK_TOKENS - 1 <= longer_than:
                break  # nothing from here down is longer
            with self._lock:
                tails = set(self._index.tails(chain[k]))
            if self.disk is not None:
                tails |= set(self.disk.tails(chain[k]))
            cands = [(tail_key(chain[k], tokens[start:start + t]), start + t)
                     for t in sorted(tails, reverse=True) if start + t <= limit and start + t > longer_than]
            if k > 0 and start > longer_than:
                cands.append((chain[k], start))
            for key, length in cands:
                hit = self._get(key, length, chain)
                if hit is not None:
                    with self._lock:
                        self.counts["hits"] += 1
                        self.counts["hit_tokens"] += length
                    return hit
        with self._lock:
            self.counts["misses"] += 1
        return None

    def _get(self, key: str, length: int, chain: list[str]) -> Hit | None:
        with self._lock:
            if key in self._index:
                self._index.entries[key].pins += 1
                self._index.touch(key)
                return Hit(key, length, self._snaps[key], "memory")
        if self.disk is None:
            return None
        snap = self.disk.load(key, self._blocks.get)
        if snap is None or snap.length != length:
            return None
        k = length // BLOCK_TOKENS
        snap = self._insert(key, snap, tuple(chain[1:k + 1]), chain[k], pin=True)
        return Hit(key, length, snap, "disk")

    def release(self, hit: Hit) -> None:
        """Ends the hold of ``lookup`` on ``hit``."""
        with self._lock:
            e = self._index.entries.get(hit.key)
            if e is not None and e.pins > 0 and self._snaps.get(hit.key) is hit.snapshot:
                e.pins -= 1
                self._evict()

    def resume(self, session, row: int, tokens: Sequence[int], limit: int | None = None,
               chain: Sequence[str] | None = None) -> int:
        """Restores the longest cached prefix of ``tokens`` (see ``lookup``) into the empty row ``row``
        of ``session``; returns its length (0: nothing cached, the row is untouched)."""
        hit = self.lookup(tokens, limit, chain)
        if hit is None:
            return 0
        try:
            session.restore(row, hit.snapshot)
        finally:
            self.release(hit)
        return hit.length

    # -- storing -----------------------------------------------------------------------------------

    def store(self, session, row: int, tokens: Sequence[int], chain: Sequence[str] | None = None) -> bool:
        """Keeps a snapshot of ``row`` of ``session``, which holds exactly the sequence ``tokens``
        (blocks this cache holds already are shared, not copied); False when it was cached already."""
        n = len(tokens)
        if n != int(session.lengths[row]):
            raise ValueError(f"row {row} holds {int(session.lengths[row])} tokens, not the {n} given")
        if n == 0:
            return False
        chain = self.chain(tokens, chain)
        key, k = self._key(tokens, chain), n // BLOCK_TOKENS
        hashes = tuple(chain[1:k + 1])
        on_disk = self.disk is not None and key in self.disk
        with self._lock:
            snap = self._snaps.get(key)
            if snap is not None:
                self._index.touch(key)
            if on_disk or (snap is not None and self.disk is None):
                return False  # (a snapshot only on disk comes back to memory when it is looked up)
            reuse = [self._blocks.get(h) for h in hashes]
        if snap is None:
            snap = self._insert(key, session.snapshot(row, reuse), hashes, chain[k])
        if self.disk is not None:
            self.disk.put(key, snap, hashes, chain[k])
        with self._lock:
            self.counts["stores"] += 1
        return True

    def _insert(self, key: str, snap: Snapshot, hashes: tuple[str, ...], base: str, pin: bool = False) -> Snapshot:
        """Puts ``snap`` in the memory tier (its blocks replaced by those held under the same hashes)
        unless it alone is over the budget; returns the snapshot as held."""
        with self._lock:
            if key in self._index:
                return self._snaps[key]
            blocks = tuple(self._blocks.get(h, b) for h, b in zip(hashes, snap.blocks))
            snap = Snapshot(snap.length, blocks, snap.tail)
            new = {h: b.nbytes for h, b in zip(hashes, blocks) if h not in self._blocks}
            if snap.tail_nbytes + sum(new.values()) > self._index.capacity:
                return snap
            self._index.add(key, Entry(snap.tail_nbytes, hashes, base, snap.length - len(hashes) * BLOCK_TOKENS,
                                       pins=1 if pin else 0), new)
            self._snaps[key] = snap
            for h, b in zip(hashes, blocks):
                self._blocks.setdefault(h, b)
            self._evict()
            return snap

    def _evict(self) -> None:
        keys, freed = self._index.evict()
        for k in keys:
            del self._snaps[k]
        for h in freed:
            del self._blocks[h]

    # -- the rest ----------------------------------------------------------------------------------

    def stats(self) -> dict:
        """Counters (``lookups``, ``hits``, ``misses``, ``hit_tokens``, ``stores``) and per tier its
        ``bytes``, ``capacity``, ``entries``, ``blocks`` and ``evictions`` (memory: also ``held``, the
        entries looked up and not yet released; disk: also ``reads``,
        ``writes``, ``corrupt``, ``foreign``, ``missing``, ``write_errors``; None without a disk tier)."""
        with self._lock:
            mem = {"bytes": self._index.nbytes, "capacity": self._index.capacity, "entries": len(self._index),
                   "blocks": len(self._index.blocks), "evictions": self._index.evictions,
                   "held": sum(1 for e in self._index.entries.values() if e.pins)}
            out = {**self.counts, "memory": mem}
        out["disk"] = self.disk.stats() if self.disk is not None else None
        return out

    def flush(self) -> None:
        """Waits for the disk tier's writes."""
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()
