"""IR: types, text round trip, verifier, op references and costs."""
import math

import pytest
import torch

from v4c.errors import GraphError
from v4c.graph import Graph, Node, OPS, TensorType, parse_graph, print_graph, verify
from v4c.graph.builder import GraphBuilder
from v4c.graph.ops.core import rope, rope_inv_freq
from v4c.graph.registry import Concrete, get_op
from v4c.graph.types import eval_dim
from v4c.model.build import build_graph
from v4c.model.config import V4Config
from v4c.model.presets import FLASH_HUB_CONFIG, PRO_HUB_CONFIG, tiny_config_dict


def small_graph():
    b = GraphBuilder("small")
    b.input("x", ("B", "T", 8), "f32")
    b.input("pos", ("B", "T"), "i64")
    w = b.param("w", (4, 8), "f32")
    ring = b.state("ring", ("B", 3, 4), "f32")
    ring_pos = b.state("ring_pos", ("B", 3), "i64")
    y = b.op("linear", "x", w, out="y")
    b.op("window_append", ring, ring_pos, y, "pos", out=(ring, ring_pos))
    z = b.op("rms_norm", y, out="z", eps=1e-6)
    return b.finish([z], meta={"note": "test"})


def test_types_and_dims():
    t = TensorType.parse("f32[B,L/4,512]")
    assert t.shape == ("B", "L/4", 512) and str(t) == "f32[B,L/4,512]"
    assert t.concrete({"B": 2, "L": 10}) == (2, 3, 512)  # L/4 rounds up
    assert eval_dim("L/128", {"L": 1}) == 1
    for bad in ("f32[B,-1]", "q8[3]", "f32[B+1]"):
        with pytest.raises(GraphError):
            TensorType.parse(bad)
    with pytest.raises(GraphError, match="not bound"):
        t.concrete({"B": 1})


@pytest.mark.parametrize("make", [small_graph,
                                  lambda: build_graph(V4Config.from_dict(tiny_config_dict())),
                                  lambda: build_graph(V4Config.from_dict(tiny_config_dict(hc_mult=2)), "bf16")])
def test_text_round_trip(make):
    g = verify(make())
    text = print_graph(g)
    assert parse_graph(text) == g
    assert print_graph(parse_graph(text)) == text


@pytest.mark.parametrize("cfg", [FLASH_HUB_CONFIG, PRO_HUB_CONFIG], ids=["flash", "pro"])
def test_real_graphs_round_trip(cfg):
    g = verify(build_graph(V4Config.from_dict(cfg), "bf16"))
    assert parse_graph(print_graph(g)) == g


def test_state_outputs_track_final_versions():
    g = verify(small_graph())
    assert dict(g.state_outputs) == {"ring": "ring.1", "ring_pos": "ring_pos.1"}


def _mutate(g: Graph, i: int, **kw) -> Graph:
    nodes = list(g.nodes)
    nodes[i] = Node(**{**nodes[i].__dict__, **kw})
    return g.replace(nodes=tuple(nodes))


def test_verifier_rejects_broken_graphs():
    g = small_graph()
    with pytest.raises(GraphError, match="not defined before use"):
        verify(_mutate(g, 0, inputs=("nope", "w")))
    with pytest.raises(GraphError, match="declared types"):
        verify(_mutate(g, 0, types=(TensorType(("B", "T", 5), "f32"),)))
    with pytest.raises(GraphError, match="unknown op"):
        verify(_mutate(g, 2, op="frobnicate"))
    with pytest.raises(GraphError, match="takes 2..2 inputs"):
        verify(_mutate(g, 0, inputs=("x",)))
    with pytest.raises(GraphError, match="defined twice"):
        verify(_mutate(g, 2, outputs=("y",)))
    with pytest.raises(GraphError, match="already updated"):  # reading the old ring after its update
        verify(_mutate(g, 2, op="add", inputs=("ring", "ring"), types=(TensorType(("B", 3, 4), "f32"),), attrs=()))
    with pytest.raises(GraphError, match="state_out"):
        verify(g.replace(state_outputs=()))
    with pytest.raises(GraphError, match="output %missing"):
        verify(g.replace(outputs=("missing",)))
    b = GraphBuilder("r")
    b.input("x", ("B", "T", 8), "f32")
    b.input("pos", ("B", "T"), "i64")
    b.op("rope", "x", "pos", out="y", rope_dim=4, theta=1e4)
    rg = b.finish(["y"])
    with pytest.raises(GraphError, match="missing attribute 'rope_dim'"):
        verify(_mutate(rg, 0, attrs=()))


def test_parse_errors_name_the_line():
    text = print_graph(small_graph())
    with pytest.raises(GraphError, match="IR line 5"):
        parse_graph(text.replace("param %w : f32[4,8]", "param %w : f32[4,8"))
    with pytest.raises(GraphError, match="must start with"):
        parse_graph("nonsense")


def test_every_op_has_reference_cost_and_doc():
    assert len(OPS) >= 20
    for name, op in OPS.items():
        assert callable(op.ref) and callable(op.cost) and op.doc, name


def test_linear_cost_and_attention_cost_scale_with_context():
    lin = get_op("linear").cost([Concrete((2, 3, 8), "f32"), Concrete((5, 8), "f32")], [Concrete((2, 3, 5), "f32")], {}, 0)
    assert lin.flops == 2 * 6 * 5 * 8 and lin.bytes == (48 + 40 + 30) * 4
    att = get_op("attention")
    ins = [Concrete((1, 1, 8, 64), "f32")] * 7
    short = att.cost(ins, ins[:1], {"kind": "hca", "window": 8, "ratio": 16}, 64)
    long = att.cost(ins, ins[:1], {"kind": "hca", "window": 8, "ratio": 16}, 6400)
    assert short.flops == 4 * 8 * (8 + 4) * 64 and long.flops == 4 * 8 * (8 + 400) * 64


