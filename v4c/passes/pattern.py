"""Declarative rewrites: a pattern is a few lines of IR text (ops and value names, no types);
a rule replaces every match with the node(s) its ``build`` returns.

    Rule("kv-proj", '''
        %a = linear(%x, %w)
        %b = rms_norm(%a, %nw)
        %c = rope(%b, %pos)
    ''', outputs=["c"], build=...)

Names defined in the pattern are internal; the others are variables bound to whatever
the graph feeds in. A match is accepted only if every internal value that is not one of
``outputs`` is used by matched nodes alone, and every output's outside users come after
the matched nodes; otherwise the reason is recorded (``why_not``).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from ..errors import GraphError
from ..graph.ir import Graph, Node
from ..graph.registry import get_op

_LINE = re.compile(r"^(%\w+(?:\s*,\s*%\w+)*)\s*=\s*(\w+)\((.*)\)$")


@dataclass(frozen=True)
class PNode:
    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


def parse_pattern(text: str) -> list[PNode]:
    nodes = []
    for ln in (x.strip() for x in text.strip().splitlines()):
        if not ln:
            continue
        m = _LINE.match(ln)
        if not m:
            raise GraphError(f"bad pattern line {ln!r}")
        names = lambda s: tuple(x.strip()[1:] for x in s.split(",") if x.strip())  # noqa: E731
        nodes.append(PNode(m.group(2), names(m.group(3)), names(m.group(1))))
    return nodes


@dataclass
class Match:
    """Bindings of one match: ``m[name]`` is the graph value bound to a pattern name,
    ``m.node(name)`` the graph node that defines it."""

    values: dict[str, str]
    nodes: dict[str, Node]  # pattern output name -> matched graph node
    indices: list[int]

    def __getitem__(self, name: str) -> str:
        return self.values[name]

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def attr(self, name: str) -> dict:
        return self.node(name).attr


@dataclass
class Rule:
    name: str
    pattern: str
    outputs: list[str]
    # returns the replacement as (op, inputs, outputs, attrs) tuples, in execution order
    build: Callable[[Match, "Namer"], list[tuple]]
    when: Callable[[Match], str | None] = lambda m: None  # returns a reason to refuse, or None
    pnodes: list[PNode] = field(init=False)

    def __post_init__(self):
        self.pnodes = parse_pattern(self.pattern)
        defined = {o for p in self.pnodes for o in p.outputs}
        missing = set(self.outputs) - defined
        if missing:
            raise GraphError(f"rule {self.name}: outputs {sorted(missing)} are not defined by the pattern")


class Namer:
    """Fresh value names for outputs a rewrite adds."""

    def __init__(self, used: set[str]):
        self.used = used

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.used:
            name, k = f"{base}.{k}", k + 1
        self.used.add(name)
        return name


class _Index:
    def __init__(self, g: Graph):
        self.producer: dict[str, tuple[int, int]] = {}
        self.users: dict[str, list[int]] = defaultdict(list)
        for i, n in enumerate(g.nodes):
            for j, o in enumerate(n.outputs):
                self.producer[o] = (i, j)
            for v in n.inputs:
                self.users[v].append(i)
        self.graph_outputs = set(g.outputs) | {v for _, v in g.state_outputs}


def _try(rule: Rule, g: Graph, idx: _Index, root: int, taken: set[int]) -> Match | str:
    """Match ``rule`` with its last pattern node at graph node ``root``; a Match or the reason not."""
    pn = rule.pnodes
    vals: dict[str, str] = {}
    where: dict[int, int] = {}  # pattern node index -> graph node index

    def bind(name, value):
        if vals.setdefault(name, value) != value:
            raise _NoMatch(f"%{name} would be both %{vals[name]} and %{value}")

    def place(p_i: int, g_i: int):
        p, n = pn[p_i], g.nodes[g_i]
        if n.op != p.op or len(n.inputs) != len(p.inputs) or len(n.outputs) != len(p.outputs):
            raise _NoMatch(f"%{n.outputs[0]} is {n.op}, the pattern wants {p.op}")
        if g_i in taken or g_i in where.values() and where.get(p_i) != g_i:
            raise _NoMatch(f"%{n.outputs[0]} already belongs to another match")
        where[p_i] = g_i
        for a, v in zip(p.outputs, n.outputs):
            bind(a, v)
        for a, v in zip(p.inputs, n.inputs):
            bind(a, v)

    defining = {o: i for i, p in enumerate(pn) for o in p.outputs}
    try:
        place(len(pn) - 1, root)
        while len(where) < len(pn):
            # backwards first: an output already bound (read by a matched node) names its producer
            back = [(p_i, o) for p_i, p in enumerate(pn) if p_i not in where
                    for o in p.outputs[:1] if any(x in vals for x in p.outputs)]
            if back:
                for p_i, _ in back:
                    out = next(o for o in pn[p_i].outputs if o in vals)
                    if vals[out] not in idx.producer:
                        raise _NoMatch(f"%{vals[out]} is not produced by a node")
                    place(p_i, idx.producer[vals[out]][0])
                continue
            # then forwards: a node whose pattern-defined inputs are bound is among the users of one of them
            fwd = [p_i for p_i, p in enumerate(pn) if p_i not in where
                   and all(a in vals for a in p.inputs if a in defining) and any(a in vals for a in p.inputs)]
            if not fwd:
                break
            p = pn[fwd[0]]
            first = vals[next(a for a in p.inputs if a in vals)]
            cands = [u for u in idx.users.get(first, []) if g.nodes[u].op == p.op and u not in taken
                     and u not in where.values()
                     and all(vals.get(a, v) == v for a, v in zip(p.inputs, g.nodes[u].inputs))]
            if not cands:
                raise _NoMatch(f"no {p.op} user of %{first}")
            place(fwd[0], cands[0])
        if len(where) < len(pn):
            raise _NoMatch("pattern not connected")
    except _NoMatch as e:
        # a miss at the root op alone is just a different op chain; report only near misses
        return str(e) if len(where) >= 2 else ""
    members = set(where.values())
    last = max(members)
    for p in pn:  # internal values may not escape; outputs may be used only later on
        for o in p.outputs:
            v = vals[o]
            outside = [u for u in idx.users.get(v, []) if u not in members]
            if o in rule.outputs:
                if any(u < last for u in outside):
                    return f"%{v} is used before the fused op could run"
            elif outside or v in idx.graph_outputs:
                return f"%{v} has users outside the pattern"
    m = Match(vals, {o: g.nodes[where[defining[o]]] for o in defining}, sorted(members))
    reason = rule.when(m)
    return reason if reason else m


class _NoMatch(Exception):
    pass


def rewrite(g: Graph, rule: Rule) -> tuple[Graph, int, list[str]]:
    """Apply ``rule`` to every non-overlapping match; returns (graph, matches, reasons for misses)."""
    idx = _Index(g)
    root_op = rule.pnodes[-1].op
    taken: set[int] = set()
    matches: list[Match] = []
    misses: list[str] = []
    for i, n in enumerate(g.nodes):
        if n.op != root_op or i in taken:
            continue
        r = _try(rule, g, idx, i, taken)
        if isinstance(r, str):
            if r:
                misses.append(f"{rule.name}: not at %{n.outputs[0]}: {r}")
            continue
        matches.append(r)
        taken.update(r.indices)
    if not matches:
        return g, 0, misses
    types = g.value_types()
    namer = Namer(set(types))
    at = {max(m.indices): m for m in matches}
    nodes = []
    for i, n in enumerate(g.nodes):
        if i in at:
            for op, ins, outs, attrs in rule.build(at[i], namer):
                new = Node.make(op, ins, outs, (), attrs)
                out_types = get_op(op).infer([types[v] for v in ins], new.attr)
                types.update(zip(outs, out_types))
                nodes.append(Node(op, new.inputs, new.outputs, tuple(out_types), new.attrs))
        elif i not in taken:
            nodes.append(n)
    return g.replace(nodes=tuple(nodes)), len(matches), misses
