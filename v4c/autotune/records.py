"""Tuning records: one measured (or estimated) kernel configuration, with its provenance.

A record is plain data. It round-trips through JSON (`to_json()` / `from_json()`), is
validated field by field on construction and on load, and never holds code. What it says:

* what was tuned -- `kernel`, `source_hash` (sha256 of the kernel module source),
  `signature` (attributes that change the kernel), `bucket` (shape bucket such as
  "T=1,L=131072"), `dtypes`, `quant`;
* where -- `hardware` (`arch`, `sm_count`, `memory_bytes`; `product` is metadata only) and
  `toolchain` (`triton`, `torch`, `cuda`; each a version string or None);
* the answer -- `config` (meta-parameters) and `best_seconds`;
* how it was found -- every candidate's timing (`timings`), the measurement `method`,
  the relative `spread` of the winner's repetitions, `measured_at`, `host`.

`key()` is the exact-match identity used by the store, the bundles and Redis. Extra
scalar entries in `hardware` (e.g. "driver") and `toolchain` (e.g. "ptxas") are kept as
provenance but are not part of the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from datetime import datetime, timezone
from typing import Any

from v4c.errors import V4CError

SCHEMA_VERSION = 1

MAX_RECORD_BYTES = 1 << 20        # 1 MiB of canonical JSON per record
MAX_TIMINGS = 10_000
MAX_STRING_BYTES = 4096           # any single string (UTF-8 bytes), keys included
MAX_CONFIG_ENTRIES = 1024
# The fastest time a record may claim. No kernel launch timed with CUDA events (or replayed from a CUDA
# graph) completes in under a microsecond, and a zero or tiny time would win every merge for ever.
MIN_SECONDS = 1e-6

STATUSES = ("ok", "compile_error", "out_of_resources", "wrong_result", "timeout")
KEY_FIELDS = ("kernel", "source_hash", "signature", "bucket", "dtypes", "quant",
              "arch", "sm_count", "memory_bytes", "triton", "torch", "cuda")
HARDWARE_KEYS = ("arch", "sm_count", "memory_bytes")
TOOLCHAIN_KEYS = ("triton", "torch", "cuda")
FIELDS = ("kernel", "source_hash", "signature", "bucket", "dtypes", "quant", "hardware",
          "toolchain", "config", "best_seconds", "timings", "method", "spread",
          "measured_at", "host", "schema")

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_ARCH = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_BUCKET_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([0-9]+)")


class RecordError(V4CError, ValueError):
    """A tuning record that is malformed; the message starts with the offending field."""


# ----------------------------------------------------------------------------- helpers

def canonical_json(obj: Any) -> str:
    """The one JSON spelling used for hashing, keys and storage (sorted, compact, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def source_hash_of(source: str | bytes) -> str:
    """sha256 hex of a kernel module's source text."""
    if isinstance(source, str):
        source = source.encode("utf-8")
    return hashlib.sha256(source).hexdigest()


def utc_now() -> str:
    """The current time as ISO-8601 UTC, the form `measured_at` expects."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def key_json(key: tuple) -> str:
    """Canonical JSON of a key tuple: the SQLite primary key and the Redis hash field."""
    return canonical_json(list(key))


def make_key(kernel, source_hash, signature, bucket, dtypes, quant, hardware, toolchain) -> tuple:
    """The exact-match key from query-style arguments (hardware/toolchain as dicts)."""
    return (kernel, source_hash.lower(), signature, bucket, dtypes, quant,
            hardware["arch"], hardware["sm_count"], hardware["memory_bytes"],
            toolchain.get("triton"), toolchain.get("torch"), toolchain.get("cuda"))


def parse_bucket(bucket: str) -> dict[str, int] | None:
    """"T=1,L=131072" -> {"T": 1, "L": 131072}; None when not of that numeric form.

    Any names are accepted (not only T and L); values must be positive integers. "" is
    an empty (shape-independent) bucket and parses to {}.
    """
    if bucket == "":
        return {}
    out: dict[str, int] = {}
    for part in bucket.split(","):
        m = _BUCKET_PART.fullmatch(part.strip())
        if m is None or m.group(1) in out or int(m.group(2)) < 1:
            return None
        out[m.group(1)] = int(m.group(2))
    return out


def bucket_distance(a: str, b: str) -> float:
    """sum over dimensions of |log2(x/x')|; 0 for equal strings; inf when incomparable
    (unparseable, or the two buckets name different dimensions)."""
    if a == b:
        return 0.0
    pa, pb = parse_bucket(a), parse_bucket(b)
    if pa is None or pb is None or set(pa) != set(pb):
        return math.inf
    return sum(abs(math.log2(pa[k] / pb[k])) for k in pa)


def parse_version(v: str | None) -> tuple[int, ...]:
    """"3.6.0" -> (3, 6, 0); "2.11.0+cu130" -> (2, 11, 0); None -> (-1,) (oldest)."""
    if v is None:
        return (-1,)
    nums = []
    for part in re.split(r"[.+\-]", v):
        m = re.match(r"\d+", part)
        if m is None:
            break
        nums.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(nums)


def arch_family(arch: str) -> tuple[str, int, int] | None:
    """("sm", major, minor) for sm90/sm_90a/sm100/sm120..., ("gfx", major, rest) for AMD
    gfx90a/gfx942/gfx1100; None for anything else (e.g. "cpu")."""
    m = re.fullmatch(r"sm_?(\d{2,3})([a-z]*)", arch)
    if m:
        cc = int(m.group(1))
        return ("sm", cc // 10, cc % 10)
    m = re.fullmatch(r"gfx(\d+?)([0-9a-f]{2})", arch)
    if m:
        return ("gfx", int(m.group(1)), int(m.group(2), 16))
    return None


def method_quality(method: dict) -> int:
    """0 = measured on the device, 1 = cost model estimate, 2 = meaningless (interpreter).
    A lower quality always beats a higher one regardless of seconds."""
    if method.get("meaningless") is True or method.get("kind") == "interpreter":
        return 2
    if method.get("kind") == "cost_model":
        return 1
    return 0


# ----------------------------------------------------------------------------- validation

def _fail(field: str, msg: str):
    raise RecordError(f"{field}: {msg}")


def _name(text: str) -> str:
    """A field or key name as it may appear in a message: escaped unless plain printable text."""
    return text if text.isprintable() and text.isascii() else ascii(text)


def _str(field: str, v, *, nonempty=False) -> str:
    if not isinstance(v, str):
        _fail(field, f"expected a string, got {type(v).__name__}")
    if len(v) > MAX_STRING_BYTES:
        _fail(field, f"string longer than {MAX_STRING_BYTES} bytes (oversize)")
    try:  # strict: a lone surrogate (JSON "\ud800") cannot be stored in SQLite or sent to Redis
        size = len(v.encode("utf-8"))
    except UnicodeEncodeError as e:
        _fail(field, f"not valid Unicode text (lone surrogate {ascii(v[e.start])} at position {e.start})")
    if size > MAX_STRING_BYTES:
        _fail(field, f"string longer than {MAX_STRING_BYTES} bytes (oversize)")
    if nonempty and not v:
        _fail(field, "must not be empty")
    return v


def _int(field: str, v, *, minimum=0) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        _fail(field, f"expected an integer, got {type(v).__name__}")
    if v < minimum:
        _fail(field, f"must be >= {minimum}, got {v}")
    return v


def _seconds(field: str, v, *, floor: float = 0.0) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        _fail(field, f"expected a number of seconds, got {type(v).__name__}")
    try:
        v = float(v)
    except OverflowError:   # an int too large for a float
        _fail(field, "must be finite, got an integer beyond float range")
    if not math.isfinite(v):
        _fail(field, f"must be finite, got {v}")
    if v < 0:
        _fail(field, f"negative time {v}")
    if v < floor:
        _fail(field, f"implausible time {v:g} s, below the {floor:g} s floor (no kernel launch is faster)")
    return v


def _dict(field: str, v) -> dict:
    if not isinstance(v, dict):
        _fail(field, f"expected an object, got {type(v).__name__}")
    return v


def _scalar(field: str, v, *, allow_none: bool):
    """str/int/float/bool (and None when allowed); floats finite."""
    if v is None and allow_none:
        return None
    if isinstance(v, str):
        return _str(field, v)
    if isinstance(v, bool) or isinstance(v, int):
        return v
    if isinstance(v, float):
        if not math.isfinite(v):
            _fail(field, f"must be finite, got {v}")
        return v
    allowed = "int/float/str/bool" + ("/null" if allow_none else "")
    _fail(field, f"value must be {allowed}, got {type(v).__name__}")


def _config(field: str, v) -> dict:
    _dict(field, v)
    if len(v) > MAX_CONFIG_ENTRIES:
        _fail(field, f"more than {MAX_CONFIG_ENTRIES} entries (oversize)")
    out = {}
    for k, x in v.items():
        _str(f"{field} key", k, nonempty=True)
        out[k] = _scalar(f"{field}.{_name(k)}", x, allow_none=True)  # None: "the shape's own size" (e.g. a norm tile)
    return out


def _hardware(v, field="hardware", *, need_product=True) -> dict:
    _dict(field, v)
    for k in HARDWARE_KEYS + (("product",) if need_product else ()):
        if k not in v:
            _fail(f"{field}.{k}", "missing")
    arch = _str(f"{field}.arch", v["arch"], nonempty=True)
    if not _ARCH.fullmatch(arch):
        _fail(f"{field}.arch", f"not an architecture name: {arch!r}")
    out = {"arch": arch,
           "sm_count": _int(f"{field}.sm_count", v["sm_count"]),
           "memory_bytes": _int(f"{field}.memory_bytes", v["memory_bytes"])}
    for k, x in v.items():
        if k in out:
            continue
        _str(f"{field} key", k, nonempty=True)
        if k == "product":
            out[k] = _str(f"{field}.product", x)
        else:
            out[k] = _scalar(f"{field}.{_name(k)}", x, allow_none=True)
    return out


def _toolchain(v, field="toolchain") -> dict:
    _dict(field, v)
    out = {}
    for k in TOOLCHAIN_KEYS:
        if k not in v:
            _fail(f"{field}.{k}", "missing (use null when not installed)")
    for k, x in v.items():
        _str(f"{field} key", k, nonempty=True)
        if x is not None:
            _str(f"{field}.{_name(k)}", x, nonempty=True)
        out[k] = x
    return out


def _method(v) -> dict:
    _dict("method", v)
    if "kind" not in v:
        _fail("method.kind", "missing")
    out = {}
    for k, x in v.items():
        _str("method key", k, nonempty=True)
        out[k] = _scalar(f"method.{_name(k)}", x, allow_none=True)
    _str("method.kind", out["kind"], nonempty=True)
    return out


def _timings(v) -> list:
    if not isinstance(v, list):
        _fail("timings", f"expected a list, got {type(v).__name__}")
    if len(v) > MAX_TIMINGS:
        _fail("timings", f"{len(v)} entries, more than {MAX_TIMINGS} (oversize)")
    out = []
    for i, t in enumerate(v):
        f = f"timings[{i}]"
        _dict(f, t)
        for k in t:
            if k not in ("config", "seconds", "status", "detail"):
                _fail(f"{f}.{_name(str(k))}", "unknown field")
        for k in ("config", "seconds", "status"):
            if k not in t:
                _fail(f"{f}.{k}", "missing")
        status = t["status"]
        if status not in STATUSES:
            _fail(f"{f}.status", f"unknown status {status!r} (expected one of {', '.join(STATUSES)})")
        secs = t["seconds"]
        if secs is None:
            if status == "ok":
                _fail(f"{f}.seconds", "null for status 'ok'")
        else:   # failed candidates may carry how long they ran before failing
            secs = _seconds(f"{f}.seconds", secs, floor=MIN_SECONDS if status == "ok" else 0.0)
        out.append({"config": _config(f"{f}.config", t["config"]), "seconds": secs,
                    "status": status, "detail": _str(f"{f}.detail", t.get("detail", ""))})
    return out


def _timestamp(v) -> str:
    _str("measured_at", v, nonempty=True)
    try:
        dt = datetime.fromisoformat(v.replace("Z", "+00:00") if v.endswith("Z") else v)
    except ValueError:
        _fail("measured_at", f"not an ISO-8601 timestamp: {v!r}")
    if dt.tzinfo is None or dt.utcoffset().total_seconds() != 0:
        _fail("measured_at", f"must be UTC (end in Z or +00:00): {v!r}")
    return v


# ----------------------------------------------------------------------------- the record

@dataclasses.dataclass(frozen=True)
class TuningRecord:
    """One tuning result. Construction validates and normalises every field (numbers of
    seconds become floats, the hash becomes lower case, `detail` defaults to ""); a bad
    field raises RecordError naming it. Treat the dict fields as read-only."""

    kernel: str
    source_hash: str
    signature: str
    bucket: str
    dtypes: str
    quant: str
    hardware: dict
    toolchain: dict
    config: dict
    best_seconds: float
    timings: list = dataclasses.field(default_factory=list)
    method: dict = dataclasses.field(default_factory=lambda: {"kind": "cuda_events"})
    spread: float = 0.0
    measured_at: str = dataclasses.field(default_factory=utc_now)
    host: str = ""
    schema: int = SCHEMA_VERSION

    def __post_init__(self):
        s = lambda name, v: object.__setattr__(self, name, v)  # noqa: E731 (frozen)
        s("kernel", _str("kernel", self.kernel, nonempty=True))
        h = _str("source_hash", self.source_hash)
        if not _HEX64.fullmatch(h):
            _fail("source_hash", f"not a sha256 hex digest (64 hex digits): {h[:80]!r}")
        s("source_hash", h.lower())
        for name in ("signature", "bucket", "dtypes", "quant"):
            s(name, _str(name, getattr(self, name)))
        s("hardware", _hardware(self.hardware))
        s("toolchain", _toolchain(self.toolchain))
        s("config", _config("config", self.config))
        s("best_seconds", _seconds("best_seconds", self.best_seconds, floor=MIN_SECONDS))
        s("timings", _timings(self.timings))
        s("method", _method(self.method))
        spread = self.spread
        if isinstance(spread, bool) or not isinstance(spread, (int, float)) \
                or not math.isfinite(min(abs(spread), 1e300)) or spread < 0:   # min: ints beyond float
            _fail("spread", f"expected a finite number >= 0, got {spread!r}")
        s("spread", float(spread))
        s("measured_at", _timestamp(self.measured_at))
        s("host", _str("host", self.host))
        if isinstance(self.schema, bool) or self.schema != SCHEMA_VERSION:
            _fail("schema", f"unsupported schema {self.schema!r} (this v4c reads {SCHEMA_VERSION})")
        object.__setattr__(self, "_canonical", None)
        size = len(self.canonical().encode("utf-8", "surrogatepass"))
        if size > MAX_RECORD_BYTES:
            _fail("record", f"{size} bytes of JSON, over the {MAX_RECORD_BYTES}-byte limit (oversize)")

    # identity -------------------------------------------------------------------------
    def key(self) -> tuple:
        hw, tc = self.hardware, self.toolchain
        return (self.kernel, self.source_hash, self.signature, self.bucket, self.dtypes,
                self.quant, hw["arch"], hw["sm_count"], hw["memory_bytes"],
                tc["triton"], tc["torch"], tc["cuda"])

    def key_json(self) -> str:
        return key_json(self.key())

    def canonical(self) -> str:
        """Canonical JSON text of the record (computed once; records are read-only)."""
        text = self.__dict__.get("_canonical")
        if text is None:
            text = canonical_json(self.to_json())
            object.__setattr__(self, "_canonical", text)
        return text

    def digest(self) -> str:
        """sha256 of the canonical JSON: identifies this exact measurement."""
        return hashlib.sha256(self.canonical().encode("utf-8", "surrogatepass")).hexdigest()

    def __hash__(self):
        return hash(self.canonical())

    # ordering between two measurements of the same key ---------------------------------
    def rank(self) -> tuple:
        """Smaller is better: real measurements beat cost-model estimates beat interpreter
        numbers; then fewer seconds; ties broken by the canonical JSON (deterministic, so
        merging is order independent)."""
        return (method_quality(self.method), self.best_seconds, self.canonical())

    def better_than(self, other: "TuningRecord") -> bool:
        return self.rank() < other.rank()

    def replace(self, **changes) -> "TuningRecord":
        return dataclasses.replace(self, **changes)

    # JSON -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {
            "schema": self.schema, "kernel": self.kernel, "source_hash": self.source_hash,
            "signature": self.signature, "bucket": self.bucket, "dtypes": self.dtypes,
            "quant": self.quant, "hardware": dict(self.hardware),
            "toolchain": dict(self.toolchain), "config": dict(self.config),
            "best_seconds": self.best_seconds,
            "timings": [dict(t, config=dict(t["config"])) for t in self.timings],
            "method": dict(self.method), "spread": self.spread,
            "measured_at": self.measured_at, "host": self.host,
        }

    @classmethod
    def from_json(cls, d) -> "TuningRecord":
        """Validate a parsed JSON object and build the record; RecordError names the field."""
        if not isinstance(d, dict):
            raise RecordError(f"record: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(_name(str(k)[:80]) for k in d if k not in FIELDS)
        if unknown:
            _fail(unknown[0], "unknown field")
        missing = [k for k in FIELDS if k not in d]
        if missing:
            _fail(missing[0], "missing")
        if isinstance(d["timings"], list) and len(d["timings"]) > MAX_TIMINGS:
            _fail("timings", f"{len(d['timings'])} entries, more than {MAX_TIMINGS} (oversize)")
        if isinstance(d["schema"], bool) or d["schema"] != SCHEMA_VERSION:
            _fail("schema", f"unsupported schema {repr(d['schema'])[:80]} (this v4c reads {SCHEMA_VERSION})")
        try:
            return cls(**{k: d[k] for k in FIELDS})
        except RecordError:
            raise
        except (TypeError, ValueError, AttributeError, RecursionError, OverflowError) as e:
            raise RecordError(f"record: {type(e).__name__}: {e}") from None

    @classmethod
    def from_text(cls, text: str | bytes) -> "TuningRecord":
        """Parse and validate one record from JSON text (size checked before parsing)."""
        if len(text) > MAX_RECORD_BYTES:
            _fail("record", f"{len(text)} bytes of JSON, over the {MAX_RECORD_BYTES}-byte limit (oversize)")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                _fail("record", f"not UTF-8 ({e})")
        return cls.from_json(loads_strict(text, "record", RecordError))


def loads_strict(text: str, what: str, error=RecordError):
    """json.loads that refuses NaN/Infinity and turns every parse failure into `error`."""
    def bad_constant(c):
        raise error(f"{what}: {c} is not valid JSON")
    try:
        return json.loads(text, parse_constant=bad_constant)
    except error:
        raise
    except RecursionError:
        raise error(f"{what}: JSON nested too deeply") from None
    except ValueError as e:
        raise error(f"{what}: not valid JSON ({e})") from None
