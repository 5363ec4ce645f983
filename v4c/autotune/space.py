"""The tuning space of one op: the template's META grid, less what cannot run on the device.

A template module follows the contract in ``v4c/codegen/templates/__init__.py``: ``META[op]``
maps each meta-parameter to a tuple of candidate values and ``constraints(op, meta, shapes)``
returns a reason string for a choice that cannot run (or None).  On top of the template's own
constraints this module prunes, for every architecture alike:

* shared memory: a tiled kernel keeps ``num_stages`` copies of an A tile and a B tile,
  ``(BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * elem_bytes * num_stages`` bytes (see ``smem_bytes``),
  which must fit the device's opt-in per-block limit;
* threads: ``num_warps * 32 <= 1024`` (and no more warps than an SM can hold);
* quantisation: with a ``quant_block`` shape entry the blocks along the quantised dimension
  must be whole multiples of it (see ``quant_block_rules``).

``shapes`` is passed to the template's ``constraints`` unchanged; this module reads, when it
is a dict, the optional entries ``elem_bytes`` (bytes per operand element, default 2, i.e.
bf16) or ``dtype`` (a name ``devices.normalize_dtype`` knows), and ``quant_block``.  The cost
model also reads ``M``, ``N``, ``K`` and ``G`` from it.
"""
from __future__ import annotations

import importlib
import itertools
import math
from types import ModuleType
from typing import Any

from .devices import ELEM_BYTES, DeviceSpec, normalize_dtype

MAX_THREADS_PER_BLOCK = 1024
WARP = 32
DEFAULT_ELEM_BYTES = 2.0


def _entries(shapes) -> dict:
    """The dict this module reads ``M``/``elem_bytes``/... from; a template may also take its
    shapes as a list, which carries none of these entries."""
    return shapes if isinstance(shapes, dict) else {}


def elem_bytes_of(shapes: dict, dtype: str | None = None) -> float:
    """Bytes per operand element: ``shapes['elem_bytes']``, else ``shapes['dtype']``, else
    ``dtype``, else 2 (bf16)."""
    shapes = _entries(shapes)
    if shapes.get("elem_bytes") is not None:
        return float(shapes["elem_bytes"])
    for d in (shapes.get("dtype"), dtype):
        if d is not None:
            return ELEM_BYTES[normalize_dtype(d)]
    return DEFAULT_ELEM_BYTES


def smem_bytes(meta: dict, elem_bytes: float = DEFAULT_ELEM_BYTES) -> int:
    """Estimated shared memory of a tiled kernel:
    ``(BLOCK_M*BLOCK_K + BLOCK_K*BLOCK_N) * elem_bytes * num_stages``.

    A product term with a missing key contributes nothing (an op without ``BLOCK_K`` stages
    no operand tiles and is estimated at 0); a missing ``num_stages`` counts as one stage."""
    bm, bn, bk = meta.get("BLOCK_M"), meta.get("BLOCK_N"), meta.get("BLOCK_K")
    elems = 0
    if bm is not None and bk is not None:
        elems += bm * bk
    if bk is not None and bn is not None:
        elems += bk * bn
    return int(math.ceil(elems * elem_bytes * meta.get("num_stages", 1)))


def quant_block_rules(quant_block: Any, meta: dict) -> dict[str, int]:
    """Which meta keys must be multiples of what, for a ``quant_block`` shape entry:

    * a dict ``{"BLOCK_K": 128, ...}``: exactly those;
    * a pair ``(block_n, block_k)`` (DeepSeek's 128x128 weight blocks are ``[n, k]``):
      ``BLOCK_N`` and ``BLOCK_K``;
    * an int ``q``: the reduction block ``BLOCK_K`` (scales run along K) when the meta has
      one, otherwise every ``BLOCK_*`` key (a one-dimensional blocked kernel).
    Keys absent from ``meta`` are ignored."""
    if quant_block is None:
        return {}
    if isinstance(quant_block, dict):
        rules = dict(quant_block)
    elif isinstance(quant_block, (tuple, list)):
        if len(quant_block) != 2:
            raise ValueError(f"quant_block {quant_block!r}: expected an int, (block_n, block_k) or a dict")
        rules = {"BLOCK_N": quant_block[0], "BLOCK_K": quant_block[1]}
    elif isinstance(quant_block, int) and not isinstance(quant_block, bool):
        keys = ["BLOCK_K"] if "BLOCK_K" in meta else [k for k in meta if k.startswith("BLOCK_")]
        rules = {k: quant_block for k in keys}
    else:
        raise ValueError(f"quant_block {quant_block!r}: expected an int, (block_n, block_k) or a dict")
    for k, q in rules.items():
        if not isinstance(q, int) or isinstance(q, bool) or q <= 0:
            raise ValueError(f"quant_block for {k}: {q!r} is not a positive int")
    return {k: q for k, q in rules.items() if k in meta}


