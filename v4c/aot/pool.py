"""A pool of AOT worker processes (``worker.py``) fed from one queue: each worker takes the next
request when it is free, so long compiles do not hold up short ones.

Workers run with Triton's interpreter off whatever this process uses, and with Triton's cache in
v4c's own cache directory, so the compiled binaries of every launch stay there for later compiles
and for the artifacts that ship them.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from ..errors import V4CError


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 16))


class WorkerPool:
    def __init__(self, workers: int, triton_cache: Path):
        self.size = max(1, int(workers))
        self.triton_cache = Path(triton_cache)
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []

    def __enter__(self) -> "WorkerPool":
        self.triton_cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(self.triton_cache),
               "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("TRITON_ALWAYS_COMPILE", None)
        for _ in range(self.size):
            log = tempfile.TemporaryFile(mode="w+")
            self._logs.append(log)
            self._procs.append(subprocess.Popen([sys.executable, "-m", "v4c.aot.worker"], stdin=subprocess.PIPE,
                                                stdout=subprocess.PIPE, stderr=log, env=env, text=True, bufsize=1))
        return self

    def __exit__(self, *exc) -> None:
        for p in self._procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in self._logs:
            log.close()
        self._procs, self._logs = [], []

    def _log_tail(self, i: int) -> str:
        log = self._logs[i]
        log.seek(0)
        return log.read()[-2000:]

    def map(self, requests: list[dict], progress=None) -> list[dict]:
        """Replies in the order of ``requests``; ``progress(done, total)`` after each reply."""
        todo: queue.Queue = queue.Queue()
        for i, r in enumerate(requests):
            todo.put(i)
        replies: list = [None] * len(requests)
        failure: list = []
        done = [0]
        lock = threading.Lock()

        def serve(w: int):
            p = self._procs[w]
            while not failure:
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    p.stdin.write(json.dumps({"id": i, **requests[i]}) + "\n")
                    p.stdin.flush()
                    line = p.stdout.readline()
                except (BrokenPipeError, OSError):
                    line = ""
                if not line:
                    failure.append(f"AOT worker {w} exited (code {p.poll()}):\n{self._log_tail(w)}")
                    return
                reply = json.loads(line)
                replies[i] = reply
                with lock:
                    done[0] += 1
                    if progress:
                        progress(done[0], len(requests))

        threads = [threading.Thread(target=serve, args=(w,), daemon=True) for w in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failure:
            raise V4CError(failure[0])
        return replies