def test_rope_inverse_undoes_rope_and_keeps_nope_dims():
    x = torch.randn(2, 5, 3, 32)
    pos = torch.arange(5)[None].expand(2, -1) * 7
    attrs = dict(rope_dim=16, theta=160000.0, yarn=(16.0, 64, 32.0, 1.0))
    y = rope(x, pos, **attrs)
    assert torch.equal(y[..., :16], x[..., :16]) and not torch.allclose(y, x)
    assert torch.allclose(rope(y, pos, inverse=True, **attrs), x, atol=1e-5)


def test_yarn_frequencies_match_transformers():
    from transformers import DeepseekV4Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    for factor, orig, dim in ((16.0, 65536, 64), (16.0, 64, 16), (4.0, 4096, 32)):
        hf = DeepseekV4Config(**tiny_config_dict(head_dim=dim * 4, partial_rotary_factor=0.25, rope_parameters={
            "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": orig,
            "beta_fast": 32, "beta_slow": 1}))
        want, scale = ROPE_INIT_FUNCTIONS["yarn"](hf, None, layer_type="compress")
        got = rope_inv_freq(dim, 160000.0, (factor, orig, 32.0, 1.0))
        assert scale == 1.0 and torch.allclose(got, want, rtol=1e-6, atol=0)


def test_sinkhorn_is_nearly_doubly_stochastic():
    comb = torch.softmax(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)), dim=-1) + 1e-6
    out = get_op("sinkhorn").ref(comb, iters=20, eps=1e-6)
    assert torch.allclose(out.sum(-2), torch.ones(3, 4), atol=1e-5)  # ends with a column step
    assert torch.allclose(out.sum(-1), torch.ones(3, 4), atol=1e-2)
    one = get_op("sinkhorn").ref(comb, iters=1, eps=1e-6)  # one iteration = the column step only
    assert torch.allclose(one, comb / (comb.sum(-2, keepdim=True) + 1e-6))


def _compress(kv, gate, ape, norm, chunks, ratio, overlap, L=64):
    B, T, W = kv.shape
    d = norm.shape[0]
    c = 2 if overlap else 1
    rows = torch.zeros(B, math.ceil(L / ratio), d)
    pk, pg = torch.zeros(B, c * ratio, W), torch.zeros(B, c * ratio, W)
    off = 0
    for ch in chunks:
        pos = torch.arange(off, off + ch)[None].expand(B, -1)
        get_op("compress").ref(kv[:, off:off + ch], gate[:, off:off + ch], ape, norm, rows, pk, pg, pos, ratio=ratio,
                               overlap=overlap, eps=1e-6, rope_dim=8, theta=10000.0, yarn=None)
        off += ch
    return rows


@pytest.mark.parametrize("overlap,ratio", [(True, 4), (False, 8)])
def test_compress_is_independent_of_chunking(overlap, ratio):
    torch.manual_seed(0)
    d, T = 16, 37
    W = (2 if overlap else 1) * d
    kv, gate = torch.randn(2, T, W), torch.randn(2, T, W)
    ape, norm = torch.randn(ratio, W), torch.rand(d) + 0.5
    whole = _compress(kv, gate, ape, norm, [T], ratio, overlap)
    assert whole[:, T // ratio:].abs().sum() == 0 and whole[:, :T // ratio].abs().sum() > 0
    for chunks in ([1] * T, [5, 3, 11, 1, 17], [ratio, ratio + 1, T - 2 * ratio - 1]):
        assert torch.allclose(_compress(kv, gate, ape, norm, chunks, ratio, overlap), whole, atol=1e-5)


def test_compress_matches_a_direct_formula():
    """Entry w of an HCA-style compressor: per-channel softmax over its window, RMSNorm, RoPE at w*m."""
    torch.manual_seed(1)
    m, d, T = 4, 8, 12
    kv, gate, ape, norm = torch.randn(1, T, d), torch.randn(1, T, d), torch.randn(m, d), torch.rand(d) + 0.5
    rows = _compress(kv, gate, ape, norm, [T], m, False)
    for w in range(T // m):
        a, g = kv[0, w * m:(w + 1) * m], gate[0, w * m:(w + 1) * m] + ape
        pooled = (torch.softmax(g, dim=0) * a).sum(0)
        normed = norm * pooled / torch.sqrt(pooled.pow(2).mean() + 1e-6)
        want = rope(normed[None, None], torch.tensor([[w * m]]), rope_dim=8, theta=10000.0)[0, 0]
        assert torch.allclose(rows[0, w], want, atol=1e-5)


def test_window_append_keeps_last_window_by_position():
    ring, ring_pos = torch.zeros(1, 4, 2), torch.full((1, 4), -1)
    kv = torch.arange(12.0).view(1, 6, 2)
    pos = torch.tensor([[0, 1, 2, 3, 4, -1]])  # one padding token
    get_op("window_append").ref(ring, ring_pos, kv, pos)
    assert ring_pos.tolist() == [[4, 1, 2, 3]]
    assert ring[0, 0].tolist() == [8.0, 9.0] and ring[0, 1].tolist() == [2.0, 3.0]
