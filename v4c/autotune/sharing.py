"""Sharing tuning results: JSON bundles, store-to-store merges, and a Redis hash.

Everything shared is data: JSON records, validated one by one on the way in exactly like
a local read. Nothing received is executed or unpickled.

* `export_bundle(store, path, filter=None)` writes a readable, deterministic file
  `{"format": "v4c-tuning-bundle", "schema": 1, "records": [...]}` (sorted keys, records
  ordered by key, indent 1, trailing newline): exporting the same store twice gives the
  same bytes, so bundles diff and review well in a PR.
* `import_bundle(store, path)` refuses a whole file that is over 64 MiB, holds more than
  MAX_BUNDLE_RECORDS records or MAX_BUNDLE_ITEMS JSON values (what parsing may cost in memory
  is bounded before parsing), is not JSON, or of another format/schema (BundleError);
  otherwise it imports every valid record in one transaction and reports each rejected one
  with its index and the reason. Valid = the record's own checks (`TuningRecord`: fields,
  strict UTF-8 strings, plausible timings) plus its config against this v4c's kernel template
  (`store.check_record`).
* `merge_stores(dst, *srcs)` applies the same rule store to store; sources given as paths are
  opened read-only and must be existing v4c stores (StoreError otherwise), each read like a
  bundle (same limits).
* `push(store, url)` / `pull(store, url)` exchange records with a Redis server: one hash
  per namespace (`redis_hash_name`), field = canonical JSON of the key, value = record
  JSON. Both FAIL OPEN: if the server (or the `redis` package) is unavailable they warn
  (SharingWarning, with the URL, password masked, and the reason) and return a report
  with ok=False; they never raise for connection problems.

Merging keeps the better measurement per key (`TuningRecord.rank`). A *conflict* is
reported when the same key has two different configs whose times are within their
spreads, i.e. the intervals best*(1 +- spread) overlap: the measurements cannot tell the
configs apart, the store keeps one deterministically, and a human may want to re-tune.
"""
from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path

from v4c.errors import V4CError
from v4c.io.atomic import atomic_write_text

from .records import (MAX_RECORD_BYTES, SCHEMA_VERSION, RecordError, TuningRecord,
                      canonical_json, loads_strict)
from .store import TuningStore, check_record

BUNDLE_FORMAT = "v4c-tuning-bundle"
MAX_BUNDLE_BYTES = 64 << 20
MAX_BUNDLE_RECORDS = 100_000
# JSON values (and keys) a bundle may hold, counted before parsing: a real record takes ~20 bytes
# of bundle per value, so 64 MiB of real records stay under it, while 2-byte values ("0,") would
# otherwise cost ~100 bytes of memory each (15M of them: 3 GB). At most ~350 MB while parsing.
MAX_BUNDLE_ITEMS = 4_000_000
REDIS_CONNECT_TIMEOUT_S = 2.0
REDIS_SOCKET_TIMEOUT_S = 10.0


class BundleError(V4CError, ValueError):
    """A bundle refused as a whole: too large, not JSON, wrong format or schema."""


class SharingWarning(UserWarning):
    """A shared cache could not be used; work continues with the local store."""


@dataclasses.dataclass
class ImportReport:
    """added / updated / kept: counts per `TuningStore.put` outcome; rejected: (index, reason)
    per invalid record (index = position in the bundle, in the source store's key order
    for merges, or the Redis field text for pulls); conflicts: one line per indistinct pair.
    ok=False (with `error`) only when a remote source could not be read at all."""
    added: int = 0
    updated: int = 0
    kept: int = 0
    rejected: list = dataclasses.field(default_factory=list)
    conflicts: list = dataclasses.field(default_factory=list)
    ok: bool = True
    error: str | None = None
    source: str | None = None

    @property
    def imported(self) -> int:
        return self.added + self.updated + self.kept


@dataclasses.dataclass
class PushReport:
    """pushed: records written to the server; unchanged: keys where the server already had
    an equal or better record. ok=False (with `error`) when the server was unusable."""
    url: str
    namespace: str
    pushed: int = 0
    unchanged: int = 0
    ok: bool = True
    error: str | None = None


# ----------------------------------------------------------------------------- helpers

