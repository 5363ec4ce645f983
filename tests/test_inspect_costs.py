"""inspect --json --context: kernels, launches, FLOPs and the KV-cache footprint of real and tiny configs."""
import json

import pytest
import torch

import v4c
from v4c.cli import main
from v4c.inspect import inspect_artifact
from v4c.model.presets import FLASH_HUB_CONFIG, PRO_HUB_CONFIG, tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint

M = 1 << 20


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    out = {}
    for name, cfg in (("flash", FLASH_HUB_CONFIG), ("pro", PRO_HUB_CONFIG)):
        d = tmp_path_factory.mktemp(name)
        (d / "config.json").write_text(json.dumps(cfg))
        out[name] = v4c.compile(d, d / "art", target="sm90", dtype="bf16", aot=False)
    return out


@pytest.mark.parametrize("name,limit,ratio,gflops", [("flash", 3515, 0.073, 140.3), ("pro", 5032, 0.105, 303.2)])
def test_real_models_at_one_million_tokens(real, name, limit, ratio, gflops):
    r = inspect_artifact(real[name], context=M)
    kv = r["kv_cache"]
    assert r["kv_cache_format"] == "fp8" and r["indexer_cache_format"] == "fp4"
    assert kv["bytes_per_token"] <= limit and abs(kv["ratio_to_v32"] - ratio) < 0.001
    assert kv["v32_bytes_per_token"] == 48068
    # total = growth * context + the fixed rings / compressor slots (spec D.1: ~3.2 MB + ~11.6 MiB for Flash)
    assert abs(kv["total_bytes"] - (kv["bytes_per_token"] * M + kv["fixed_bytes"])) < 4096
    # decode FLOPs per token (spec D.2, 2 FLOPs per MAC) within 2% of the spec's accounting
    assert abs(r["flops_per_token"] / 1e9 - gflops) / gflops < 0.02
    assert r["flops_per_token"] == sum(k["flops"] for k in r["kernels"])
    assert r["launches_per_decode_step"] == sum(k["launches"] for k in r["kernels"])
    assert {"name", "op", "flops", "bytes"} <= set(r["kernels"][0])
    assert r["passes"] == ["fuse-moe", "fuse-attention", "fuse-projections", "fuse-mhc", "quantize-kv-cache"]


def test_indexer_scan_dominates_long_context(real):
    r = inspect_artifact(real["flash"], context=M)
    idx = sum(k["flops"] for k in r["kernels"] if k["op"] == "indexer")
    assert idx / r["flops_per_token"] > 0.6  # spec D.2: 64% at 1M
    short = inspect_artifact(real["flash"], context=4096)
    assert short["flops_per_token"] < r["flops_per_token"] / 3


def test_cache_formats_change_the_footprint(tmp_path):
    d = tmp_path / "flash"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(FLASH_HUB_CONFIG))
    sizes = {}
    for kv, ix in (("bf16", "bf16"), ("fp8", "fp8"), ("fp8", "fp4")):
        art = v4c.compile(d, tmp_path / f"{kv}-{ix}", dtype="bf16", kv_cache=kv, indexer_cache=ix)
        sizes[(kv, ix)] = inspect_artifact(art, context=M)["kv_cache"]["bytes_per_token"]
    assert sizes[("bf16", "bf16")] == pytest.approx(21 * (1024 + 256) / 4 + 20 * 1024 / 128)  # spec D.1: 6880
    assert sizes[("fp8", "fp8")] == pytest.approx(21 * (584 + 132) / 4 + 20 * 584 / 128)  # 3850
    assert sizes[("fp8", "fp4")] == pytest.approx(21 * (584 + 68) / 4 + 20 * 584 / 128)  # 3514.25


