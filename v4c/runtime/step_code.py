"""A graph's forward call as one straight-line Python function, made once per executor.

The executor's loop over a plan paid ~2.2 us a node in dictionary traffic (the argument list, the
environment's updates and deletions, the tuple unpacking), ~195 us of a 3.2 ms decode step of an
88-node graph even with every node's work removed. Here each node is one line: its arguments are local
variables (or parameters bound once, as closure variables), its results are assigned to locals, and a
value is deleted after its last reader, as the loop did.

Nothing from the artifact's text enters the generated source: values are named ``v<i>`` / ``p<i>``, and
the names of states and inputs are looked up through a tuple of strings the source indexes by number.
The implementations and their attributes are read from the plan at each call (``plan[k][0]``,
``plan[k][3]``), so a plan whose functions are wrapped or replaced in place (tests, benchmarks) runs
the wrappers; the dataflow (which value feeds which argument) is the graph's.
"""
from __future__ import annotations

from typing import Callable, Mapping

from ..graph.ir import Graph
from ..graph.registry import get_op


def compile_step(graph: Graph, params: Mapping[str, object], frees: list[list[str]], head: int | None,
                 take: Callable) -> Callable:
    """``step(plan, states, inputs, last) -> [outputs]``: ``plan`` a list of executor entries
    ``(fn, ins, outs, attrs, state_io, name)`` in the graph's node order; ``last`` (or None) gathers the
    input of node ``head`` with ``take(x, last)`` before its call."""
    local: dict[str, str] = {}  # node outputs: value name -> local variable
    bound: dict[str, str] = {}  # parameters: value name -> closure variable
    looked: dict[str, str] = {}  # states and inputs: value name -> local variable read at entry
    names: list[str] = []  # the strings those reads index (never spliced into the source)
    pvals: list[object] = []
    state_names = {n for n, _ in graph.states}
    input_names = {n for n, _ in graph.inputs}

    def ref(name: str) -> str:
        if name in local:
            return local[name]
        if name in looked:
            return looked[name]
        if name in params and name not in state_names and name not in input_names:
            if name not in bound:
                bound[name] = f"p{len(bound)}"
                pvals.append(params[name])
            return bound[name]
        looked[name] = f"x{len(looked)}"
        names.append(name)
        return looked[name]

    body: list[str] = []
    made = 0  # locals made so far (a freed one's name is never reused)
    for k, node in enumerate(graph.nodes):
        args = [ref(v) for v in node.inputs]
        if k == head:
            args[0] = f"({args[0]} if _last is None else _take({args[0]}, _last))"
        body.append(f"_e = _plan[{k}]")
        body.append(f"_r = _e[0]({', '.join(args)}{', ' if args else ''}**_e[3])")
        body.append("if not isinstance(_r, tuple): _r = (_r,)")  # (a tuple's subclasses too: torch's return types)
        for ii, oi in get_op(node.op).state_io:  # states are updated in place: the buffers must not move
            body.append(f"if _r[{oi}] is not {ref(node.inputs[ii])}: _moved(_e, {ii})")
        for j, out in enumerate(node.outputs):
            var = local[out] = f"v{made}"
            made += 1
            body.append(f"{var} = _r[{j}]")
        body.append("del _r")
        for v in frees[k]:  # an activation is released after its last reader: the allocator reuses it
            if v in local:
                body.append(f"del {local.pop(v)}")
    ret = ", ".join(ref(o) for o in graph.outputs)

    entry = [f"{var} = {'_S' if name in state_names else '_I'}[_N[{i}]]"
             for i, (name, var) in enumerate(looked.items())]
    src = ["def _make(_P, _N, _take, _moved):"]
    src += [f"    {var} = _P[{i}]" for i, var in enumerate(bound.values())]
    src += ["    def _step(_plan, _S, _I, _last):"]
    src += [f"        {line}" for line in entry + body]
    src += [f"        return [{ret}]", "    return _step"]
    scope: dict = {}
    text = "\n".join(src)
    exec(compile(text, "<v4c step>", "exec"), scope)  # our own source, from value indices only
    step = scope["_make"](pvals, tuple(names), take, _moved)
    step.source = text  # (for reading: what runs, line by line)
    return step


def _moved(entry, ii: int):
    raise RuntimeError(f"op {entry[5]} returned a new tensor for state %{entry[1][ii]}")
