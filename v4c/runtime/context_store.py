"""The prefix cache's disk tier: snapshots as safetensors files that outlive the server.

A directory holds two kinds of files, each named by a key of the block hash chain
(``prefix_cache``):

- ``b-<chain hash>.safetensors``: one block's compressed rows (one tensor per rows buffer);
- ``s-<key>.safetensors``: one snapshot's tail (its ring slots and partial block), with the chain
  hashes of its blocks in the metadata: a prefix's blocks are written once, whatever the number of
  snapshots that share them.

Every file's metadata names the format, the artifact's state identity, its kind and key, and the
SHA-256 of its content (the metadata and every tensor's name, dtype, shape and bytes), checked on
each read. A file that fails any check (truncated, corrupted, renamed, written by another artifact
or another format) is never used: it is counted (``corrupt``, ``foreign``), and removed when it
claims to be this artifact's. Files are written whole or not at all (``write_safetensors``: a
temporary renamed over the name), by a background thread, so a request never waits for the disk.
The least recently used snapshots (a read refreshes a file's mtime, so the order survives a
restart) are deleted beyond the byte budget, blocks with the last snapshot that needs them.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import threading
import time
from collections import Counter
from pathlib import Path
from types import MappingProxyType

import torch

from ..errors import CheckpointError
from ..graph.analysis import BLOCK_TOKENS
from ..io.safetensors import SafetensorsFile, write_safetensors
from .cache_index import Entry, TierIndex
from .snapshot import Block, Snapshot

log = logging.getLogger("v4c.context_cache")

FORMAT = "v4c-context-cache/1"
_NAME = re.compile(r"([bs])-([0-9a-f]{64})\.safetensors")


class _Bad(Exception):
    """A file that must not be used; the message says why."""


def content_hash(meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "content_sha256"}, sort_keys=True)
                       .encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class DiskTier:
    def __init__(self, directory, capacity: int, identity: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.identity = identity
        self.index = TierIndex(capacity)
        self.counts = Counter(reads=0, writes=0, corrupt=0, foreign=0, missing=0, write_errors=0)
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._pending: set[str] = set()  # keys queued or being written
        self._thread: threading.Thread | None = None
        self._scan()

    def _path(self, kind: str, key: str) -> Path:
        return self.dir / f"{kind}-{key}.safetensors"

    # -- startup -----------------------------------------------------------------------------------

    def _scan(self) -> None:
        """Indexes the files of this artifact already there (headers only; contents are checked on read)."""
        blocks, snaps = {}, []
        for p in self.dir.iterdir():
            m = _NAME.fullmatch(p.name)
            if m is None:
                continue  # not ours (writers' temporaries start with a dot)
            kind, key = m.groups()
            try:
                f = SafetensorsFile(p)
                meta, size, mtime = f.metadata, p.stat().st_size, p.stat().st_mtime
            except (CheckpointError, OSError) as e:
                self._reject(p, "corrupt", str(e), remove=False)
                continue
            if meta.get("format") != FORMAT or meta.get("identity") != self.identity:
                self.counts["foreign"] += 1  # another artifact's (or version's): left alone
                continue
            if meta.get("kind") != kind or meta.get("key") != key:
                self._reject(p, "corrupt", "its metadata names another file")
                continue
            if kind == "b":
                blocks[key] = size
                continue
            try:
                entry = _entry(meta, size)
            except (ValueError, KeyError, TypeError) as e:
                self._reject(p, "corrupt", f"bad metadata ({e})")
                continue
            snaps.append((mtime, key, entry))
        for _, key, entry in sorted(snaps, key=lambda s: s[0]):  # oldest use first: the LRU order
            if any(h not in blocks for h in entry.blocks):
                self._reject(self._path("s", key), "missing", "one of its block files is gone")
                continue
            self.index.add(key, entry, blocks)
        for h in set(blocks) - set(self.index.blocks):  # left by a writer stopped between block and snapshot
            self._unlink(self._path("b", h))
        self._delete(*self.index.evict())

    def _reject(self, path: Path, count: str, why: str, remove: bool = True) -> None:
        self.counts[count] += 1
        log.warning("context cache: ignoring %s: %s", path, why)
        if remove:
            self._unlink(path)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass

    def _delete(self, keys, blocks) -> None:
        for k in keys:
            self._unlink(self._path("s", k))
        for h in blocks:
            self._unlink(self._path("b", h))

    # -- reading -----------------------------------------------------------------------------------

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self.index

    def tails(self, base: str) -> list[int]:
        with self._lock:
            return self.index.tails(base)

    def _read(self, kind: str, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        path = self._path(kind, key)
        try:
            f = SafetensorsFile(path)
            tensors = {n: f.tensor(n).clone() for n in f.names()}  # a copy: the file may go
        except (CheckpointError, OSError) as e:
            raise _Bad(f"{path}: {e}") from None
        meta = f.metadata
        if meta.get("format") != FORMAT or meta.get("identity") != self.identity:
            raise _Bad(f"{path}: written by another artifact or format")
        if meta.get("kind") != kind or meta.get("key") != key:
            raise _Bad(f"{path}: its metadata names another file")
        if content_hash(meta, tensors) != meta.get("content_sha256"):
            raise _Bad(f"{path}: content differs from its hash")
        return tensors, meta

    def load(self, key: str, known_block) -> Snapshot | None:
        """The snapshot ``key`` read back (``known_block(h)``: a Block already in memory, or None), or
        None when it is not here or a file of it fails its checks (then it is dropped and counted)."""
        with self._lock:
            entry = self.index.entries.get(key)
            if entry is None:
                return None
            entry.pins += 1  # its files stay while they are read
        bad = ("s", key)
        try:
            tail, meta = self._read("s", key)
            if _entry(meta, 0).blocks != entry.blocks:  # replaced since it was indexed
                raise _Bad(f"{self._path('s', key)}: its blocks differ from those it had")
            blocks = []
            for h in entry.blocks:
                b = known_block(h)
                if b is None:
                    bad = ("b", h)
                    rows, _ = self._read("b", h)
                    b = Block(MappingProxyType(rows))
                blocks.append(b)
            snap = Snapshot(len(blocks) * BLOCK_TOKENS + entry.tail, tuple(blocks), MappingProxyType(tail))
        except (_Bad, ValueError, KeyError, TypeError) as e:
            with self._lock:
                entry.pins -= 1
                self.counts["corrupt"] += 1
                if bad[0] == "b":  # every snapshot that needs that block goes with it
                    gone = self.index.drop_block(bad[1])
                else:
                    gone = ([key], self.index.remove(key)) if key in self.index else ([], [])
            log.warning("context cache: ignoring a bad file: %s", e)
            self._delete(*gone)
            self._unlink(self._path(*bad))
            return None
        with self._lock:
            entry.pins -= 1
            self.counts["reads"] += 1
            if key in self.index:
                self.index.touch(key)
        try:
            now = time.time()
            os.utime(self._path("s", key), (now, now))  # the LRU order, kept across restarts
        except OSError:
            pass
        return snap

    # -- writing -----------------------------------------------------------------------------------

    def put(self, key: str, snap: Snapshot, blocks: tuple[str, ...], base: str) -> None:
        """Queues ``snap`` (key ``key``, block hashes ``blocks``) for writing, unless it is here."""
        with self._lock:
            if key in self.index or key in self._pending:
                return
            self._pending.add(key)
            if self._thread is None:
                self._thread = threading.Thread(target=self._writer, name="v4c-context-cache", daemon=True)
                self._thread.start()
        self._queue.put((key, snap, blocks, base))

    def flush(self) -> None:
        """Waits until every queued snapshot is on disk (or failed)."""
        self._queue.join()

    def close(self) -> None:
        self.flush()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                self._write(*item)
            except Exception:  # a full disk, a removed directory: the cache is an optimisation
                log.exception("context cache: writing a snapshot failed")
                with self._lock:
                    self.counts["write_errors"] += 1
            finally:
                if item is not None:
                    with self._lock:
                        self._pending.discard(item[0])
                self._queue.task_done()

    def _file(self, kind: str, key: str, tensors: dict[str, torch.Tensor], extra: dict[str, str]) -> int:
        tensors = {n: t.detach().cpu().contiguous() for n, t in tensors.items()}
        meta = {"format": FORMAT, "identity": self.identity, "kind": kind, "key": key, **extra}
        meta["content_sha256"] = content_hash(meta, tensors)
        path = self._path(kind, key)
        write_safetensors(path, tensors, meta)
        return path.stat().st_size

    def _write(self, key: str, snap: Snapshot, blocks: tuple[str, ...], base: str) -> None:
        with self._lock:  # the blocks already here are held for this write (they could be evicted meanwhile)
            have = [h for h in blocks if h in self.index.blocks]
            for h in have:
                self.index.ref(h)
        written: dict[str, int] = {}
        try:
            for h, b in zip(blocks, snap.blocks):
                if h not in have:
                    written[h] = self._file("b", h, dict(b.rows), {})
            tail = snap.length - len(blocks) * BLOCK_TOKENS
            size = self._file("s", key, dict(snap.tail), {"length": str(snap.length), "base": base,
                                                         "tail": str(tail), "blocks": json.dumps(list(blocks))})
            with self._lock:
                self.index.add(key, Entry(size, tuple(blocks), base, tail), written)
                self.counts["writes"] += 1
            written = {}
        finally:
            with self._lock:
                freed = [h for h in have if self.index.unref(h)]
                gone = self.index.evict()
            self._delete([], freed + list(written))  # blocks of a failed write are not kept
            self._delete(*gone)

    def stats(self) -> dict:
        with self._lock:
            return {"bytes": self.index.nbytes, "capacity": self.index.capacity, "entries": len(self.index),
                    "blocks": len(self.index.blocks), "evictions": self.index.evictions,
                    "pending_writes": len(self._pending), **self.counts}


def _entry(meta: dict[str, str], size: int) -> Entry:
    blocks = json.loads(meta["blocks"])
    if not isinstance(blocks, list) or not all(isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h)
                                               for h in blocks):
        raise ValueError("blocks is not a list of chain hashes")
    tail, length = int(meta["tail"]), int(meta["length"])
    if not 0 <= tail < BLOCK_TOKENS or length != len(blocks) * BLOCK_TOKENS + tail:
        raise ValueError(f"length {length} disagrees with {len(blocks)} blocks and a tail of {tail}")
    return Entry(size, tuple(blocks), meta["base"], tail)
