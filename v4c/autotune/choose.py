"""Compile-time choice of each kernel's meta-parameters, reporting where it came from:
a tuning record (exact, same-arch, older-toolchain, arch-family), the cost model, or the
template's default."""
from __future__ import annotations

import hashlib
import importlib

from ..codegen.emit import Emitted, render
from ..graph.ir import Graph
from .costmodel import rank
from .problems import hardware_for, problems, toolchain
from .space import candidates
from .store import TuningStore


def source_hash(family: str, target: str) -> str:
    return hashlib.sha256(render(family, target).encode()).hexdigest()


def choose_configs(graph: Graph, emitted: Emitted, target: str, store: TuningStore | None = None) -> None:
    """Fill ``emitted.ops[op]['meta']`` and ``['config_source']`` for every kernel op, in place."""
    hw, spec = hardware_for(target)
    tc = toolchain()
    for p in problems(graph, set(emitted.ops)):
        entry = emitted.ops[p.op]
        if entry.get("config_source") not in (None, "default"):
            continue  # the op's first signature decided; one meta per op kind in an artifact
        fam = entry["module"]
        found = store.lookup(p.op, source_hash(fam, target), p.signature, p.bucket, p.dtypes, p.quant, hw, tc) \
            if store is not None else None
        if found:
            entry.update(meta=dict(found.record.config), config_source=found.tier, bucket=found.bucket)
            continue
        if target != "cpu":
            mod = importlib.import_module(f"v4c.codegen.templates.{fam}")
            shapes = p.shapes(graph)
            try:
                cands = candidates(mod, p.op, shapes, spec)
            except Exception as e:  # a template that cannot judge these shapes keeps its default
                entry.update(config_source="default", bucket=p.bucket, note=f"cost model skipped: {e!r}"[:200])
                continue
            if cands:
                best, _ = rank(cands, p.cost(graph), shapes, spec, p.dtypes)[0]
                entry.update(meta=dict(best), config_source="cost-model", bucket=p.bucket)
                continue
        entry.update(config_source="default", bucket=p.bucket)
