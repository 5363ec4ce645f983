"""benchmarks/gpu_check.py is run on rare, metered GPU time: its --smoke mode (the tiny model, every call site
at two buckets, under the interpreter) must work here, or the device time is lost."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_site_against_its_reference(tmp_path):
    out = tmp_path / "smoke.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--smoke", "--variants", "release",
                        "--out", str(out)], capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert {x["bucket"] for x in rep["results"]} == {"B=1,T=1", "B=1,T=16"}
    assert all("error" not in x and x["max_rel_err"] < 1e-3 for x in rep["results"])
    assert {"sparse_attention", "moe_ffn", "compressor", "indexer"} <= {x["op"] for x in rep["results"]}
