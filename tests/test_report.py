"""v4c report: the files it writes, and that every plotted number is the one v4c inspect gives."""
import base64
import json
import re
import sys

import pytest

pytest.importorskip("matplotlib")

import v4c  # noqa: E402
from v4c.autotune.devices import device_for_target  # noqa: E402
from v4c.cli import main  # noqa: E402
from v4c.graph.analysis import decode_step_kernels  # noqa: E402
from v4c.graph.terms import TERMS, decode_step_terms, flops_by_term  # noqa: E402
from v4c.graph.text import parse_graph  # noqa: E402
from v4c.inspect import inspect_artifact  # noqa: E402
from v4c.model.presets import FLASH_HUB_CONFIG, tiny_config_dict  # noqa: E402
from v4c.model.random_weights import write_random_checkpoint  # noqa: E402
from v4c.report import write_report  # noqa: E402
from v4c.report.plots import flops_figure, kv_figure  # noqa: E402
from v4c.report.series import CONTEXTS, build_series  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    """The V4-Flash preset: its config directory and a weight-free artifact compiled as the report does."""
    d = tmp_path_factory.mktemp("flash")
    (d / "config.json").write_text(json.dumps(FLASH_HUB_CONFIG))
    return d, v4c.compile(d, d / "art", target="sm90", dtype="bf16", weights="none", tuning_cache=False, aot=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A runnable tiny artifact (f32, fp32 caches, compiled for this machine)."""
    d = tmp_path_factory.mktemp("tiny")
    return v4c.compile(write_random_checkpoint(tiny_config_dict(), d / "ck"), d / "art")


@pytest.fixture(scope="module")
def flash_report(flash, tmp_path_factory):
    out = tmp_path_factory.mktemp("flash-report")
    assert main(["report", str(flash[0]), "-o", str(out), "--target", "h200-sxm"]) == 0
    return out


def test_files_are_written_and_the_page_is_self_contained(flash_report):
    series = json.loads((flash_report / "series.json").read_text())
    page = (flash_report / "report.html").read_text()
    for name in ("kv_bytes.png", "decode_flops.png"):
        png = (flash_report / name).read_bytes()
        assert png.startswith(PNG)
        assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    # nothing is fetched from elsewhere: no external images, scripts or stylesheets
    assert not re.search(r'(src|href)="(?!data:)', page) and "<link" not in page
    kt = series["kernels"]
    assert kt["target"] == "h200-sxm" and kt["device"] in page and len(kt["rows"]) > 400
    assert "<td>moe_ffn</td>" in page and "<td>indexer</td>" in page
    assert all(f"<td>{r['name']}</td>" in page for r in kt["rows"])  # the per-kernel table has every kernel


def test_kv_series_equal_inspect(flash, flash_report):
    series = json.loads((flash_report / "series.json").read_text())
    assert series["contexts"] == [4096 * 2 ** i for i in range(9)] and series["contexts"][-1] == 1 << 20
    kv = series["kv_bytes"]
    for c, model, base in zip(series["contexts"], kv["model"], kv["baseline"]):
        r = inspect_artifact(flash[1], context=c)["kv_cache"]
        assert model == r["total_bytes"]
        # V3.2's own 61 layers give inspect's 48,068 B/token; the baseline has the model's 43 layers
        assert base == c * r["v32_bytes_per_token"] * 43 // 61
    assert kv["model_bytes_per_token"] == pytest.approx(21 * (584 + 68) / 4 + 20 * 584 / 128)  # spec D.1
    ax = kv_figure(series).axes[0]
    assert [list(line.get_xdata()) for line in ax.lines] == [series["contexts"]] * 2
    assert list(ax.lines[0].get_ydata()) == kv["model"] and list(ax.lines[1].get_ydata()) == kv["baseline"]


def test_flops_by_term_add_up_to_inspect_and_match_the_spec(flash, flash_report):
    series = json.loads((flash_report / "series.json").read_text())
    terms = series["decode_flops"]["terms"]
    assert list(terms) == list(TERMS)
    for i, c in enumerate(series["contexts"]):
        assert sum(terms[t][i] for t in TERMS) == inspect_artifact(flash[1], context=c)["flops_per_token"]
    # spec D.2 at 1M (GFLOP): weights 26.5, window 0.7, sparse core 1.4, indexer scan 90.2, HCA dense 21.5;
    # the scan here also counts the ReLU/weight/sum per score (3 of 259 FLOPs per key and head)
    at_1m = {t: terms[t][-1] / 1e9 for t in TERMS}
    for t, want in (("weights", 26.54), ("window", 0.72), ("sparse_core", 1.41), ("indexer_scan", 90.2),
                    ("compressed_dense", 21.47)):
        assert at_1m[t] == pytest.approx(want, rel=0.015), t
    assert len(set(terms["weights"])) == 1 and len(set(terms["window"])) == 1  # context-independent
    bars = flops_figure(series).axes[0].containers
    assert [list(b.datavalues) for b in bars] == [terms[t] for t in TERMS]


def test_terms_follow_the_attention_formulas_on_the_tiny_model(tiny, tmp_path):
    """Spec D.2 per layer: window 4*H*W*D, CSA sparse core 4*H*k*D and scan (2*HI*DI + 3*HI)*L/4, HCA 4*H*(L/m)*D."""
    cfg = tiny_config_dict()
    h, d, w, k = cfg["num_attention_heads"], cfg["head_dim"], cfg["sliding_window"], cfg["index_topk"]
    hi, di = cfg["index_n_heads"], cfg["index_head_dim"]
    n_csa = cfg["layer_types"].count("compressed_sparse_attention")
    n_hca = cfg["layer_types"].count("heavily_compressed_attention")
    m_csa, m_hca = 4, 16
    out = tmp_path / "r"
    files = write_report(tiny, out, context=1024, batch=2)
    series = json.loads(files["series.json"].read_text())
    terms, weights = series["decode_flops"]["terms"], None
    for i, c in enumerate(series["contexts"]):
        assert terms["window"][i] == len(cfg["layer_types"]) * 4 * h * min(c, w) * d
        assert terms["sparse_core"][i] == n_csa * 4 * h * min(k, c // m_csa) * d
        assert terms["indexer_scan"][i] == n_csa * (2 * hi * di + 3 * hi) * (c // m_csa)
        assert terms["compressed_dense"][i] == n_hca * 4 * h * (c // m_hca) * d
        r = inspect_artifact(tiny, context=c)
        assert sum(terms[t][i] for t in TERMS) == r["flops_per_token"]
        assert series["kv_bytes"]["model"][i] == r["kv_cache"]["total_bytes"]
        weights = weights or terms["weights"][i]
        assert terms["weights"][i] == weights
    # an fp32 cache is compared with an fp32 V3.2-style one: (576 + 128) dims x 4 B per layer
    assert series["kv_bytes"]["baseline_bytes_per_token"] == len(cfg["layer_types"]) * (576 + 128) * 4
    assert series["kernels"]["target"] == "cpu" and series["kernels"]["batch"] == 2


def test_each_kernel_splits_exactly_and_fusion_does_not_move_flops_between_terms(tiny, tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(tiny_config_dict()))
    plain = v4c.compile(ck, tmp_path / "plain", fuse=False, weights="none")
    for art in (tiny, plain):
        g = parse_graph((art / "graph.v4c").read_text())
        for batch in (1, 3):
            kernels, split = decode_step_kernels(g, 4096, batch), decode_step_terms(g, 4096, batch)
            assert [(k.name, k.op) for k in kernels] == [(s.name, s.op) for s in split]
            assert all(sum(s.terms.values()) == k.flops for k, s in zip(kernels, split))
    fused_g = parse_graph((tiny / "graph.v4c").read_text())
    plain_g = parse_graph((plain / "graph.v4c").read_text())
    assert flops_by_term(fused_g, 8192) == flops_by_term(plain_g, 8192)


def test_kernel_table_is_inspect_with_roofline_times(flash):
    art = flash[1]
    r = inspect_artifact(art, context=65536, batch=4)
    tables = {t: build_series(art, target=t, batch=4, context=65536, contexts=CONTEXTS[:1])["kernels"]
              for t in ("sm90", "h200-sxm")}
    for t, kt in tables.items():
        dev = device_for_target(t)
        assert [(x["name"], x["flops"], x["bytes"], x["launches"]) for x in kt["rows"]] == \
            [(k["name"], k["flops"], k["bytes"], k["launches"]) for k in r["kernels"]]
        for row in kt["rows"]:
            compute, memory = row["flops"] / (dev.tflops["bf16"] * 1e12), row["bytes"] / (dev.hbm_gbs * 1e9)
            assert row["roofline_s"] == pytest.approx(max(compute, memory))
            assert row["bound"] == ("compute" if compute >= memory else "memory")
    # same die, faster memory: memory-bound kernels speed up by the bandwidth ratio, nothing else changes
    h100, h200 = tables["sm90"]["rows"], tables["h200-sxm"]["rows"]
    mem = [(a, b) for a, b in zip(h100, h200) if a["bound"] == "memory"]
    assert mem and all(b["roofline_s"] == pytest.approx(a["roofline_s"] * 3350 / 4800) for a, b in mem)


def test_bad_input_is_a_clear_error(tiny, tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope"), "-o", str(tmp_path / "o")]) == 2
    assert "no such artifact or model directory" in capsys.readouterr().err
    assert main(["report", str(tiny), "-o", str(tmp_path / "o"), "--target", "sm75"]) == 2
    assert "unknown target 'sm75'" in capsys.readouterr().err
    assert main(["report", str(tiny), "-o", str(tmp_path / "o"), "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_without_matplotlib_the_error_says_what_to_install(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    assert main(["report", str(tiny), "-o", str(tmp_path / "o")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
