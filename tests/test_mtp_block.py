"""The MTP block (issue 21): loading in both namings (quantised as the release stores it), compiled as a graph
of its own, what `v4c inspect` says of it, and its logits against an independent reference."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import v4c
from hf_reference import VARIANTS, make_hf_model, save_checkpoint
from mtp_reference import make_mtp_reference, mtp_tensors
from official_names import LEAF, MTP_TOP, official_name
from official_writer import decode_fp8, decode_mxfp4, write_official_checkpoint
from v4c.artifact import open_artifact
from v4c.errors import WeightMismatchError
from v4c.inspect import format_report, inspect_artifact
from v4c.io.naming import graph_name, mtp_graph_name
from v4c.model.config import V4Config
from v4c.model.mtp import build_mtp_graph
from v4c.model.presets import FLASH_HUB_CONFIG, tiny_config_dict
from v4c.model.random_weights import random_params, write_random_checkpoint
from v4c.runtime.mtp import MTPState

TOL = 1e-5  # relative: max |diff| / max |reference|


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_release_names_of_the_block_map_onto_the_mtp_graph():
    graph_leaves = [n[len("mtp.0."):] for n, _ in build_mtp_graph(V4Config.from_dict(tiny_config_dict())).params
                    if n.startswith("mtp.0.") and ".experts." not in n]
    assert set(graph_leaves) <= set(LEAF) | set(MTP_TOP)
    for leaf in graph_leaves:
        want = f"mtp.0.{leaf}"
        assert mtp_graph_name(official_name(want)) == want  # the release's naming
        assert mtp_graph_name(want) == want and mtp_graph_name("model." + want) == want  # the graph's own
        assert graph_name(official_name(want)) is None  # never a main-graph param
    assert mtp_graph_name("mtp.0.ffn.experts.7.w2.scale") == "mtp.0.mlp.experts.7.w2.weight_scale_inv"
    assert mtp_graph_name("mtp.0.e_proj.scale") == "mtp.0.e_proj.weight_scale_inv"
    assert mtp_graph_name("mtp.1.e_proj.weight") is None  # later blocks are not V4's
    assert mtp_graph_name("layers.0.attn.wq_a.weight") is None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(HF model, MTP reference, loaded v4c model) from one HF-named checkpoint with an MTP block."""
    cfg = VARIANTS["tiny"]
    hf = make_hf_model(cfg, seed=1)
    ref = make_mtp_reference(cfg, seed=2)
    root = tmp_path_factory.mktemp("mtp_hf")
    ck = save_checkpoint(hf, cfg, root / "ckpt")
    tensors = load_file(ck / "model.safetensors")
    tensors.update({"model." + n: t for n, t in mtp_tensors(ref).items()})  # HF's prefix on the block too
    save_file(tensors, ck / "model.safetensors")
    art = v4c.compile(ck, root / "art", target="cpu")
    return hf, ref, v4c.load(art, device="cpu")


