"""Passes and the pass manager.

A pass maps a Graph to a Graph and says honestly whether it changed anything; it has a
kebab-case ``name`` and a one-line docstring saying what holds afterwards. The manager
runs a named pipeline, times each pass, verifies the graph after each one, can print the
IR after any of them, and keeps every "why not fused" note.
"""
from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Callable

from ..graph.ir import Graph
from ..graph.registry import get_op
from ..graph.text import print_graph
from ..graph.verify import verify


@dataclass
class PassResult:
    graph: Graph
    changed: bool
    notes: list[str] = field(default_factory=list)


class Pass(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def run(self, g: Graph) -> PassResult:
        """Transform ``g``; ``changed`` must be False exactly when the graph is returned as it was."""

    @property
    def guarantee(self) -> str:
        return (self.__doc__ or "").strip().splitlines()[0]


@dataclass
class PassRecord:
    name: str
    changed: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: list[str]


class PassManager:
    def __init__(self, passes: list[Pass], verify_each: bool = True, print_after: set[str] | None = None,
                 print_after_all: bool = False, out: Callable[[str], None] = print):
        self.passes = passes
        self.verify_each = verify_each
        self.print_after = print_after or set()
        self.print_after_all = print_after_all
        self.out = out
        self.records: list[PassRecord] = []

    def run(self, g: Graph) -> Graph:
        unknown = self.print_after - {p.name for p in self.passes}
        if unknown:
            raise ValueError(f"--print-after names passes not in the pipeline: {sorted(unknown)} "
                             f"(pipeline: {', '.join(p.name for p in self.passes)})")
        for p in self.passes:
            t0 = time.perf_counter()
            r = p.run(g)
            dt = time.perf_counter() - t0
            if self.verify_each:
                verify(r.graph)
            self.records.append(PassRecord(p.name, r.changed, dt, len(g.nodes), len(r.graph.nodes), r.notes))
            g = r.graph
            if self.print_after_all or p.name in self.print_after:
                self.out(f"// IR after {p.name}\n{print_graph(g)}")
        return g

    def applied(self) -> list[str]:
        return [r.name for r in self.records if r.changed]

    def report(self) -> str:
        lines = [f"{'pass':<24}{'changed':>8}{'nodes':>14}{'ms':>9}"]
        for r in self.records:
            lines.append(f"{r.name:<24}{str(r.changed).lower():>8}{r.nodes_before:>7}->{r.nodes_after:<6}"
                         f"{r.seconds * 1e3:>9.2f}")
        return "\n".join(lines)


class RewritePass(Pass):
    """Applies a list of declarative rules until none matches."""

    rules: list = []

    def run(self, g: Graph) -> PassResult:
        from .pattern import rewrite
        changed, notes = False, []
        for rule in self.rules:
            g, n, misses = rewrite(g, rule)
            changed |= n > 0
            notes += misses
        # keep the notes about values still computed by unfused ops (another rule may have taken the rest)
        fused_values = {o for node in g.nodes if get_op(node.op).fused for o in node.outputs}
        notes = [n for n in notes if n.split("%", 1)[1].split(":", 1)[0] not in fused_values]
        return PassResult(g, changed, notes)
