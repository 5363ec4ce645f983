"""Shape buckets: the (tokens, context) key a tuned config is stored and looked up under.

Tokens (the M of a projection, tokens per expert, ...) round UP to a power of two.  Context
lengths fall into ranges named by their upper bound: <=4K, 8K, 16K, 32K, 64K, 128K, 256K,
512K, 1M (K = 1024); longer contexts keep doubling (2M, ...), so nothing is refused.  The
string form is ``"T=<int>,L=<int>"`` with an absent part left out (``"T=64"``, ``"L=131072"``,
and ``""`` when both are absent).
"""
from __future__ import annotations

import math

CONTEXT_BOUNDS = tuple(1024 * 2 ** i for i in range(2, 11))  # 4K .. 1M


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _check(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def token_bucket(tokens: int) -> int:
    """``tokens`` rounded up to a power of two (1, 2, 4, ...)."""
    return _pow2_ceil(_check("tokens", tokens, 1))


def context_bucket(context: int) -> int:
    """The upper bound of the context range holding ``context`` (0 -> 4096)."""
    _check("context", context, 0)
    for bound in CONTEXT_BOUNDS:
        if context <= bound:
            return bound
    return _pow2_ceil(context)


def bucket_for(tokens: int | None, context: int | None) -> str:
    """The bucket key, e.g. ``bucket_for(48, 100_000) == "T=64,L=131072"``."""
    parts = []
    if tokens is not None:
        parts.append(f"T={token_bucket(tokens)}")
    if context is not None:
        parts.append(f"L={context_bucket(context)}")
    return ",".join(parts)


def parse_bucket(s: str) -> tuple[int | None, int | None]:
    """``"T=64,L=131072"`` -> ``(64, 131072)``; absent parts are None.  Any positive ints are
    accepted (a key written by hand need not sit on a bucket boundary)."""
    if not isinstance(s, str):
        raise ValueError(f"bucket must be a string, got {s!r}")
    found: dict[str, int] = {}
    if s.strip():
        for part in s.split(","):
            name, eq, value = part.strip().partition("=")
            if not eq or name not in ("T", "L") or name in found:
                raise ValueError(f"bad bucket {s!r}: expected 'T=<int>,L=<int>' with either part optional")
            try:
                n = int(value)
            except ValueError:
                raise ValueError(f"bad bucket {s!r}: {name}={value!r} is not an int") from None
            if n <= 0:
                raise ValueError(f"bad bucket {s!r}: {name} must be positive")
            found[name] = n
    return found.get("T"), found.get("L")


def distance(a: str, b: str) -> float:
    """``|log2(T_a/T_b)| + |log2(L_a/L_b)|``; ``math.inf`` when one key has a part the other lacks."""
    (ta, la), (tb, lb) = parse_bucket(a), parse_bucket(b)
    d = 0.0
    for x, y in ((ta, tb), (la, lb)):
        if (x is None) != (y is None):
            return math.inf
        if x is not None:
            d += abs(math.log2(x / y))
    return d


def nearest(bucket: str, available: list[str]) -> str | None:
    """The entry of ``available`` closest to ``bucket`` in ``distance``; None when nothing is
    comparable (no entries, or none with the same parts).  Ties go to the larger bucket (more
    tokens, then longer context), then to the earlier entry."""
    parse_bucket(bucket)  # a malformed query is an error even when ``available`` is empty
    best, best_key = None, None
    for i, cand in enumerate(available):
        d = distance(bucket, cand)
        if math.isinf(d):
            continue
        t, l = parse_bucket(cand)
        key = (round(d, 9), -(t or 0), -(l or 0), i)
        if best_key is None or key < best_key:
            best, best_key = cand, key
    return best
