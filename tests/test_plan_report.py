"""v4c plan --sweep: the Pareto view (points, frontier, `v4c report`'s figure and page), and the README's
table of predictions against published measurements (it is the checked-in comparison, recomputed by the
slow test)."""
import base64
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from v4c.cli import main  # noqa: E402
from v4c.model.presets import tiny_config_dict  # noqa: E402
from v4c.plan import make_plan  # noqa: E402
from v4c.plan.devices import GPUS  # noqa: E402
from v4c.plan.published import ROWS, compare, markdown  # noqa: E402
from v4c.plan.sweep import at_user_speed, pareto  # noqa: E402
from v4c.report.pareto import pareto_figure  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = replace(GPUS["h100"], key="small", memory=20e6)  # the tiny model fits a few dozen sequences
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan-sweep")
    d = root / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config_dict()))
    (root / "none").mkdir()
    r = make_plan(d, gpu=SMALL, gpus=2, input_len=512, output_len=128, sweep=True, results_dir=root / "none")
    (root / "plan.json").write_text(json.dumps(r))
    return d, r, root


def test_the_sweep_covers_each_profile_up_to_what_fits(swept):
    _, r, _ = swept
    points = r["sweep"]
    assert [p["profile"] for p in points] == sorted((p["profile"] for p in points),
                                                    key=["low-latency", "balanced", "max-throughput"].index)
    for profile in ("low-latency", "balanced", "max-throughput"):
        mine = [p for p in points if p["profile"] == profile]
        assert len({(p["parallel"], p["replicas"], p["draft_tokens"]) for p in mine}) == 1  # one recipe per profile
        concs, each = [p["concurrency"] for p in mine], mine[0]["replicas"]
        # from one request per instance, powers of two (that the instances share equally) up to what fits
        assert concs[0] == each and concs == sorted(concs) and all(c & (c - 1) == 0 for c in concs[:-1])
        assert all(c % each == 0 for c in concs)
    # more requests in flight: no faster per user, and (up to saturation) more per GPU
    ll = [p for p in points if p["profile"] == "low-latency"]
    assert all(a["tokens_per_s_per_user"] >= b["tokens_per_s_per_user"] * 0.999 for a, b in zip(ll, ll[1:]))
    assert ll[1]["tokens_per_s_per_gpu"] > ll[0]["tokens_per_s_per_gpu"]


def test_pareto_marks_the_points_nothing_beats():
    pts = pareto([{"tokens_per_s_per_user": u, "tokens_per_s_per_gpu": g}
                  for u, g in ((100, 10), (50, 40), (60, 30), (40, 35), (10, 50))])
    assert [p["pareto"] for p in pts] == [True, True, True, False, True]
    assert at_user_speed(pts, 55) == pytest.approx(35)  # between (50, 40) and (60, 30)
    assert at_user_speed(pts, 5) == 50  # slower than the whole frontier: its best
    assert at_user_speed(pts, 200) is None  # nothing that fast


def test_the_figure_plots_the_sweep(swept):
    _, r, _ = swept
    ax = pareto_figure(r).axes[0]
    lines = {ln.get_label(): ln for ln in ax.lines}
    for profile in ("low-latency", "balanced", "max-throughput"):
        mine = sorted((p for p in r["sweep"] if p["profile"] == profile), key=lambda p: p["concurrency"])
        assert list(lines[profile].get_xdata()) == [p["tokens_per_s_per_user"] for p in mine]
        assert list(lines[profile].get_ydata()) == [p["tokens_per_s_per_gpu"] for p in mine]
    front = sorted(p["tokens_per_s_per_user"] for p in r["sweep"] if p["pareto"])
    assert list(lines["Pareto frontier"].get_xdata()) == front


def test_report_of_a_plan_file_and_with_a_model(swept, tmp_path, monkeypatch):
    monkeypatch.setenv("V4C_NATIVE", "0")  # the report lists implementations: no C helpers to build for that
    d, r, root = swept
    out = tmp_path / "plan-only"
    assert main(["report", str(root / "plan.json"), "-o", str(out)]) == 0
    page = (out / "report.html").read_text()
    png = (out / "pareto.png").read_bytes()
    assert png.startswith(PNG) and f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert page.count("<tr>") == len(r["sweep"]) + 1 and json.loads((out / "plan.json").read_text()) == r
    both = tmp_path / "both"
    assert main(["report", str(d), "-o", str(both), "--plan", str(root / "plan.json")]) == 0
    page = (both / "report.html").read_text()
    assert "Decode FLOPs per token" in page and "tokens/s per user against tokens/s per GPU" in page
    assert json.loads((both / "series.json").read_text())["plan"]["sweep"] == r["sweep"]


def test_report_refuses_a_plan_without_a_sweep_and_a_bad_spec(swept, tmp_path, capsys):
    d, r, root = swept
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({k: v for k, v in r.items() if k != "sweep"}))
    assert main(["report", str(flat), "-o", str(tmp_path / "x")]) == 2
    assert "the plan has no sweep: make it with `v4c plan ... --sweep --json`" in capsys.readouterr().err
    assert main(["report", str(d), "-o", str(tmp_path / "y"), "--plan", "b200"]) == 2
    assert "--plan 'b200': a `v4c plan --sweep --json` file, or GPU:N[:IN/OUT]" in capsys.readouterr().err


# ---- the published comparison -----------------------------------------------------------------

def _results() -> dict:
    files = sorted((ROOT / "benchmarks" / "results").glob("plan_published_*.json"))
    assert files, "python -m v4c.plan.published benchmarks/results/plan_published_DATE.json writes it"
    return json.loads(files[-1].read_text())


def test_readme_table_is_the_recorded_comparison():
    readme = (ROOT / "README.md").read_text()
    table = markdown(_results())
    assert table in readme
    # every published row is there, with its ratio
    assert len(re.findall(r"^\| (SGLang|InferenceX)", table, re.M)) == sum(len(r.measured) for r in ROWS)


@pytest.mark.slow
def test_the_recorded_comparison_is_what_the_plan_predicts_now(tmp_path):
    now, recorded = compare(root=tmp_path), _results()
    for a, b in zip(now, recorded):
        assert (a["label"], a["recipe"], a["plan_choice"]) == (b["label"], b["recipe"], b["plan_choice"])
        for k, v in a["predicted"].items():
            assert v == pytest.approx(b["predicted"][k], rel=1e-6), (a["label"], k)
