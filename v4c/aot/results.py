"""The AOT result cache: one JSON file per compiled launch, named by its key, in v4c's cache directory.

A result says whether the launch compiled for its target and what it used (registers, spills, shared
memory); the compiled binary itself stays in Triton's cache under ``triton/`` beside it. Results are
facts of (source, specialisation, options, target, Triton build), which the key pins, so they never
go stale; a result whose binary has gone is recompiled.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_write_text
from ..settings import cache_dir


class ResultCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "aot"
        self.results = self.root / "results"
        self.triton = self.root / "triton"

    def _path(self, key: str) -> Path:
        return self.results / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            r = json.loads(self._path(key).read_text())
        except (OSError, ValueError):
            return None
        if r.get("ok") and not all(Path(f).is_file() for f in r.get("files", [])):
            return None  # the binary is gone: compile again
        return r

    def put(self, key: str, result: dict) -> None:
        atomic_write_text(self._path(key), json.dumps(result, sort_keys=True))
