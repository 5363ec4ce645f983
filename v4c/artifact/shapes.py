"""Shape buckets of kernel calls: the keys of an artifact's per-call-site config tables.

A kernel call has ``B`` sequences of ``T`` tokens each.  Decode steps (``T == 1``) and prefill
chunks (``T > 1``) take different code paths in some kernels (split-K decode attention), so a
bucket is a representative ``(B, T)`` of one of the two phases, named ``"B=<b>,T=<t>"``.  The
compiler chooses and compiles a config per bucket; the runtime picks, for each call, the bucket
of the same phase nearest in tokens ``B*T`` (log scale, ties to the larger).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DECODE_BATCHES = (1, 16, 64, 256)
PREFILL_TOKENS = (512, 4096)


@dataclass(frozen=True, order=True)
class Bucket:
    batch: int
    tokens: int  # per sequence: 1 for decode steps

    @property
    def key(self) -> str:
        return f"B={self.batch},T={self.tokens}"

    @property
    def decode(self) -> bool:
        return self.tokens == 1

    @property
    def rows(self) -> int:
        return self.batch * self.tokens


def default_buckets() -> list[Bucket]:
    return [Bucket(b, 1) for b in DECODE_BATCHES] + [Bucket(1, t) for t in PREFILL_TOKENS]


def parse_bucket(key: str) -> Bucket:
    """``"B=16,T=1"`` -> ``Bucket(16, 1)``."""
    parts = dict(p.split("=", 1) for p in key.split(",") if "=" in p) if isinstance(key, str) else {}
    try:
        b, t = int(parts["B"]), int(parts["T"])
    except (KeyError, ValueError):
        raise ValueError(f"bad shape bucket {key!r}: expected 'B=<int>,T=<int>'") from None
    if b < 1 or t < 1 or set(parts) != {"B", "T"}:
        raise ValueError(f"bad shape bucket {key!r}: expected 'B=<int>,T=<int>' with positive values")
    return Bucket(b, t)


def pick_bucket(keys, batch: int, tokens: int) -> str:
    """The key of ``keys`` for a call of ``batch`` sequences of ``tokens`` tokens: same phase first
    (any bucket when the phase has none), then nearest in ``log2(B*T)``, ties to the larger."""
    buckets = [parse_bucket(k) for k in keys]
    if not buckets:
        raise ValueError("no shape buckets to pick from")
    same = [b for b in buckets if b.decode == (tokens == 1)] or buckets
    rows = max(1, batch * tokens)
    best = min(same, key=lambda b: (abs(math.log2(b.rows / rows)), -b.rows))
    return best.key
