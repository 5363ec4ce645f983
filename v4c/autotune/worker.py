"""Measures tuning candidates in a child process, so a config that crashes the process (a
kernel fault, an abort in the driver) is recorded as such instead of ending the tuning run.

The parent sends one JSON line per candidate (its meta-parameters) and reads one JSON line
back; if the child dies, the candidate in flight is recorded as "crashed" and a fresh child
is started for the next one.

    python -m v4c.autotune.worker ARTIFACT SITE BUCKET CONTEXT
"""
from __future__ import annotations

import json
import os
import subprocess
import sys


class Worker:
    def __init__(self, artifact, site: str, bucket: str, context: int, env=None):
        self.argv = [sys.executable, "-m", "v4c.autotune.worker", str(artifact), site, bucket, str(context)]
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


def _serve(artifact, site, bucket, context):
    import torch

    from ..graph.registry import get_op
    from ..backends.triton import load_modules
    from .inputs import node_inputs
    from .tune import _clone, _setup, measure_candidate, site_launcher, units

    man, graph = _setup(artifact)
    on_gpu = torch.cuda.is_available() and man.target != "cpu"
    device = "cuda" if on_gpu else "cpu"
    mods = load_modules(man.root, man.kernels(), device)
    u = next(x for x in units(man, graph, [bucket]) if x.site == site)
    u = type(u)(**{**u.__dict__, "context": context})
    launcher = site_launcher(mods, u)
    args = node_inputs(graph, u.node, u.bind(), u.context, device)
    want = get_op(u.op).ref(*[_clone(a) for a in args], **u.node.attr)
    for line in sys.stdin:
        print(json.dumps(measure_candidate(launcher, args, want, json.loads(line), u.node.attr, on_gpu)), flush=True)


if __name__ == "__main__":
    a = sys.argv[1:]
    _serve(a[0], a[1], a[2], int(a[3]))