def test_main_graph_streams_equal_transformers_before_its_head(pair):
    hf, _, model = pair
    seen = {}
    hf.model.layers[-1].register_forward_hook(lambda m, i, o: seen.update(x=o))
    ids = torch.randint(0, 1024, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    s = model.new_session(2)
    got = s.forward(ids)
    assert rel_err(got, want) <= 1e-4
    assert s.stream.shape == (2, 30, 4, 256) and rel_err(s.stream, seen["x"]) <= TOL


@pytest.mark.parametrize("chunks", [[45], [20, 1, 1, 3, 20]])
def test_mtp_logits_equal_the_reference(pair, chunks):
    """One call and a chunked run crossing the block's window (8) give the reference's logits and streams."""
    hf, ref, model = pair
    ids = torch.randint(0, 1024, (2, sum(chunks) + 1), generator=torch.Generator().manual_seed(3))
    s = model.new_session(2)
    s.forward(ids[:, :-1])
    hidden, nxt = s.stream, ids[:, 1:]
    state = MTPState(model.mtp, 2, 64)
    got, streams, off = [], [], 0
    for n in chunks:
        lg, st = state.forward(nxt[:, off:off + n], hidden[:, off:off + n])
        got.append(lg)
        streams.append(st)
        off += n
    with torch.no_grad():
        want, want_streams = ref(hidden, nxt, hf.model.embed_tokens.weight, hf.lm_head.weight)
    assert rel_err(torch.cat(got, 1), want) <= TOL
    assert rel_err(torch.cat(streams, 1), want_streams) <= TOL
    assert state.lengths.tolist() == [sum(chunks)] * 2


def test_artifact_holds_the_block_as_a_graph_of_its_own(pair):
    _, _, model = pair
    man = open_artifact(model.path)
    assert man.mtp_note == "mtp: compiled" and man.data["mtp"]["graph"] == "mtp.v4c" and "mtp.v4c" in man.files
    assert model.graph.outputs == ("logits", "stream")
    assert model.mtp.graph.outputs == ("mtp.logits", "mtp.stream")
    # the same passes ran: no unfused block op is left, and the head took the last post-mix
    ops = set(model.mtp.graph.ops())
    assert {"hc_pre", "hc_post_pre", "hc_head", "sparse_attention", "moe_ffn", "q_proj", "kv_proj"} <= ops
    assert not ops & {"attention", "moe_experts", "sinkhorn", "hc_logits"}
    # every MTP node with a kernel has its call site in the artifact's kernel table
    from v4c.graph.sites import call_sites
    sites = man.kernels()["sites"]
    for sid, nodes in call_sites(model.mtp.graph, set(man.kernels()["ops"])).items():
        assert sid in sites, nodes[0].op
    # the embedding and the LM head are the main model's tensors, not copies
    assert model.mtp.executor.params["lm_head.weight"] is model.executor.params["lm_head.weight"]


def test_inspect_shows_the_block_costs_and_window(pair):
    _, _, model = pair
    r = inspect_artifact(model.path, context=4096)
    m = r["mtp"]
    assert m["compiled"] and [s["name"] for s in m["states"]] == ["mtp.win", "mtp.win_pos"]
    assert {s["kind"] for s in m["states"]} == {"window"}
    assert m["kv_cache"]["total_bytes"] == 8 * 64 * 4 + 8 * 8  # one window ring of 8 rows of 64 f32 + positions
    assert m["launches_per_draft_step"] > 0 and m["flops_per_draft_token"] > 0 and m["bytes_per_draft_step"] > 0
    own = sum(t.numel() for n, t in mtp_tensors(make_mtp_reference(VARIANTS["tiny"])).items())
    assert m["params"] == own
    text = format_report(r)
    assert "mtp state  mtp.win window [B,8,64] f32" in text and "mtp draft" in text


def test_checkpoint_without_a_block_compiles_without_speculation(tiny_artifact):
    model = v4c.load(tiny_artifact)
    assert model.mtp is None and model.graph.outputs == ("logits",)
    assert "no MTP block" in model.mtp_note
    with pytest.raises(ValueError, match="needs the MTP block.*no MTP block"):
        model.generate(torch.tensor([[1, 2, 3]]), 4, speculative="mtp")
    assert inspect_artifact(tiny_artifact)["mtp"] == {"compiled": False, "note": model.mtp_note}


def test_incomplete_block_is_skipped_or_refused(tmp_path):
    ck = write_random_checkpoint(tiny_config_dict(), tmp_path / "ck", seed=0, mtp=True)
    tensors = load_file(ck / "model.safetensors")
    del tensors["mtp.0.e_proj.weight"]
    save_file(tensors, ck / "model.safetensors")
    art = v4c.compile(ck, tmp_path / "auto", target="cpu")
    model = v4c.load(art)
    assert model.mtp is None and "does not match the config" in model.mtp_note
    with pytest.raises(WeightMismatchError) as e:
        v4c.compile(ck, tmp_path / "on", target="cpu", mtp="on")
    assert e.value.missing == ["mtp.0.e_proj.weight"] and not (tmp_path / "on").exists()
    off = v4c.load(v4c.compile(ck, tmp_path / "off", target="cpu", mtp="off"))
    assert off.mtp is None and off.mtp_note == "mtp: off (not compiled)"


@pytest.mark.parametrize("naming", ["official", "hf"])
def test_quantised_block_loads_as_the_release_stores_it(tmp_path, naming):
    """FP8 attention / shared-expert / e_proj / h_proj linears with 128x128 block scales, MXFP4 experts: loaded
    weights decode bit for bit to the writer's values, in the official naming and in the graph's."""
    cfg = tiny_config_dict()
    c = V4Config.from_dict(cfg)
    params = random_params(build_mtp_graph(c), c, seed=4)
    params.update(random_params(v4c.model.build.build_graph(c), c, seed=3))
    ck, deq = write_official_checkpoint(params, cfg, tmp_path / "ck", naming=naming)
    names = load_file(ck / "model.safetensors")
    assert ("mtp.0.attn.wq_a.scale" in names and "mtp.0.ffn.experts.0.w1.weight" in names
            and "mtp.0.e_proj.scale" in names) if naming == "official" else (
        "mtp.0.self_attn.q_a_proj.weight_scale_inv" in names and "mtp.0.mlp.experts.gate_up_proj" in names)
    model = v4c.load(v4c.compile(ck, tmp_path / "art", target="cpu"))
    types = dict(model.mtp.graph.params)
    assert types["mtp.0.e_proj.weight"].dtype == "f8e4m3" and types["mtp.0.self_attn.q_a_proj.weight"].dtype == "f8e4m3"
    assert types["mtp.0.mlp.experts.gate_up_proj"].dtype == "mxfp4"
    p = model.mtp.executor.params
    w = p["mtp.0.h_proj.weight"]
    assert torch.equal(decode_fp8(w.data, w.scale), deq["mtp.0.h_proj.weight"])
    ex = p["mtp.0.mlp.experts.down_proj"]
    assert torch.equal(decode_mxfp4(ex.data, ex.scale), deq["mtp.0.mlp.experts.down_proj"])
    if naming == "official":  # and the quantised block drafts (the FP8 / MXFP4 reference path is slow: briefly)
        out = model.generate(torch.tensor([[5, 6, 7, 8]]), 5, speculative="mtp", draft_tokens=1)
        assert torch.equal(out.tokens, model.generate(torch.tensor([[5, 6, 7, 8]]), 5))


def test_weight_free_release_config_gets_the_block_in_the_release_layout(tmp_path):
    """V4-Flash's MTP block, weight-free with --mtp on: FP8 / MXFP4 as the release, 6.6B params of its own
    (spec C: 290.9B with MTP, 284.3B without), one sliding window of 128 rows."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(FLASH_HUB_CONFIG))
    art = v4c.compile(tmp_path / "cfg", tmp_path / "art", target="cpu", dtype="bf16", mtp="on")
    r = inspect_artifact(art, context=65536)
    m = r["mtp"]
    assert m["compiled"] and m["params"] == pytest.approx(6.6e9, rel=0.02)
    win = [s for s in m["states"] if s["name"] == "mtp.win"][0]
    assert win["shape"] == ["B", "128", "584"] and win["dtype"] == "u8"  # the fp8 row layout of the main cache
    g = open_artifact(art).data
    assert g["mtp"]["graph"] == "mtp.v4c"
    assert v4c.compile(tmp_path / "cfg", tmp_path / "auto", target="cpu", dtype="bf16") and \
        open_artifact(tmp_path / "auto").mtp_note.endswith("only with --mtp on")