def test_fused_decode_needs_a_third_of_the_launches(tmp_path, capsys):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck")
    fused = inspect_artifact(v4c.compile(ck, tmp_path / "fused"), context=256)
    plain = inspect_artifact(v4c.compile(ck, tmp_path / "plain", fuse=False), context=256)
    assert plain["passes"] == [] and fused["launches_per_decode_step"] * 3 <= plain["launches_per_decode_step"]
    # fusion moves work, it does not change it: same FLOPs, fewer bytes (intermediates stay on chip)
    assert fused["flops_per_token"] == pytest.approx(plain["flops_per_token"], rel=1e-6)
    assert fused["bytes_per_decode_step"] < plain["bytes_per_decode_step"]
    assert main(["inspect", str(tmp_path / "fused"), "--json", "--context", "256"]) == 0
    assert json.loads(capsys.readouterr().out)["launches_per_decode_step"] == fused["launches_per_decode_step"]
    assert main(["inspect", str(tmp_path / "fused"), "--context", "256"]) == 0
    assert "launches" in capsys.readouterr().out


def test_compile_prints_the_pipeline_and_ir(tmp_path, capsys):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck")
    assert main(["compile", str(ck), "-o", str(tmp_path / "a"), "--print-after", "fuse-moe"]) == 0
    err = capsys.readouterr().err
    assert "// IR after fuse-moe" in err and "moe_router(" in err and "fuse-mhc" in err
    assert main(["compile", str(ck), "-o", str(tmp_path / "b"), "--print-after", "nonsense"]) == 2
    assert "not in the pipeline" in capsys.readouterr().err


# A random tiny model has no quantisation-aware training and 16-value scale blocks, so FP8 rows
# move its logits by ~10% on average (measured: mean 0.09-0.12, top-1 83-84%); bf16 by ~0.3%.
@pytest.mark.parametrize("kv,ix,mean_err,top1", [("fp8", "fp4", 0.2, 0.75), ("fp8", "fp8", 0.2, 0.75),
                                                 ("bf16", "bf16", 0.01, 0.95)])
def test_quantised_caches_run_and_stay_close(tmp_path, kv, ix, mean_err, top1):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck", seed=1)
    ref = v4c.load(v4c.compile(ck, tmp_path / "ref"))
    q = v4c.load(v4c.compile(ck, tmp_path / "q", kv_cache=kv, indexer_cache=ix))
    ids = torch.randint(0, 1024, (2, 48), generator=torch.Generator().manual_seed(0))
    a, b = ref.new_session(2).forward(ids), q.new_session(2).forward(ids)
    assert 0 < ((a - b).abs().mean() / a.abs().mean()) < mean_err
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > top1
    # the stored format does not depend on how the prompt was chunked; chunks change the fp32
    # summation order, which can flip the rounding of a stored bf16/fp8 value by one step
    s = q.new_session(2)
    chunked = torch.cat([s.forward(ids[:, :13]), s.forward(ids[:, 13:14]), s.forward(ids[:, 14:])], 1)
    assert float((chunked - b).abs().max() / b.abs().max()) < 1e-3


def test_fused_bytes_count_the_weights_at_every_token_count(tiny_artifact):
    """A fused op moves at least its weights, however many tokens it runs: its parts' intermediates
    (including those only reshaped between parts) come off the sum once, not twice (which left q_proj and
    o_proj moving 0 bytes at prefill sizes)."""
    from v4c.artifact import open_artifact
    from v4c.graph.ops.fused import RECIPES
    from v4c.graph.registry import Concrete, get_op
    from v4c.graph.text import parse_graph
    g = parse_graph(open_artifact(tiny_artifact, verify=False).graph_text())
    types, params = g.value_types(), dict(g.params)
    checked = set()
    for t in (1, 4096):
        bind = {"B": 1, "T": t, "L": 8192}
        conc = lambda v: Concrete(types[v].concrete(bind), types[v].dtype)  # noqa: E731
        for n in g.nodes:
            # (the compressor reads only the position-bias rows its tokens use: its floor is not all weights)
            if n.op not in RECIPES or n.op == "compressor":
                continue
            c = get_op(n.op).cost([conc(v) for v in n.inputs], [conc(v) for v in n.outputs], n.attr, 8192)
            floor = sum(conc(v).nbytes for v in n.inputs if v in params)
            assert c.bytes >= floor, f"{n.op} at T={t}: {c.bytes} bytes, its weights alone are {floor}"
            checked.add(n.op)
    assert {"q_proj", "o_proj", "hc_post_pre"} <= checked
