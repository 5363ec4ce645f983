"""ONNX interchange: export (fused and unfused) checked by onnxruntime against v4c's own logits,
ONNX's checker and shape inference against the IR, the round trip back to the IR, and refusals."""
import json

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import v4c  # noqa: E402
from v4c.cli import main  # noqa: E402
from v4c.errors import V4CError  # noqa: E402
from v4c.graph import print_graph  # noqa: E402
from v4c.model.presets import FLASH_HUB_CONFIG, PRO_HUB_CONFIG, tiny_config_dict  # noqa: E402
from v4c.onnx import NotV4COnnx, artifact_graph, export_artifact, import_onnx  # noqa: E402
from v4c.onnx.emit import DOMAIN, IR_DTYPE  # noqa: E402

STANDARD = {"", "ai.onnx"}


def check_shapes(model, graph):
    """ONNX shape inference gives every IR node output its IR type: dtype, rank, static dims, and the
    symbols B and T (dims in L, the decode context, are sized from T in the exported forward)."""
    onnx.checker.check_model(model, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    vi = {v.name: v.type.tensor_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    checked = 0
    for node in graph.nodes:
        for name, t in zip(node.outputs, node.types):
            tt = vi[name]
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tt.shape.dim]
            assert IR_DTYPE[tt.elem_type] == t.dtype and len(dims) == t.rank, (name, str(t), dims)
            for want, got in zip(t.shape, dims):
                if not (isinstance(want, str) and want.startswith("L")):
                    assert want == got, (name, str(t), dims)
            checked += 1
    return checked


@pytest.fixture(scope="module")
def runtime_model(tiny_artifact):
    return v4c.load(tiny_artifact, device="cpu")


@pytest.mark.parametrize("unfused", [False, True], ids=["fused", "unfused"])
def test_onnxruntime_matches_v4c(tiny_artifact, runtime_model, tmp_path, unfused):
    path = tmp_path / "tiny.onnx"
    assert export_artifact(tiny_artifact, path, unfused=unfused) == [path]
    model = onnx.load(path)
    _, graph = artifact_graph(tiny_artifact, unfused)
    assert check_shapes(model, graph) == sum(len(n.outputs) for n in graph.nodes)
    used = {(n.domain, n.op_type) for n in model.graph.node}
    if unfused:  # standard ops only, e.g. routing by TopK, the ring append by ScatterElements
        assert {d for d, _ in used} <= STANDARD and model.functions == []
        assert {"MatMul", "Softmax", "TopK", "Gather", "ScatterElements"} <= {op for _, op in used}
    else:  # each fused op is an ai.v4c function whose body is standard ONNX
        fused = {op for d, op in used if d == DOMAIN}
        assert fused == {n.op for n in graph.nodes if n.op in fused} and {"sparse_attention", "moe_ffn"} <= fused
        assert all(n.domain in STANDARD for f in model.functions for n in f.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # batch and length are symbolic: one file, several shapes (T < the compression ratios included)
    for b, t in ((2, 37), (1, 3)):
        ids = torch.randint(0, 1024, (b, t), generator=torch.Generator().manual_seed(t))
        want = runtime_model.new_session(b, max_context=64).forward(ids)
        got = torch.from_numpy(session.run(None, {"ids": ids.numpy()})[0])
        assert got.shape == want.shape
        assert float((got - want).abs().max() / want.abs().max()) <= 1e-4


@pytest.mark.parametrize("unfused", [False, True], ids=["fused", "unfused"])
def test_round_trip_gives_the_same_ir(tiny_artifact, tmp_path, unfused, capsys):
    args = ["export-onnx", str(tiny_artifact), "-o", str(tmp_path / "m.onnx")] + (["--unfused"] if unfused else [])
    assert main(args) == 0
    assert main(["import-onnx", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "back.v4c")]) == 0
    _, graph = artifact_graph(tiny_artifact, unfused)
    assert (tmp_path / "back.v4c").read_text() == print_graph(graph)
    if not unfused:
        assert (tmp_path / "back.v4c").read_text() == (tiny_artifact / "graph.v4c").read_text()


def test_weights_go_to_external_data_past_the_limit(tiny_artifact, runtime_model, tmp_path):
    path = tmp_path / "ext.onnx"
    files = export_artifact(tiny_artifact, path, external_limit=1 << 20)  # the tiny model has ~20 MB
    assert files == [path, tmp_path / "ext.onnx.data"] and path.stat().st_size < 1 << 20
    onnx.checker.check_model(str(path), full_check=True)
    ids = torch.randint(0, 1024, (1, 9), generator=torch.Generator().manual_seed(2))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids.numpy()})[0]
    want = runtime_model.new_session(1, max_context=16).forward(ids)
    assert float((torch.from_numpy(got) - want).abs().max() / want.abs().max()) <= 1e-4
    assert print_graph(import_onnx(path)) == (tiny_artifact / "graph.v4c").read_text()


