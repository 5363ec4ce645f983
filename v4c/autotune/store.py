"""The local tuning store: one SQLite file of JSON tuning records, safe for many processes.

Layout: `$V4C_CACHE_DIR/tuning.sqlite` (default `~/.cache/v4c/tuning.sqlite`; the
directory is read when the store is opened, not at import). One table `records`, primary
key = canonical JSON of `TuningRecord.key()`, value = the record's canonical JSON. No
pickles, no code: every row is validated again when it is read, and a row that fails is
skipped with a warning (treated as a miss), never trusted.

Concurrency: WAL journal, `busy_timeout` 60 s, every write is one `BEGIN IMMEDIATE`
transaction, so any number of processes on one host may read and write at once. SQLite
WAL needs a local filesystem (shared memory); put the store on local disk and share
results through bundles (`sharing.export_bundle`) or Redis, not by pointing many hosts at
one file on NFS.

Merging rule (`put`): per key the store keeps ONE record, the better measurement
(`TuningRecord.rank`: device measurements beat cost-model estimates beat interpreter
numbers, then fewer seconds, then a deterministic tie-break, so the result does not depend
on the order of puts). The loser is not kept; its timings are not appended (they were
measured under other conditions and mixing them would make `timings` lie). What is kept
is provenance in numbers: `history` = how many distinct measurements of that key were
merged (idempotent: putting the same record again does not count; the digests of the
last 256 distinct measurements are remembered for that).

Graded lookup (`lookup`): see `TIERS` and the method's docstring.

Trust: a record's config is checked against this v4c's kernel template (`config_problem`: every
value on the template's META grid, and what its `constraints` can judge without the shapes)
before it is stored, and again when it is read or chosen; a row that fails is a miss, so a bad
record never reaches a launch. Sources of a merge are opened read-only (`TuningStore(p,
readonly=True)`): never created, converted to WAL or written. A compile opens its store with
`open_for_lookup`: an unusable database is one warning and a compile on the cost model.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import sqlite3
import threading
import time
import warnings
from pathlib import Path

from v4c.errors import V4CError

from ..settings import cache_dir
from .records import (KEY_FIELDS, MAX_RECORD_BYTES, RecordError, TuningRecord, _hardware, _toolchain,
                      arch_family, bucket_distance, canonical_json, key_json, make_key,
                      method_quality, parse_bucket, parse_version)

STORE_SCHEMA = 1
BUSY_TIMEOUT_MS = 60_000
SEEN_LIMIT = 256
DECODE_CACHE_CHARS = 32 << 20   # validated records kept per store object (lookups re-read rows)
# Tiers in the order lookup tries them; the last two are assigned by the caller.
TIERS = ("exact", "same-arch", "older-toolchain", "arch-family", "cost-model", "default")


class StoreError(V4CError):
    """A tuning database that cannot be opened, is of a newer schema, or is not SQLite."""


class StoreWarning(RuntimeWarning):
    """The tuning database is unusable; the compile goes on without tuning records."""


# ----------------------------------------------------------------------------- configs

# What a template's constraints are asked when a record's shapes are unknown, for the templates that
# otherwise assume a big model (moe_router: V4's 256 experts; the FP8 norm GEMMs: a whole row as the
# norm group). The smallest problem instead, so only what fails at every size is refused (checked
# against the tiny model's and V4-Flash's shapes).
_FP8_NORM_PROBE = {"inputs": [[1, 16], [16, 16], [16]], "attrs": {"shape": [1, 1, 1, 16]}}
UNKNOWN_SHAPES = {"moe_router": {"inputs": [[1, 1], [1, 1]]},
                  "fp8_linear_rms_norm": _FP8_NORM_PROBE, "fp8_q_proj": _FP8_NORM_PROBE,
                  "fp8_kv_proj": _FP8_NORM_PROBE}


@functools.lru_cache(maxsize=None)
def _template_for(kernel: str):
    """The template module whose META tunes `kernel` (a launcher key such as "linear" or
    "fp8_q_proj"), or None."""
    from ..codegen.emit import FAMILIES, template   # lazy: the templates import triton
    for fam in FAMILIES:
        mod = template(fam)
        if kernel in getattr(mod, "META", {}):
            return mod
    return None


def _on_grid(v, values) -> bool:
    # by type too: JSON's true is not 1, and 8.0 is not the int 8 a launcher expects
    return any(v is g if v is None or g is None else (type(v) is type(g) and v == g) for g in values)


def config_problem(kernel: str, config: dict, shapes=None) -> str | None:
    """Why `config` is not a config this v4c's template for `kernel` can run, or None.

    Every key must be one of the template's META parameters and every value on its grid;
    missing keys take DEFAULT_META's values (as the compile does); then the template's
    `constraints` judge the merged meta at `shapes`, or when None with what holds at any
    size (`UNKNOWN_SHAPES`)."""
    if shapes is None:
        return _problem_cached(kernel, canonical_json(config))
    return _problem(kernel, config, shapes)


@functools.lru_cache(maxsize=4096)
def _problem_cached(kernel: str, config_text: str) -> str | None:
    return _problem(kernel, json.loads(config_text), None)


def _problem(kernel: str, config: dict, shapes) -> str | None:
    mod = _template_for(kernel)
    if mod is None:
        return f"{_short(kernel)} is not a kernel of this v4c (no template tunes it)"
    grid = mod.META[kernel]
    for k, v in config.items():
        if k not in grid:
            return f"{_short(k)} is not a meta-parameter of {kernel} (it has {', '.join(grid)})"
        if not _on_grid(v, grid[k]):
            return (f"{k}={_short(v)} is not on {kernel}'s grid "
                    f"({', '.join(repr(x) for x in grid[k])})")
    meta = {**mod.DEFAULT_META[kernel], **config}
    try:
        probe = copy.deepcopy(UNKNOWN_SHAPES.get(kernel, {})) if shapes is None else shapes
        why = mod.constraints(kernel, meta, probe)
    except Exception as e:  # noqa: BLE001 - a template that cannot judge it does not vouch for it
        why = f"the template's constraints failed on it ({type(e).__name__}: {e})"
    return None if why is None else f"{kernel} cannot run it: {why}"


def _short(v) -> str:
    return ascii(v) if len(repr(v)) <= 80 else ascii(v)[:77] + "..."


def check_record(rec: TuningRecord, shapes=None) -> TuningRecord:
    """`rec` itself, or RecordError("config: ...") when its config fails `config_problem`."""
    why = config_problem(rec.kernel, rec.config, shapes)
    if why is not None:
        raise RecordError(f"config: {why}")
    return rec


def unusable_hint(path) -> str:
    """How to get rid of a broken store file: it holds only a cache, rebuilt by tuning or imports."""
    return (f"to fix it, delete {path} (and {path}-wal, {path}-shm if present); "
            f"`v4c tune` or `v4c cache import` then start a new store")


def open_for_lookup(path=None) -> "TuningStore | None":
    """The store a compile reads configs from, or None after ONE warning (StoreWarning, naming the
    file and the fix) when it cannot be used: a corrupt cache must not block compiles, which
    then take their configs from the cost model and the defaults."""
    try:
        return TuningStore(path)
    except (StoreError, OSError) as e:   # OSError: e.g. a cache directory that cannot be created
        warnings.warn(f"compiling without tuning records (cost model and defaults): {e}",
                      StoreWarning, stacklevel=2)
        return None


def default_cache_dir() -> Path:
    return cache_dir()


def default_store_path() -> Path:
    return default_cache_dir() / "tuning.sqlite"


@dataclasses.dataclass(frozen=True)
class PutResult:
    """What `put` did: "added" (new key), "updated" (replaced a worse record) or "kept"
    (the stored record was at least as good); `previous` is the record stored before."""
    outcome: str
    previous: TuningRecord | None
    record: TuningRecord


@dataclasses.dataclass(frozen=True)
class Lookup:
    """Result of a graded lookup. `tier` is one of TIERS[:4] or None on a miss; `bucket`
    the bucket of the record used (may differ from the one asked for); `distance` the
    bucket distance (0 = same bucket). Unpacks as `record, tier = store.lookup(...)`."""
    record: TuningRecord | None
    tier: str | None
    bucket: str | None
    distance: float | None = None

    def __bool__(self):
        return self.record is not None

    def __iter__(self):
        return iter((self.record, self.tier))


_DDL = """
CREATE TABLE IF NOT EXISTS records (
    key_json     TEXT PRIMARY KEY,
    kernel       TEXT NOT NULL,
    source_hash  TEXT NOT NULL,
    signature    TEXT NOT NULL,
    dtypes       TEXT NOT NULL,
    quant        TEXT NOT NULL,
    bucket       TEXT NOT NULL,
    arch         TEXT NOT NULL,
    payload      TEXT NOT NULL,
    history      INTEGER NOT NULL,
    seen         TEXT NOT NULL,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS records_op
    ON records (kernel, source_hash, signature, dtypes, quant);
"""


def _normalize_key(key) -> tuple:
    if len(key) == 1 and isinstance(key[0], (tuple, list)):
        key = tuple(key[0])
    if len(key) != len(KEY_FIELDS):
        raise TypeError(f"a tuning key has {len(KEY_FIELDS)} fields ({', '.join(KEY_FIELDS)}), "
                        f"got {len(key)}")
    key = tuple(key)
    if isinstance(key[1], str):
        key = key[:1] + (key[1].lower(),) + key[2:]
    return key


class TuningStore:
    """SQLite-backed tuning records. `TuningStore()` opens the default file; `path` may be
    a file path or ":memory:". Thread-safe; re-opens its connection after a fork.
    `readonly=True` (merge sources): the file must exist and be a v4c store; it is opened
    with SQLite's mode=ro and never created, converted or written."""

    def __init__(self, path=None, *, readonly=False):
        self.path = Path(path) if path not in (None, ":memory:") else (
            ":memory:" if path == ":memory:" else default_store_path())
        self.readonly = readonly
        if readonly:
            if self.path == ":memory:":
                raise StoreError(":memory: cannot be opened read-only")
            if not self.path.exists():
                raise StoreError(f"{self.path}: no such tuning store")
            if not self.path.is_file():
                raise StoreError(f"{self.path}: not a tuning store (not a file)")
        elif self.path != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        self._decoded: dict[str, TuningRecord] = {}   # payload text -> validated record
        self._decoded_chars = 0
        self._conn = None
        self._pid = None
        self._warned_unusable = False
        self._connect()

    # connection -------------------------------------------------------------------------
    def _open(self, target: str, uri: bool = False):
        try:
            conn = sqlite3.connect(target, uri=uri, timeout=BUSY_TIMEOUT_MS / 1000,
                                   isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open tuning database ({e})") from None
        try:
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        except sqlite3.Error as e:
            conn.close()
            raise StoreError(f"{self.path}: cannot open tuning database ({e})") from None
        return conn

    def _connect(self):
        if self.readonly:
            return self._connect_readonly()
        conn = self._open(str(self.path))
        try:
            # before the switch to WAL, which would convert someone else's database
            self._check_not_foreign(conn)
            deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
            while True:   # switching to WAL can report "locked" while another process creates it
                try:
                    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                    break
                except sqlite3.OperationalError as e:
                    if "locked" not in str(e) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            if self.path != ":memory:" and str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: could not switch to WAL (journal_mode={mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version > STORE_SCHEMA:
                    raise StoreError(
                        f"{self.path}: tuning database schema {version} is newer than this "
                        f"v4c understands ({STORE_SCHEMA}); upgrade v4c or use another V4C_CACHE_DIR")
                if version < STORE_SCHEMA:
                    for stmt in _DDL.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                    conn.execute(f"PRAGMA user_version={STORE_SCHEMA}")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except StoreError:
            conn.close()
            raise
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"{self.path}: not a usable tuning database ({e}); "
                             f"{unusable_hint(self.path)}") from None
        self._conn, self._pid = conn, os.getpid()

    def _check_not_foreign(self, conn):
        """StoreError for an SQLite database that is not a v4c tuning store: one with tables
        but no v4c schema version, or a `records` table of another layout."""
        conn.execute("BEGIN")   # one snapshot: another process may be creating the store right now
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
            columns = {r[1] for r in conn.execute("PRAGMA table_info(records)")}
        finally:
            conn.execute("COMMIT")
        if version == 0 and not tables:
            return   # a new, empty file
        need = {"key_json", "kernel", "source_hash", "signature", "dtypes", "quant", "bucket",
                "arch", "payload", "history", "seen", "updated_at"}
        if version == 0 or not need <= columns:
            found = ", ".join(sorted(tables)[:5]) or "none"
            raise StoreError(f"{self.path}: an SQLite database but not a v4c tuning store "
                             f"(schema version {version}, tables: {found})")

    def _connect_readonly(self):
        uri = self.path.resolve().as_uri() + "?mode=ro"
        if not any(Path(f"{self.path}{x}").exists() for x in ("-wal", "-journal")):
            # nothing pending beside the file: read it as it is, so SQLite creates no -wal/-shm
            # beside someone else's store (and a read-only directory works)
            uri += "&immutable=1"
        conn = self._open(uri, uri=True)
        try:
            self._check_not_foreign(conn)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                raise StoreError(f"{self.path}: an empty SQLite database, not a v4c tuning store")
            if version > STORE_SCHEMA:
                raise StoreError(f"{self.path}: tuning database schema {version} is newer than "
                                 f"this v4c understands ({STORE_SCHEMA}); upgrade v4c")
        except StoreError:
            conn.close()
            raise
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"{self.path}: not a v4c tuning store ({e})") from None
        self._conn, self._pid = conn, os.getpid()

    def _unusable(self, e: sqlite3.DatabaseError) -> StoreError:
        if isinstance(e, sqlite3.OperationalError):   # locked, I/O, read-only: not the file's fault
            return StoreError(f"{self.path}: cannot use tuning database ({e})")
        return StoreError(f"{self.path}: tuning database unusable ({e}); {unusable_hint(self.path)}")

    @contextlib.contextmanager
    def _using(self):
        """The lock, with SQLite's errors (a corrupt page, a file replaced underneath) turned
        into StoreError naming the file."""
        with self._lock:
            try:
                yield
            except sqlite3.DatabaseError as e:
                raise self._unusable(e) from None

    def _transaction(self, conn, body):
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = body()
            conn.execute("COMMIT")
        except BaseException:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass   # already rolled back (SQLite does on some errors); keep the first error
            raise
        return out

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self._connect()   # never use a connection inherited through fork
        return self._conn

    def close(self):
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"TuningStore({str(self.path)!r})"

    def integrity_check(self) -> str:
        """"ok" for a sound database, else SQLite's description of the damage."""
        with self._using():
            rows = self.conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(r[0] for r in rows)

    # writing ----------------------------------------------------------------------------
    def put(self, record: TuningRecord) -> PutResult:
        """Merge one record (one transaction); see the module docstring for the rule."""
        return self.put_many([record])[0]

    def put_many(self, records) -> list[PutResult]:
        """Merge many records in ONE transaction (all or nothing). A record whose config this
        v4c's template refuses (`check_record`) is a RecordError before anything is written."""
        records = list(records)
        for r in records:
            if not isinstance(r, TuningRecord):
                raise TypeError(f"expected TuningRecord, got {type(r).__name__}")
            check_record(r)
        with self._using():
            conn = self.conn
            return self._transaction(conn, lambda: [self._put_locked(conn, r) for r in records])

    def _put_locked(self, conn, rec: TuningRecord) -> PutResult:
        kj = rec.key_json()
        row = conn.execute("SELECT payload, history, seen FROM records WHERE key_json=?",
                           (kj,)).fetchone()
        digest = rec.digest()[:32]
        now = time.time()
        if row is None:
            conn.execute(
                "INSERT INTO records (key_json, kernel, source_hash, signature, dtypes, quant,"
                " bucket, arch, payload, history, seen, updated_at)"
                " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (kj, rec.kernel, rec.source_hash, rec.signature, rec.dtypes, rec.quant,
                 rec.bucket, rec.hardware["arch"], rec.canonical(), 1, json.dumps([digest]), now))
            return PutResult("added", None, rec)
        payload, history, seen_text = row
        previous = self._decode(kj, payload, warn=False)
        try:
            seen = [s for s in json.loads(seen_text) if isinstance(s, str)]
        except ValueError:
            seen = []
        if digest in seen:   # the very same measurement again: nothing new
            if previous is not None and previous.canonical() == rec.canonical():
                return PutResult("kept", previous, previous)
        else:
            seen = (seen + [digest])[-SEEN_LIMIT:]
            history += 1
        if previous is None or rec.better_than(previous):
            conn.execute("UPDATE records SET payload=?, bucket=?, arch=?, history=?, seen=?,"
                         " updated_at=? WHERE key_json=?",
                         (rec.canonical(), rec.bucket, rec.hardware["arch"], history,
                          json.dumps(seen), now, kj))
            return PutResult("updated", previous, rec)
        conn.execute("UPDATE records SET history=?, seen=? WHERE key_json=?",
                     (history, json.dumps(seen), kj))
        return PutResult("kept", previous, previous)

    def delete(self, *key) -> bool:
        """Remove one key; True when something was removed."""
        kj = key_json(_normalize_key(key))
        with self._using():
            conn = self.conn
            n = self._transaction(
                conn, lambda: conn.execute("DELETE FROM records WHERE key_json=?", (kj,)).rowcount)
        return n > 0

    # reading ----------------------------------------------------------------------------
    def _decode(self, kj: str, payload: str, *, warn=True) -> TuningRecord | None:
        rec = self._decoded.get(payload)
        if rec is not None and rec.key_json() == kj:
            return rec
        try:
            rec = check_record(TuningRecord.from_text(payload))
            if rec.key_json() != kj:
                raise RecordError("record: stored under another key")
            if self._decoded_chars + len(payload) > DECODE_CACHE_CHARS:
                self._decoded.clear()
                self._decoded_chars = 0
            self._decoded[payload] = rec
            self._decoded_chars += len(payload)
            return rec
        except RecordError as e:
            if warn:
                warnings.warn(f"{self.path}: skipping invalid tuning row {kj[:200]}: {e}",
                              RuntimeWarning, stacklevel=3)
            return None

    def get(self, *key) -> TuningRecord | None:
        """The record stored under the exact key: 12 values in KEY_FIELDS order (or one
        tuple such as `record.key()`)."""
        kj = key_json(_normalize_key(key))
        with self._using():
            row = self.conn.execute("SELECT payload FROM records WHERE key_json=?",
                                    (kj,)).fetchone()
        return None if row is None else self._decode(kj, row[0])

    def history(self, *key) -> int:
        """How many distinct measurements of this key were merged (0 when absent)."""
        kj = key_json(_normalize_key(key))
        with self._using():
            row = self.conn.execute("SELECT history FROM records WHERE key_json=?",
                                    (kj,)).fetchone()
        return 0 if row is None else row[0]

    def raw_rows(self) -> list[tuple[str, str]]:
        """(key_json, payload text) of every row, by key: for merging and diagnostics."""
        with self._using():
            return self.conn.execute(
                "SELECT key_json, payload FROM records ORDER BY key_json").fetchall()

    def read_rows(self, max_rows: int, max_chars: int) -> list[tuple[str, str | None]]:
        """(key_json, payload) of every row by key, as a merge reads a source: StoreError when
        there are more than `max_rows` rows or `max_chars` characters of payload in all (checked
        before anything is loaded); a payload over MAX_RECORD_BYTES characters comes back as
        None (rejected by the caller) instead of being loaded."""
        with self._using():
            n, chars = self.conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(length(payload)), 0) FROM records").fetchone()
            if n > max_rows:
                raise StoreError(f"{self.path}: {n} records, more than the {max_rows} a merge "
                                 f"reads from one source; refused")
            if chars > max_chars:
                raise StoreError(f"{self.path}: {chars} characters of records, more than the "
                                 f"{max_chars} a merge reads from one source; refused")
            return self.conn.execute(
                "SELECT key_json, CASE WHEN length(payload) > ? THEN NULL ELSE payload END"
                " FROM records ORDER BY key_json", (MAX_RECORD_BYTES,)).fetchall()

    def all(self) -> list[TuningRecord]:
        """Every valid record, ordered by canonical key JSON (deterministic)."""
        out = []
        for kj, payload in self.raw_rows():
            rec = self._decode(kj, payload)
            if rec is not None:
                out.append(rec)
        return out

    def __iter__(self):
        return iter(self.all())

    def __len__(self) -> int:
        with self._using():
            return self.conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]

    def __contains__(self, key) -> bool:
        if isinstance(key, TuningRecord):
            key = key.key()
        kj = key_json(_normalize_key((key,)))
        with self._using():
            return self.conn.execute("SELECT 1 FROM records WHERE key_json=?",
                                     (kj,)).fetchone() is not None

    # graded lookup ----------------------------------------------------------------------
    def lookup(self, kernel, source_hash, signature, bucket, dtypes, quant,
               hardware, toolchain, *, shapes=None) -> Lookup:
        """Find the best usable record for a kernel on this hardware/toolchain.

        Only records whose config the kernel's template accepts are candidates
        (`config_problem`, at `shapes` when the caller knows them: the dict the templates'
        constraints read). A database that fails while it is read is a miss, after one
        StoreWarning per store naming the file and the fix: lookups serve compiles, which go
        on without tuning records rather than fail.

        Kernel identity (kernel, source_hash, signature, dtypes, quant) must always match.
        Tiers, tried in order (the first tier with any candidate wins):

        * "exact"           same arch, sm_count, memory_bytes and triton/torch/cuda;
        * "same-arch"       same arch and sm_count, other memory size, same toolchain
                            (product names never matter: they are not in the key);
        * "older-toolchain" same arch and sm_count, other toolchain versions; prefers the
                            newest toolchain not newer than ours, then the closest newer
                            one (compared as (triton, torch, cuda) version tuples), then
                            the same memory size;
        * "arch-family"     same compute-capability major (sm90 ~ sm90a, sm80 ~ sm86 ~
                            sm89, sm100 ~ sm103; AMD gfx9xx / gfx11xx), or same arch name
                            with another sm_count; prefers the same arch, then the nearest
                            older minor, then newer ones, then the nearest sm_count, then
                            the toolchain order above.

        Within a tier the same bucket is preferred, else the NEAREST bucket (minimal sum of
        |log2(x/x')| over the bucket's dimensions, e.g. T and L; buckets naming different
        dimensions never match; ties go to the smaller bucket). Remaining ties: better
        measurement method, fewer seconds. On a miss, returns Lookup(None, None, None) and
        the caller continues with the "cost-model" and "default" tiers.
        """
        hw = _hardware(hardware, "hardware", need_product=False)
        tc = _toolchain({k: toolchain.get(k) for k in ("triton", "torch", "cuda")}
                        if isinstance(toolchain, dict) else toolchain)
        source_hash = str(source_hash).lower()
        try:
            with self._using():
                rows = self.conn.execute(
                    "SELECT key_json, payload FROM records WHERE kernel=? AND source_hash=?"
                    " AND signature=? AND dtypes=? AND quant=? ORDER BY key_json",
                    (kernel, source_hash, signature, dtypes, quant)).fetchall()
        except StoreError as e:
            if not self._warned_unusable:
                self._warned_unusable = True
                warnings.warn(f"going on without tuning records (cost model and defaults): {e}",
                              StoreWarning, stacklevel=2)
            return Lookup(None, None, None)
        cands = [r for r in (self._decode(kj, p) for kj, p in rows) if r is not None]
        if shapes is not None:   # the stored configs passed the shape-free check on the way in
            cands = [r for r in cands if config_problem(r.kernel, r.config, shapes) is None]
        if not cands:
            return Lookup(None, None, None)

        want_tc = (tc["triton"], tc["torch"], tc["cuda"])
        cur_ver = tuple(parse_version(v) for v in want_tc)

        def tc_of(r):
            return (r.toolchain["triton"], r.toolchain["torch"], r.toolchain["cuda"])

        def tc_pref(r):
            v = tuple(parse_version(x) for x in tc_of(r))
            if tc_of(r) == want_tc:
                return (0, ())
            if v <= cur_ver:   # newest not newer than ours first
                return (1, tuple(tuple(-x for x in part) for part in v))
            return (2, v)      # then the closest newer one

        fam = arch_family(hw["arch"])

        def arch_pref(r):
            a = r.hardware["arch"]
            if a == hw["arch"]:
                return (0, 0)
            f = arch_family(a)
            if f[2] == fam[2]:
                return (1, 0)          # same CC, other variant (sm90 vs sm90a)
            if f[2] < fam[2]:
                return (2, fam[2] - f[2])
            return (3, f[2] - fam[2])

        def same_family(r):
            a = r.hardware["arch"]
            if a == hw["arch"]:
                return True
            f = arch_family(a)
            return fam is not None and f is not None and f[:2] == fam[:2]

        def bucket_pref(r):
            d = bucket_distance(bucket, r.bucket)
            p = parse_bucket(r.bucket) or {}
            return (d, tuple(sorted(p.items())), r.bucket)

        same_hw = lambda r: (r.hardware["arch"] == hw["arch"]  # noqa: E731
                             and r.hardware["sm_count"] == hw["sm_count"])
        same_mem = lambda r: r.hardware["memory_bytes"] == hw["memory_bytes"]  # noqa: E731
        tail = lambda r: (method_quality(r.method), r.best_seconds, r.key_json())  # noqa: E731

        tiers = [
            ("exact", lambda r: same_hw(r) and same_mem(r) and tc_of(r) == want_tc,
             lambda r: ()),
            ("same-arch", lambda r: same_hw(r) and not same_mem(r) and tc_of(r) == want_tc,
             lambda r: ()),
            ("older-toolchain", lambda r: same_hw(r) and tc_of(r) != want_tc,
             lambda r: (tc_pref(r), not same_mem(r))),
            ("arch-family", lambda r: not same_hw(r) and same_family(r),
             lambda r: (arch_pref(r), abs(r.hardware["sm_count"] - hw["sm_count"]),
                        tc_pref(r), not same_mem(r))),
        ]
        for tier, accept, pref in tiers:
            best = None
            for r in cands:
                if not accept(r):
                    continue
                bp = bucket_pref(r)
                if math.isinf(bp[0]):
                    continue
                k = (bp, pref(r), tail(r))
                if best is None or k < best[0]:
                    best = (k, r)
            if best is not None:
                r = best[1]
                return Lookup(r, tier, r.bucket, best[0][0][0])
        return Lookup(None, None, None)


__all__ = ["TuningStore", "StoreError", "StoreWarning", "PutResult", "Lookup", "TIERS", "STORE_SCHEMA",
           "default_cache_dir", "default_store_path", "make_key", "config_problem", "check_record",
           "open_for_lookup", "UNKNOWN_SHAPES"]