def _conflict(a: TuningRecord, b: TuningRecord) -> str | None:
    if a.config == b.config:
        return None
    lo_a, hi_a = a.best_seconds * (1 - a.spread), a.best_seconds * (1 + a.spread)
    lo_b, hi_b = b.best_seconds * (1 - b.spread), b.best_seconds * (1 + b.spread)
    if hi_a < lo_b or hi_b < lo_a:
        return None
    win, lose = (a, b) if a.better_than(b) else (b, a)
    return (f"{' '.join(str(x) for x in a.key())}: config {canonical_json(win.config)} "
            f"({win.best_seconds:.4g}s +-{win.spread:.1%}, {win.host or '?'}) vs "
            f"{canonical_json(lose.config)} ({lose.best_seconds:.4g}s +-{lose.spread:.1%}, "
            f"{lose.host or '?'}) are within their spreads; kept the first")


def _put_all(store: TuningStore, records: list[TuningRecord], report: ImportReport):
    """put_many, then count outcomes and conflicts against what each record met."""
    results = store.put_many(records)
    for rec, res in zip(records, results):
        setattr(report, res.outcome, getattr(report, res.outcome) + 1)
        if res.previous is not None:
            msg = _conflict(res.previous, rec)
            if msg and msg not in report.conflicts:
                report.conflicts.append(msg)
    return report


# ----------------------------------------------------------------------------- bundles

def bundle_text(records) -> str:
    """The exact bytes (as text) of a bundle holding these records."""
    recs = sorted(records, key=lambda r: r.key_json())
    doc = {"format": BUNDLE_FORMAT, "schema": SCHEMA_VERSION,
           "records": [r.to_json() for r in recs]}
    return json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n"


def _json_items(text: str) -> int:
    """An upper bound on the JSON values and keys in `text`, without parsing it: every one is
    the first in its container or follows a comma (commas inside strings only over-count)."""
    return text.count(",") + text.count("[") + text.count("{") + 1


def export_bundle(store: TuningStore, path, filter=None) -> int:
    """Write the store's records (those for which `filter(record)` is true) to `path`
    atomically; returns how many were written. Refuses what `import_bundle` would refuse."""
    recs = [r for r in store.all() if filter is None or filter(r)]
    if len(recs) > MAX_BUNDLE_RECORDS:
        raise BundleError(f"{path}: {len(recs)} records, over the {MAX_BUNDLE_RECORDS} a bundle may "
                          f"hold; export fewer records (filter=...)")
    text = bundle_text(recs)
    if len(text.encode("utf-8")) > MAX_BUNDLE_BYTES or _json_items(text) > MAX_BUNDLE_ITEMS:
        raise BundleError(f"{path}: bundle would be over {MAX_BUNDLE_BYTES} bytes or "
                          f"{MAX_BUNDLE_ITEMS} JSON values; export fewer records (filter=...)")
    atomic_write_text(Path(path), text)
    return len(recs)


def _validate(raw) -> TuningRecord:
    """One received record, parsed JSON: size, fields, then its config against the template."""
    size = len(canonical_json(raw).encode("utf-8", "surrogatepass"))
    if size > MAX_RECORD_BYTES:
        raise RecordError(f"record: {size} bytes of JSON, over the "
                          f"{MAX_RECORD_BYTES}-byte limit (oversize)")
    return check_record(TuningRecord.from_json(raw))


