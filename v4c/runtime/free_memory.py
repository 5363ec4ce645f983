"""How much memory a new session may still take on its device: the machine's available memory, and on
Linux the least any of the process's cgroups still allows (the OOM killer acts on those limits)."""
from __future__ import annotations

import os
from pathlib import Path

import torch


def format_bytes(n: int) -> str:
    unit = next(u for u in range(4, -1, -1) if n >= 1024 ** u or u == 0)
    return f"{n / 1024 ** unit:.3g} {('B', 'KiB', 'MiB', 'GiB', 'TiB')[unit]}"


def _cgroup_level(d: Path, limit_f: str, usage_f: str, stat_f: str, key: str) -> int | None:
    """Bytes cgroup ``d`` may still take (its limit less its use, page cache it can drop counted as
    free), or None where it sets no limit or cannot be read."""
    try:
        raw = (d / limit_f).read_text().strip()
        if raw == "max" or int(raw) >= 1 << 60:  # no limit (v1 writes a huge number)
            return None
        used = int((d / usage_f).read_text())
        stat = dict(line.split(" ", 1) for line in (d / stat_f).read_text().splitlines() if " " in line)
        return max(int(raw) - used + int(stat.get(key, 0)), 0)
    except (OSError, ValueError):
        return None


def _cgroup_free() -> int | None:
    """The least any cgroup of this process (its own and every parent) may still take: the OOM killer
    acts on these limits, not on the machine's free memory. None without a limit."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    best = None
    for line in lines:
        hid, ctrls, path = (line.split(":", 2) + ["", ""])[:3]
        if hid == "0" and not ctrls:  # cgroup v2
            root, files = Path("/sys/fs/cgroup"), ("memory.max", "memory.current", "memory.stat", "inactive_file")
        elif "memory" in ctrls.split(","):  # cgroup v1
            root, files = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes",
                                                           "memory.stat", "total_inactive_file")
        else:
            continue
        d = root / path.lstrip("/")
        while True:
            free = _cgroup_level(d, *files)
            if free is not None:
                best = free if best is None else min(best, free)
            if d == root or d == d.parent:
                break
            d = d.parent
    return best


def available_memory(device: torch.device) -> int | None:
    """Bytes a new session's state can take on ``device`` (None: unknown, nothing is refused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (AttributeError, OSError, ValueError):
            return None
    group = _cgroup_free()
    return avail if group is None else min(avail, group)
