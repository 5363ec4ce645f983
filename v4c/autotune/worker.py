"""Measures tuning candidates in a child process, so a config that crashes the process (a
kernel fault, an abort in the driver) is recorded as such instead of ending the tuning run.

The parent sends one JSON line per candidate (its meta-parameters) and reads one JSON line
back; if the child dies, the candidate in flight is recorded as "crashed" and a fresh child
is started for the next one.

    python -m v4c.autotune.worker ARTIFACT OP SIGNATURE CONTEXT TOKENS
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


class Worker:
    def __init__(self, artifact, op: str, signature: str, context: int, tokens: int, env=None):
        self.argv = [sys.executable, "-m", "v4c.autotune.worker", str(artifact), op, signature, str(context),
                     str(tokens)]
        self.env = env
        self.proc = None

    def _start(self):
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(self.env or {})}, bufsize=1)

    def measure(self, meta: dict, timeout: float = 600) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps(meta) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:  # the child died on this candidate
            code = self.proc.wait(timeout=30)
            self.proc = None
            return {"seconds": None, "status": "compile_error", "detail": f"worker process died (exit {code})"}
        return json.loads(line)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        self.proc = None


def _serve(artifact, op, signature, context, tokens):
    import torch

    from ..artifact.manifest import verify_artifact
    from ..graph.registry import get_op
    from ..graph.text import parse_graph
    from ..runtime.kernels import load_modules
    from .inputs import node_inputs
    from .problems import problems
    from .tune import measure_candidate

    man = verify_artifact(artifact)
    graph = parse_graph((man.root / man.data["graph"]).read_text())
    on_gpu = torch.cuda.is_available() and man.data["target"] != "cpu"
    device = "cuda" if on_gpu else "cpu"
    mods = load_modules(man.root, man.data["kernels"], device)
    p = next(q for q in problems(graph, {op}, tokens=tokens, context=context) if q.signature == signature)
    launcher = mods[man.data["kernels"]["ops"][op]["module"]].KERNELS[op]
    args = node_inputs(graph, p.node, {"B": p.batch, "T": p.tokens, "L": p.context}, p.context, device)
    want = get_op(op).ref(*[a.clone() for a in args], **p.node.attr)
    for line in sys.stdin:
        print(json.dumps(measure_candidate(launcher, args, want, json.loads(line), p.node.attr, on_gpu)), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    _serve(a[0], a[1], a[2], int(a[3]), int(a[4]))
