"""benchmarks/cpu_vs_hf.py end to end on its smoke-size model (--quick): both engines run in child
processes, both dtypes in one invocation by default, and every ratio in the JSON is the quotient of
the two engines' measured rates; --config takes a preset or a JSON file of config fields."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_cpu_vs_hf_quick_run(tmp_path):
    out = tmp_path / "bench.json"
    # one round (the default's second doubles the run: ~2 minutes of the suite): the alternation itself is
    # the same loop, and --rounds is checked below as it is recorded
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cpu_vs_hf.py"), "--quick", "--no-context",
                        "--rounds", "1", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["quick"] and res["machine"]["copy_gb_per_s"] > 0 and res["machine"]["matmul_gflop_per_s_bf16"] > 0
    assert res["config"] == "quick" and res["dtypes"] == ["f32", "bf16"] and list(res["runs"]) == ["f32", "bf16"]
    for dtype, run in res["runs"].items():  # each section shaped as a single-dtype result
        assert run["dtype"] == dtype and run["model"]["config"]["hidden_size"] == 256
        assert [p["T"] for p in run["prefill"]] == [64, 256] and [d["batch"] for d in run["decode"]] == [1, 8]
        for row in run["prefill"] + run["decode"]:
            v, h = row["v4c"], row["hf"]
            assert (v["engine"], h["engine"]) == ("v4c", "hf")
            assert row["speedup"] == pytest.approx(v["tokens_per_s"] / h["tokens_per_s"])
            assert v["peak_rss_mib"] > 0 and h["peak_rss_mib"] > 0
        for row in run["decode"]:
            assert row["v4c"]["page_faults_per_step"] >= 0 and "rss_growth_mib" in row["hf"]
        floor = run["weight_floor"]  # the best copy rate of the run: at its start and before each decode child
        samples = floor["copy_gb_per_s_samples"]
        assert run["rounds"] == 1
        assert len(samples) == 1 + 2 * (2 * 2 * 1) and floor["copy_gb_per_s"] == max(samples) > 0
        own = run["decode"][0]["v4c"]  # the kept step against the rate its own process measured
        assert floor["v4c_decode_b1_over_own_copy_floor"] == pytest.approx(
            own["seconds_per_step"] / (floor["active_weight_bytes_per_token"] / (own["copy_gb_per_s_after"] * 1e9)))
        assert own["copy_gb_per_s_after"] in samples
        assert floor["seconds_per_token"] == pytest.approx(floor["active_weight_bytes_per_token"]
                                                           / (floor["copy_gb_per_s"] * 1e9))
    # fp32 weights are twice bf16's
    f32, bf16 = (res["runs"][d]["weight_floor"]["active_weight_bytes_per_token"] for d in ("f32", "bf16"))
    assert 1.5 < f32 / bf16 <= 2
    assert "decode B=1" in r.stdout and "ratio" in r.stdout and "floor" in r.stdout


def test_config_presets_and_json_files(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_configs import PRESETS, load_config
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    from v4c.model.config import V4Config
    assert {"478m", "h512-e32", "h64x16-w64", "quick"} <= set(PRESETS)
    name, cfg = load_config("h512-e32")
    c = V4Config.from_dict(cfg)  # a valid config
    assert (name, c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.num_experts_per_tok) == \
        ("h512-e32", 512, 8, 32, 6)
    assert (c.num_attention_heads, c.head_dim, c.sliding_window, c.vocab_size) == (8, 128, 128, 4096)
    c = V4Config.from_dict(load_config("h64x16-w64")[1])
    assert (c.num_attention_heads, c.head_dim, c.sliding_window, c.hidden_size) == (16, 64, 64, 1024)
    f = tmp_path / "mine.json"
    f.write_text(json.dumps({"hidden_size": 768, "n_routed_experts": 24}))
    name, cfg = load_config(str(f))  # the fields it leaves out come from the 478m preset
    assert (name, cfg["hidden_size"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]) == ("mine", 768, 24, 6)
    with pytest.raises(SystemExit, match="neither a preset .* nor a JSON file"):
        load_config(str(tmp_path / "missing.json"))
    f.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="expected a JSON object of config fields, got list"):
        load_config(str(f))
