"""The quantised-weight kernels (templates/qgemm.py, and the indexer's own) wired into compile and run: an
official-format checkpoint (FP8 128x128 projections, the indexer's FP8 query projection and shared experts,
MXFP4 routed experts) compiled for the CPU target runs its quantised calls on the artifact's quantised
launchers under backend "triton" (Triton's interpreter here), its unquantised calls on the other kernels,
and gives the logits of backend "torch" (the PyTorch ops, which dequantise tile by tile). Quantised arguments
a launcher does not take run on the op's reference, and the manifest says so."""
import hashlib
import json
import shutil

import pytest
import torch

import v4c
from official_writer import write_official_checkpoint
from v4c.codegen.templates import qgemm
from v4c.errors import ArtifactError
from v4c.graph.text import parse_graph
from v4c.inspect import inspect_artifact
from v4c.model.build import build_graph
from v4c.model.config import V4Config
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import random_params
from v4c.backends import triton as K

pytest.importorskip("triton")

QUANTISED_OPS = {"linear_rms_norm": "fp8_linear_rms_norm", "q_proj": "fp8_q_proj", "kv_proj": "fp8_kv_proj",
                 "o_proj": "fp8_o_proj", "moe_ffn": "moe_ffn_fp4"}
IDS = torch.randint(0, 1024, (1, 9), generator=torch.Generator().manual_seed(0))


def _config():
    """Two layers: a sliding-window layer with a hash-routed MoE, a CSA layer (indexer) with a routed MoE."""
    return dict(tiny_config_dict(), num_hidden_layers=2, layer_types=["sliding_attention",
                                                                      "compressed_sparse_attention"],
                mlp_layer_types=["hash_moe", "moe"])


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    root = tmp_path_factory.mktemp("qtriton")
    cfg = _config()
    v4 = V4Config.from_dict(cfg)
    ck, _ = write_official_checkpoint(random_params(build_graph(v4, "f32"), v4, seed=5), cfg, root / "ck")
    return v4c.compile(ck, root / "a.v4c", target="cpu", tuning_cache=False)


def _manifest(art):
    return json.loads((art / "manifest.json").read_text())


def test_manifest_lists_the_qgemm_module_and_each_ops_quantised_variant(art):
    man = _manifest(art)
    mod = man["kernels"]["modules"]["qgemm"]
    src = (art / mod["file"]).read_bytes()
    assert mod["sha256"] == hashlib.sha256(src).hexdigest() == man["files"][mod["file"]]
    assert b"def moe_ffn_fp4(" in src and b"# ---- v4c prelude (inlined) ----" in src
    ops = man["kernels"]["ops"]
    for op, kernel in QUANTISED_OPS.items():
        assert ops[op]["module"] != "qgemm"  # unquantised calls keep the op's own kernel
        assert ops[op]["quantized"] == {"module": "qgemm", "kernel": kernel, "meta": qgemm.DEFAULT_META[kernel],
                                        "config_source": "default"}, op
    from v4c.codegen.templates import indexer
    assert ops["indexer"]["quantized"] == {"module": "indexer", "kernel": "fp8_indexer", "config_source": "default",
                                           "meta": indexer.DEFAULT_META["fp8_indexer"]}
    # the LM head is a bf16 `linear`: the op kind has no quantised calls, so no variant
    assert "quantized" not in ops["linear"]
    kinds = {k["op"]: k["quantized"] for k in inspect_artifact(art, context=64)["kernels"]}
    assert kinds["q_proj"] == "default" and kinds["indexer"] == "default" and kinds["linear"] is None


