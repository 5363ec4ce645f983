"""Where a compile writes: a private partial directory beside the output, renamed into place at the end.

``--force`` replaces only what is a v4c artifact (a directory whose manifest.json says so), never a
checkpoint, a user's directory or a file, and never the model being compiled. The old artifact is
moved aside and removed only once the new one is in place. A compile killed before it could clean
up (SIGKILL, power loss) leaves its partial directory behind; the next compile to the same place
removes partials whose process is gone, and says so.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..errors import ArtifactError
from .layout import MANIFEST
from .manifest import FORMAT


def is_artifact(path: Path) -> bool:
    """A directory with a manifest.json of the v4c artifact format."""
    try:
        data = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return path.is_dir() and not path.is_symlink() and isinstance(data, dict) and data.get("format") == FORMAT


def _inside(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies under it (both resolved)."""
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def check_output(output: Path, model: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output the compile may not write or replace."""
    if (output.exists() or output.is_symlink()) and _inside(model, output):
        raise ArtifactError(f"{output}: the output would replace the model being compiled ({model}); "
                            "choose another output path")
    if not (output.exists() or output.is_symlink()):
        return
    if not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--force) to replace it")
    if not is_artifact(output):
        what = "a file" if output.is_file() else "a symlink" if output.is_symlink() else "a directory"
        raise ArtifactError(f"{output} exists and is {what} that is not a v4c artifact (no manifest.json of format "
                            f"{FORMAT!r}); --force replaces only v4c artifacts: remove it yourself or choose "
                            "another output path")


_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.partial$")
_OLD = re.compile(r"\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def remove_stale(output: Path, log: Callable[[str], None]) -> list[Path]:
    """Remove the partial and set-aside directories of earlier compiles to ``output`` whose process has
    gone (they carry its pid); those of running compiles are left alone."""
    removed = []
    parent = output.parent
    if not parent.is_dir():
        return removed
    for p in parent.iterdir():
        m = _PARTIAL.match(p.name) or _OLD.match(p.name)
        if not m or m["name"] != output.name or _alive(int(m["pid"])) or p.is_symlink() or not p.is_dir():
            continue
        size = _size(p)
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        log(f"removed {p} ({size / 2**20:.1f} MiB), left by an interrupted compile (process {m['pid']})")
    return removed


_LIVE: set[Path] = set()  # this process's partial directories, for remove_live_partials
_OUTPUTS: set[Path] = set()  # outputs it is making one for (registered first: no window for a signal)


def partial_dir(output: Path) -> Path:
    """A fresh private directory beside ``output``, named so that a later compile can tell whose it was."""
    output.parent.mkdir(parents=True, exist_ok=True)
    _OUTPUTS.add(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.{os.getpid()}.", suffix=".partial", dir=output.parent))
    _LIVE.add(tmp)
    return tmp


def discard_partial(tmp: Path) -> None:
    """Remove a compile's partial directory (after a failure)."""
    shutil.rmtree(tmp, ignore_errors=True)
    _LIVE.discard(tmp)


def remove_live_partials() -> None:
    """Remove every partial directory this process still has: for a SIGTERM handler, which exits at once
    instead of raising into whatever runs (an exception raised inside an extension module's import or
    callback can abort the process before any cleanup)."""
    for out in list(_OUTPUTS):  # also one made but not yet recorded when the signal came
        for p in out.parent.glob(f".{glob.escape(out.name)}.{os.getpid()}.*.partial"):
            _LIVE.add(p)
    for tmp in list(_LIVE):
        discard_partial(tmp)


def put_in_place(tmp: Path, output: Path) -> None:
    """Rename the finished ``tmp`` to ``output``; an existing artifact there is moved aside first and
    removed only after the new one is in place (restored if the rename fails)."""
    if not (output.exists() or output.is_symlink()):
        os.replace(tmp, output)
        _LIVE.discard(tmp)
        return
    if not is_artifact(output):  # it changed since check_output
        raise ArtifactError(f"{output} is no longer a v4c artifact; not replacing it")
    old = output.with_name(f".{output.name}.old-{os.getpid()}")
    os.replace(output, old)
    try:
        os.replace(tmp, output)
    except BaseException:
        os.replace(old, output)
        raise
    _LIVE.discard(tmp)
    shutil.rmtree(old, ignore_errors=True)