def _weight_free(tmp_path, name, config, **kw):
    (tmp_path / name).mkdir()
    (tmp_path / name / "config.json").write_text(json.dumps(config))
    return v4c.compile(tmp_path / name, tmp_path / f"{name}.v4c", target="sm90", dtype="bf16", tuning_cache=False, aot=False,
                       **kw)


@pytest.mark.parametrize("name,config,unfused", [
    ("flash", FLASH_HUB_CONFIG, False),
    pytest.param("flash", FLASH_HUB_CONFIG, True, marks=pytest.mark.slow),  # 56k nodes
    ("pro", PRO_HUB_CONFIG, False),
], ids=["flash", "flash-unfused", "pro"])
def test_v4_graphs_pass_checker_and_shape_inference(tmp_path, name, config, unfused):
    # the bf16 release layout (no FP8/MXFP4 weights) with bf16 caches: what the exporter lowers today
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    art = _weight_free(tmp_path, name, plain, kv_cache="bf16", indexer_cache="bf16")
    export_artifact(art, tmp_path / "m.onnx", unfused=unfused)
    model = onnx.load(tmp_path / "m.onnx")
    _, graph = artifact_graph(art, unfused)
    assert check_shapes(model, graph) > 100
    # weight-free: the params are graph inputs, typed as in the IR
    inputs = {i.name: i for i in model.graph.input}
    assert not model.graph.initializer and len(inputs) == 1 + len(graph.params)
    emb = inputs["model.embed_tokens.weight"].type.tensor_type
    assert IR_DTYPE[emb.elem_type] == "bf16" and [d.dim_value for d in emb.shape.dim] == [129280, config["hidden_size"]]
    assert print_graph(import_onnx(tmp_path / "m.onnx")) == print_graph(graph)


def test_quantised_weights_and_caches_are_refused_by_name(tmp_path):
    art = _weight_free(tmp_path, "q", tiny_config_dict(), kv_cache="fp8")
    with pytest.raises(V4CError, match="cache format 'fp8_ds'.*--kv-cache fp32"):
        export_artifact(art, tmp_path / "q.onnx")
    fp8 = tiny_config_dict(quantization_config=FLASH_HUB_CONFIG["quantization_config"])  # the release's FP8 blocks
    art = _weight_free(tmp_path, "fp8", fp8, kv_cache="bf16", indexer_cache="bf16")
    with pytest.raises(V4CError, match=r"quantised weight.*%model\.layers\.0\.self_attn\.q_a_proj\.weight : f8e4m3"):
        export_artifact(art, tmp_path / "fp8.onnx")


def test_onnx_files_v4c_did_not_write_are_refused(tmp_path, capsys):
    from onnx import TensorProto, helper
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "other",
                          [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])])
    onnx.save_model(helper.make_model(g, producer_name="pytorch"), tmp_path / "other.onnx")
    with pytest.raises(NotV4COnnx, match="not an ONNX file written by v4c export-onnx.*'pytorch'"):
        import_onnx(tmp_path / "other.onnx")
    (tmp_path / "junk.onnx").write_bytes(np.arange(64, dtype=np.uint8).tobytes())
    assert main(["import-onnx", str(tmp_path / "junk.onnx"), "-o", str(tmp_path / "g.v4c")]) == 2
    assert "not a readable ONNX file" in capsys.readouterr().err
    assert not (tmp_path / "g.v4c").exists()
