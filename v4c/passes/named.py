"""Passes by name, for ``v4c opt`` and the golden tests: a pipeline is a comma-separated list of pass
names, each with optional ``{key=value ...}`` options (space-separated, as mlir-opt writes them):

    fuse-moe,fuse-attention
    quantize-kv-cache{kv=fp8_ds indexer=mxfp4}
    shard{world=2 rank=0 parallel=ep=2,attn=tp}
"""
from __future__ import annotations

from typing import Callable

from ..errors import V4CError
from .base import Pass
from .pipeline import FUSION_PASSES
from .quantize_kv import QuantizeKVCache
from .shard import Shard, parse_parallel


def _no_options(cls):
    def make(opts: dict) -> Pass:
        _take(opts, cls.name, set())
        return cls()
    return make


def _take(opts: dict, name: str, allowed: set[str]) -> None:
    unknown = sorted(set(opts) - allowed)
    if unknown:
        known = f"; it takes {', '.join(sorted(allowed))}" if allowed else "; it takes none"
        raise V4CError(f"pass {name!r}: unknown option(s) {', '.join(unknown)}{known}")


def _quantize(opts: dict) -> Pass:
    _take(opts, QuantizeKVCache.name, {"kv", "indexer"})
    try:
        return QuantizeKVCache(**opts)
    except ValueError as e:
        raise V4CError(f"pass {QuantizeKVCache.name!r}: {e}") from None


def _shard(opts: dict) -> Pass:
    _take(opts, Shard.name, {"world", "rank", "parallel"})
    try:
        world, rank = int(opts.get("world", 1)), int(opts.get("rank", 0))
    except ValueError:
        raise V4CError(f"pass 'shard': world and rank must be integers, got {opts}") from None
    return Shard(parse_parallel(opts.get("parallel"), world), rank)


PASSES: dict[str, Callable[[dict], Pass]] = {
    **{cls.name: _no_options(cls) for cls in FUSION_PASSES},
    QuantizeKVCache.name: _quantize,
    Shard.name: _shard,
}


def _split_top(text: str) -> list[str]:
    """Split at the commas outside braces."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "{"
        depth -= ch == "}"
        if depth < 0:
            raise V4CError(f"pipeline {text!r}: unbalanced '}}'")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise V4CError(f"pipeline {text!r}: unclosed '{{'")
    return parts + [cur]


def parse_pipeline(text: str) -> list[Pass]:
    """The passes ``text`` names, in order, each built with its options."""
    passes = []
    for item in _split_top(text):
        item = item.strip()
        if not item:
            raise V4CError(f"pipeline {text!r}: empty pass name")
        name, brace, rest = item.partition("{")
        name = name.strip()
        opts = {}
        if brace:
            if not rest.endswith("}"):
                raise V4CError(f"pipeline {text!r}: options of {name!r} must end with '}}'")
            for kv in rest[:-1].split():
                key, eq, val = kv.partition("=")
                if not eq or not key:
                    raise V4CError(f"pass {name!r}: option {kv!r} is not key=value")
                opts[key] = val
        if name not in PASSES:
            raise V4CError(f"unknown pass {name!r}; the passes are {', '.join(PASSES)}")
        passes.append(PASSES[name](opts))
    return passes
