"""benchmarks/mtp_bench.py and benchmarks/mtp_fit.py end to end on their small model (--quick): every number
they report is there and consistent (the full-size runs are the README's, on a quiet machine)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, timeout=900):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_mtp_benchmarks_quick_runs(tmp_path):
    run("mtp_bench.py", "--quick", "--workdir", str(tmp_path / "b"), "--json", str(tmp_path / "bench.json"))
    res = json.loads((tmp_path / "bench.json").read_text())
    d = res["decode"]
    assert d["k"] == 0 and d["ms_per_step"] > 0 and d["distinct_experts_per_step"] == 3 * 6 + 5 * 6  # top-6, 8 layers
    assert [r["k"] for r in res["verify"]] == [1, 2, 3]
    for r in res["verify"]:
        assert d["distinct_experts_per_step"] < r["distinct_experts_per_step"] <= 8 * 16  # more, at most all 16
        assert r["floor_bytes"] > d["floor_bytes"] and r["over_floor"] == pytest.approx(r["ms_per_step"] / r["floor_ms"])
        assert r["draft_ms"] > 0 and r["rewind_ms"] > 0
        assert r["verify_over_decode"] == pytest.approx(r["ms_per_step"] / d["ms_per_step"])

    run("mtp_fit.py", "--quick", "--minutes", "0.3", "--workdir", str(tmp_path / "f"), "--json",
        str(tmp_path / "fit.json"))
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert fit["training"]["steps"] > 0 and fit["training"]["curve"]
    for label in ("fitted_prompts", "held_out_prompts"):
        rows = fit["decode"][label]
        assert rows["plain"]["tokens_per_s"] > 0
        assert [r["k"] for r in rows["speculative"]] == [1, 2, 3]
        for r in rows["speculative"]:
            assert r["same_tokens"] and r["tokens_per_step"] == pytest.approx(r["mean_accepted"] + 1)
            assert r["speedup"] == pytest.approx(r["tokens_per_s"] / rows["plain"]["tokens_per_s"])