def device_reason(meta: dict, shapes: dict, device: DeviceSpec) -> str | None:
    """Why ``meta`` cannot run on ``device`` (architecture pruning only), or None."""
    warps = meta.get("num_warps")
    if warps is not None:
        if warps < 1:
            return f"num_warps={warps}: a block needs at least one warp"
        if warps * WARP > MAX_THREADS_PER_BLOCK:
            return f"num_warps={warps}: {warps * WARP} threads > {MAX_THREADS_PER_BLOCK} per block"
        if warps > device.max_warps_per_sm:
            return f"num_warps={warps} > {device.max_warps_per_sm} warps per SM on {device.arch}"
    smem = smem_bytes(meta, elem_bytes_of(shapes))
    if smem > device.smem_per_block:
        return (f"shared memory {smem} B > {device.smem_per_block} B per block on {device.arch} "
                f"({device.name})")
    for k, q in quant_block_rules(_entries(shapes).get("quant_block"), meta).items():
        if meta[k] % q:
            return f"{k}={meta[k]} is not a multiple of the quantisation block {q}"
    return None


def _module(template_module: ModuleType | str) -> ModuleType:
    if isinstance(template_module, str):
        return importlib.import_module(template_module)
    return template_module


def grid(template_module: ModuleType | str, op: str) -> list[dict]:
    """The Cartesian product of ``META[op]``: keys in META's order, the last key varying
    fastest, values in their tuple order."""
    mod = _module(template_module)
    table = getattr(mod, "META", None)
    key = (mod.__name__, op, repr(table.get(op)) if isinstance(table, dict) else None)
    if key not in _GRIDS:
        _GRIDS[key] = tuple(_grid(mod, op))
    return [dict(m) for m in _GRIDS[key]]


_GRIDS: dict = {}


def _grid(mod: ModuleType, op: str) -> list[dict]:
    meta_table = getattr(mod, "META", None)
    if not isinstance(meta_table, dict):
        raise ValueError(f"template module {mod.__name__!r} has no META dict")
    if op not in meta_table:
        raise ValueError(f"template module {mod.__name__!r} has no META for op {op!r} "
                         f"(it tunes: {', '.join(sorted(meta_table)) or 'nothing'})")
    params = meta_table[op]
    keys = list(params)
    values = []
    for k in keys:
        vals = tuple(params[k]) if isinstance(params[k], (tuple, list)) else None
        if not vals:
            raise ValueError(f"{mod.__name__}.META[{op!r}][{k!r}] must be a non-empty tuple of candidates, "
                             f"got {params[k]!r}")
        values.append(vals)
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def candidates_with_reasons(template_module: ModuleType | str, op: str, shapes: dict,
                            device: DeviceSpec) -> tuple[list[dict], list[tuple[dict, str]]]:
    """``(kept, pruned)``: the grid in deterministic order split into what can run and
    ``(meta, reason)`` for what cannot.  The template's ``constraints`` is asked first, so
    its reason wins over the architecture's."""
    mod = _module(template_module)
    constraints = getattr(mod, "constraints", None)
    kept: list[dict] = []
    pruned: list[tuple[dict, str]] = []
    for meta in grid(mod, op):
        reason = constraints(op, dict(meta), shapes) if constraints is not None else None
        if reason is None:
            reason = device_reason(meta, shapes, device)
        if reason is None:
            kept.append(meta)
        else:
            pruned.append((meta, str(reason)))
    return kept, pruned


def candidates(template_module: ModuleType | str, op: str, shapes: dict, device: DeviceSpec) -> list[dict]:
    """The meta choices of ``op`` that can run at ``shapes`` on ``device``, in grid order."""
    return candidates_with_reasons(template_module, op, shapes, device)[0]
