"""``v4c inspect``'s ``implementations``: which backend implementation runs each node, per phase,
and why the ones before it declined, as ``v4c.load`` would bind them on this machine."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from .backends import PHASES, for_artifact, plan
from .graph.ir import Graph


def default_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def implementations(graph: Graph, root: Path, kernels: dict, backend: str | None = None,
                    device: str | None = None) -> dict:
    """``{"backend", "device", "nodes": [row per node and phase]}``; nothing is imported or run."""
    device = device or default_device()
    chosen = for_artifact(backend, device, root, kernels)
    rows = [c.row() for ph, choices in plan(graph, chosen, device).items() for c in choices]
    return {"backend": chosen.name, "device": device, "nodes": rows}


def format_implementations(impls: dict) -> list[str]:
    """Per op, the implementation(s) its nodes run in each phase; then each distinct reason an
    implementation was passed over."""
    lines = [f"implementations ({impls['backend']} backend on {impls['device']})",
             f"{'op':<18}{'nodes':>6}  {'decode':<28}{'prefill':<28}"]
    by_op: dict = {}
    for r in impls["nodes"]:
        by_op.setdefault(r["op"], {ph: Counter() for ph in PHASES})[r["phase"]][f"{r['backend']}.{r['implementation']}"] += 1
    for op, phases in sorted(by_op.items()):
        cells = [", ".join(k if len(c) == 1 else f"{k} x{n}" for k, n in sorted(c.items())) for c in phases.values()]
        lines.append(f"{op:<18}{sum(phases[PHASES[0]].values()):>6}  " + "".join(f"{c:<28}" for c in cells).rstrip())
    why = Counter((r["op"], d["backend"], d["implementation"], d["reason"])
                  for r in impls["nodes"] for d in r["declined"])
    if why:
        lines.append("declined:")
    for (op, b, name, reason), n in sorted(why.items()):
        lines.append(f"  {op} {b}.{name} (x{n}): {reason}")
    return lines
