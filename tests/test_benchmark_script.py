"""benchmarks/cpu_vs_hf.py end to end on its smoke-size model (--quick): both engines run in child
processes and every ratio in the JSON is the quotient of the two engines' measured rates."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_vs_hf_quick_run(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_vs_hf.py"), "--quick", "--no-context",
                        "--workdir", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] and res["machine"]["copy_gb_per_s"] > 0 and res["machine"]["matmul_gflop_per_s_bf16"] > 0
    assert [p["T"] for p in res["prefill"]] == [64, 256] and [d["batch"] for d in res["decode"]] == [1, 8]
    for row in res["prefill"] + res["decode"]:
        v, h = row["v4c"], row["hf"]
        assert (v["engine"], h["engine"]) == ("v4c", "hf")
        assert row["speedup"] == pytest.approx(v["tokens_per_s"] / h["tokens_per_s"])
        assert v["peak_rss_mib"] > 0 and h["peak_rss_mib"] > 0
    for row in res["decode"]:
        assert row["v4c"]["page_faults_per_step"] >= 0 and "rss_growth_mib" in row["hf"]
    assert "decode B=1" in r.stdout and "ratio" in r.stdout