def read_bundle(path) -> tuple[list[TuningRecord], list[tuple[int, str]]]:
    """Parse and validate a bundle file: (valid records, [(index, reason)] rejected).
    Raises BundleError when the file as a whole is unacceptable."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BUNDLE_BYTES + 1)
    except OSError as e:
        raise BundleError(f"{path}: cannot read bundle ({e.strerror or e})") from None
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError(f"{path}: bundle is over the {MAX_BUNDLE_BYTES}-byte limit; refused")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BundleError(f"{path}: not a UTF-8 JSON file ({e})") from None
    del data
    items = _json_items(text)
    if items > MAX_BUNDLE_ITEMS:
        raise BundleError(f"{path}: up to {items} JSON values, over the {MAX_BUNDLE_ITEMS} a bundle "
                          f"may hold; refused (split it)")
    doc = loads_strict(text, f"{path}", BundleError)
    del text
    if not isinstance(doc, dict):
        raise BundleError(f"{path}: not a v4c tuning bundle (top level is {type(doc).__name__})")
    if doc.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path}: format is {str(doc.get('format'))[:80]!r}, "
                          f"expected {BUNDLE_FORMAT!r}; refused")
    schema = doc.get("schema")
    if isinstance(schema, bool) or schema != SCHEMA_VERSION:
        raise BundleError(f"{path}: bundle schema {str(schema)[:40]!r} is not supported "
                          f"(this v4c reads schema {SCHEMA_VERSION}); refused")
    extra = sorted(str(k)[:80] for k in doc if k not in ("format", "schema", "records"))
    if extra:
        raise BundleError(f"{path}: unknown bundle field {extra[0]!r}; refused")
    records = doc.pop("records", None)
    if not isinstance(records, list):
        raise BundleError(f"{path}: 'records' must be a list")
    if len(records) > MAX_BUNDLE_RECORDS:
        raise BundleError(f"{path}: {len(records)} records, over the {MAX_BUNDLE_RECORDS} a bundle "
                          f"may hold; refused (split it)")
    good, rejected = [], []
    for i in range(len(records)):
        raw, records[i] = records[i], None   # drop the parsed JSON as we go: peak memory ~ one copy
        try:
            good.append(_validate(raw))
        except RecordError as e:
            rejected.append((i, str(e)))
    return good, rejected


def import_bundle(store: TuningStore, path) -> ImportReport:
    """Validate and merge a bundle into `store` (one transaction)."""
    good, rejected = read_bundle(path)
    report = ImportReport(rejected=rejected, source=str(path))
    return _put_all(store, good, report)


def merge_stores(dst: TuningStore, *srcs) -> ImportReport:
    """Merge every record of `srcs` (TuningStore objects, or paths: opened read-only) into
    `dst` (one transaction); invalid source rows are rejected with their index (position in
    that source's key order) and reason. A source that is missing, not a v4c store, corrupt
    or over the bundle limits is a StoreError naming it, before `dst` is touched."""
    good, rejected, names = [], [], []
    for src in srcs:
        store = src if isinstance(src, TuningStore) else TuningStore(src, readonly=True)
        try:
            names.append(str(store.path))
            rows = store.read_rows(MAX_BUNDLE_RECORDS, MAX_BUNDLE_BYTES)
        finally:
            if store is not src:
                store.close()
        for i, (kj, payload) in enumerate(rows):
            try:
                if payload is None:
                    raise RecordError(f"record: over the {MAX_RECORD_BYTES}-byte limit (oversize)")
                rec = check_record(TuningRecord.from_text(payload))
                if rec.key_json() != kj:
                    raise RecordError("record: stored under another key")
                good.append(rec)
            except RecordError as e:
                rejected.append((i, f"{store.path}: {e}"))
    report = ImportReport(source=", ".join(names), rejected=rejected)
    return _put_all(dst, good, report)


# ----------------------------------------------------------------------------- Redis

def redis_hash_name(namespace: str) -> str:
    """The Redis hash holding a namespace's records (schema in the name, so an older v4c
    never reads records it does not understand)."""
    return f"{namespace}:tuning:v{SCHEMA_VERSION}"


def _mask(url: str) -> str:
    """The URL with any password replaced by *** (safe for warnings and reports)."""
    url = re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


def _fail_open(url: str, reason: str) -> str:
    msg = f"v4c tuning cache: Redis at {_mask(url)} unusable ({reason}); continuing with the local store only"
    warnings.warn(msg, SharingWarning, stacklevel=3)
    return msg


def _client(url: str):
    import redis  # optional dependency, only needed here
    kwargs = dict(socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
                  socket_timeout=REDIS_SOCKET_TIMEOUT_S)
    try:   # one quick retry, not redis-py's default backoff: a dead cache must not stall us
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        kwargs["retry"] = Retry(NoBackoff(), 1)
    except ImportError:
        pass
    return redis, redis.Redis.from_url(url, **kwargs)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:500]


def push(store: TuningStore, url: str, namespace: str = "v4c") -> PushReport:
    """Publish the store's records to Redis, keeping the better record per key on the
    server (optimistic WATCH/MULTI transaction, retried when another pusher interferes)."""
    report = PushReport(url=_mask(url), namespace=namespace)
    try:
        redis, client = _client(url)
    except ImportError as e:
        report.ok, report.error = False, _fail_open(url, f"python package 'redis' missing: {e}")
        return report
    except Exception as e:   # malformed URL and the like: still fail open
        report.ok, report.error = False, _fail_open(url, _reason(e))
        return report
    hname = redis_hash_name(namespace)
    local = {r.key_json(): r for r in store.all()}
    fields = sorted(local)
    try:
        client.ping()
        for start in range(0, len(fields), 500):
            chunk = fields[start:start + 500]
            for _attempt in range(20):
                with client.pipeline(transaction=True) as pipe:
                    try:
                        pipe.watch(hname)
                        remote = pipe.hmget(hname, chunk)
                        writes = {}
                        for kj, raw in zip(chunk, remote):
                            mine = local[kj]
                            theirs = None
                            if raw is not None:
                                try:
                                    theirs = check_record(TuningRecord.from_text(raw))
                                    if theirs.key_json() != kj:
                                        theirs = None
                                except RecordError:
                                    theirs = None   # invalid remote value: overwrite it
                            if theirs is None or mine.better_than(theirs):
                                writes[kj] = mine.canonical()
                        pipe.multi()
                        if writes:
                            pipe.hset(hname, mapping=writes)
                        pipe.execute()
                        report.pushed += len(writes)
                        report.unchanged += len(chunk) - len(writes)
                        break
                    except redis.WatchError:
                        continue
            else:
                raise RuntimeError("gave up after 20 concurrent-update retries")
    except (redis.RedisError, OSError, RuntimeError) as e:
        report.ok, report.error = False, _fail_open(url, _reason(e))
    finally:
        try:
            client.close()
        except Exception:
            pass
    return report


def pull(store: TuningStore, url: str, namespace: str = "v4c") -> ImportReport:
    """Fetch a namespace's records from Redis, validate each like a bundle record, merge
    the valid ones into `store` (one transaction). Refuses (ok=False) a namespace whose
    values add up to more than the bundle limit."""
    report = ImportReport(source=_mask(url))
    try:
        redis, client = _client(url)
    except ImportError as e:
        report.ok, report.error = False, _fail_open(url, f"python package 'redis' missing: {e}")
        return report
    except Exception as e:
        report.ok, report.error = False, _fail_open(url, _reason(e))
        return report
    hname = redis_hash_name(namespace)
    good, total, count = [], 0, 0
    try:
        for field, raw in client.hscan_iter(hname, count=500):
            total += len(field) + len(raw)
            count += 1
            if total > MAX_BUNDLE_BYTES or count > MAX_BUNDLE_RECORDS:
                report.ok, report.error = False, _fail_open(
                    url, f"namespace {namespace!r} holds over {MAX_BUNDLE_BYTES} bytes or "
                         f"{MAX_BUNDLE_RECORDS} records; refused")
                return report
            try:
                fname = field.decode("utf-8")
            except UnicodeDecodeError:
                report.rejected.append((repr(field[:200]), "field: not UTF-8"))
                continue
            try:
                rec = check_record(TuningRecord.from_text(raw))
                if rec.key_json() != fname:
                    raise RecordError("record: stored under a field that is not its key")
                good.append(rec)
            except RecordError as e:
                report.rejected.append((fname[:1000], str(e)))
    except (redis.RedisError, OSError) as e:
        report.ok, report.error = False, _fail_open(url, _reason(e))
        return report
    finally:
        try:
            client.close()
        except Exception:
            pass
    report.rejected.sort(key=lambda x: x[0])
    good.sort(key=lambda r: r.key_json())
    return _put_all(store, good, report)


__all__ = ["export_bundle", "import_bundle", "read_bundle", "bundle_text", "merge_stores",
           "push", "pull", "redis_hash_name", "ImportReport", "PushReport", "BundleError",
           "SharingWarning", "BUNDLE_FORMAT", "MAX_BUNDLE_BYTES", "MAX_BUNDLE_RECORDS",
           "MAX_BUNDLE_ITEMS"]