def test_triton_runs_quantised_calls_on_qgemm_and_matches_torch(art, monkeypatch):
    calls = {}
    real_site = K._site_impl

    def spy(modules, site):  # count the calls each kind of site launcher takes
        fn = real_site(modules, site)

        def call(*args, **attrs):
            calls[site.get("launcher")] = calls.get(site.get("launcher"), 0) + 1
            return fn(*args, **attrs)
        return call

    monkeypatch.setattr(K, "_site_impl", spy)
    tri = v4c.load(art, device="cpu", backend="triton")
    ref = v4c.load(art, device="cpu", backend="torch")
    st, sr = tri.new_session(), ref.new_session()
    got, want = [st.forward(IDS)], [sr.forward(IDS)]
    nxt = want[0][:, -1:].argmax(-1)
    got.append(st.forward(nxt))  # a decode step: one-row GEMMs
    want.append(sr.forward(nxt))
    graph = parse_graph((art / "graph.v4c").read_text())
    n_quant_nodes = sum(n.op in QUANTISED_OPS or n.op == "indexer" for n in graph.nodes)
    assert calls["QUANTIZED"] == 2 * n_quant_nodes  # every such node, both steps, ran a quantised launcher
    assert None not in calls  # nothing on the reference
    for g, w in zip(got, want):
        err = ((g - w).abs().max() / w.abs().max()).item()
        # measured 3.3e-7 (prefill) and 3.1e-7 (decode): FP8/FP4 products are exact in fp32, so only the
        # order of fp32 sums differs. A flipped e4m3 rounding of an activation (up to 1/16 relative) shows as
        # a far larger gap: this random model turns one into percents (at 40 tokens a last-bit difference in
        # the torch backend's sparse attention flips one: 11% against the reference, which triton matches
        # to 3e-7), so the prompt is kept short enough to stay clear of such near-ties.
        assert err < 1e-5, err


def test_a_tampered_qgemm_module_is_refused(art, tmp_path):
    a = shutil.copytree(art, tmp_path / "a")
    man = _manifest(a)
    rel = man["kernels"]["modules"]["qgemm"]["file"]
    with open(a / rel, "a") as f:
        f.write("\nimport os  # injected\n")
    with pytest.raises(ArtifactError, match=f"{rel}: content differs from the manifest"):
        v4c.load(a, device="cpu", backend="triton")
    # with the file list forged too (and the manifest resealed), the kernel loader's own check still refuses it
    from v4c.artifact.manifest import write_manifest
    man["files"][rel] = hashlib.sha256((a / rel).read_bytes()).hexdigest()
    write_manifest(a, man)
    with pytest.raises(ArtifactError, match="kernel source does not match its manifest hash; refusing"):
        v4c.load(a, device="cpu", backend="triton")


def test_quantised_arguments_the_kernel_does_not_take_run_on_the_reference(tmp_path):
    """FP8 shared experts with unquantised routed experts: moe_ffn's qgemm launcher takes MXFP4 experts only,
    so the whole op kind's quantised calls are listed (and run) as reference, with the reason."""
    cfg = _config()
    v4 = V4Config.from_dict(cfg)
    ck, _ = write_official_checkpoint(random_params(build_graph(v4, "f32"), v4, seed=5), cfg, tmp_path / "ck",
                                      quantize_experts=False)
    ops = _manifest(v4c.compile(ck, tmp_path / "a.v4c", target="cpu", tuning_cache=False))["kernels"]["ops"]
    q = ops["moe_ffn"]["quantized"]
    assert q["module"] is None and q["config_source"] == "reference"
    assert q["reason"].endswith("input 5 (%model.layers.0.mlp.experts.gate_up_proj) is unquantised, "
                                "the quantised kernel takes mxfp4")
    assert ops["q_proj"]["quantized"]["module"] == "qgemm"


def test_loading_kernels_writes_nothing_into_the_artifact(art, monkeypatch):
    """Even where Python writes bytecode caches, importing the artifact's kernel modules leaves no
    __pycache__ behind: the artifact still matches its manifest and loads again."""
    import sys
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    for _ in range(2):
        v4c.load(art, device="cpu", backend="triton")
    assert not list(art.rglob("__pycache__"))
