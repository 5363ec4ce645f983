"""V4C_MALLOC_KEEP_MB: a CPU load keeps freed memory in glibc's heap, so a large buffer allocated again
after a free is not faulted in page by page (the setting is process-wide: each case runs in a fresh
interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from v4c.settings import glibc_mallopt, malloc_keep_mb


# a prefill's pattern in small: buffers of 8-64 MiB written and freed, a small result kept from each
# round; the minor page faults of the last of six rounds (the first ones grow the heap to its size)
_SCRIPT = """
import json, resource, torch
from v4c.settings import configure_malloc
kept = configure_malloc()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def last_round_faults():
    for _ in range(6):
        f0 = faults()
        bufs = [torch.empty(mb << 20, dtype=torch.uint8).fill_(1) for mb in (48, 24, 64, 8)]
        kept_row = bufs[0][:1024].clone()
        del bufs
        n = faults() - f0
    return n
print(json.dumps({"kept": kept, "faults": last_round_faults(), "again": configure_malloc()}))
"""


def _run(keep: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "V4C_MALLOC_KEEP_MB"}
    if keep is not None:
        env["V4C_MALLOC_KEEP_MB"] = keep
    r = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(glibc_mallopt() is None, reason="glibc's mallopt only")
def test_freed_memory_is_reused_without_page_faults():
    on = _run(None)
    assert on["kept"] == 1024 and on["again"] == 1024
    assert on["faults"] < 200, on  # 144 MiB is 36,864 pages: the heap's pages came back, already mapped
    off = _run("0")
    assert off["kept"] == 0
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages on for every mapping: a fresh map faults 2 MiB at a time")
    assert off["faults"] > 4000, off  # glibc's default: the 48 and 64 MiB ones mapped fresh every time


def test_the_setting_is_checked(monkeypatch):
    monkeypatch.setenv("V4C_MALLOC_KEEP_MB", "lots")
    with pytest.raises(ValueError, match="V4C_MALLOC_KEEP_MB must be a whole number of MiB"):
        malloc_keep_mb()
    monkeypatch.setenv("V4C_MALLOC_KEEP_MB", "4096")
    with pytest.raises(ValueError, match="between 0 and 2047"):
        malloc_keep_mb()
    monkeypatch.setenv("V4C_MALLOC_KEEP_MB", "256")
    assert malloc_keep_mb() == 256
    monkeypatch.delenv("V4C_MALLOC_KEEP_MB")
    assert malloc_keep_mb() == 1024
