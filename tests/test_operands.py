"""Op signatures (named operands with roles, typed attributes) and state declarations (kind, format)."""
import inspect

import pytest

from v4c.codegen.quantized import mismatch, quantised_inputs
from v4c.errors import GraphError
from v4c.graph import OPS, Graph, Node, TensorType, parse_graph, print_graph, verify
from v4c.graph.analysis import cache_footprint, state_kind
from v4c.graph.builder import GraphBuilder
from v4c.graph.ir import StateDecl
from v4c.graph.ops.fused import RECIPES
from v4c.graph.registry import get_op, operand, operands_with_role
from v4c.graph.signature import ROLES, STATE_KINDS, Attr, Operand
from v4c.model.build import build_graph
from v4c.model.config import V4Config
from v4c.model.presets import tiny_config_dict
from v4c.model.weight_quant import weight_params
from v4c.passes import PassManager
from v4c.passes.pipeline import FUSION_PASSES
from v4c.passes.quantize_kv import QuantizeKVCache

POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@pytest.fixture(scope="module")
def tiny():
    return verify(build_graph(V4Config.from_dict(tiny_config_dict())))


def small_graph(ring_kind="window"):
    b = GraphBuilder("small")
    b.input("x", ("B", "T", 8), "f32")
    b.input("pos", ("B", "T"), "i64")
    w = b.param("w", (4, 8), "f32")
    ring = b.state("ring", ("B", 3, 4), "f32", ring_kind)
    ring_pos = b.state("ring_pos", ("B", 3), "i64", "window")
    y = b.op("linear", "x", w, out="y")
    b.op("window_append", ring, ring_pos, y, "pos", out=(ring, ring_pos))
    b.op("rms_norm", y, out="z", eps=1e-6)
    return b.finish(["z"])


def _mutate(g: Graph, i: int, **kw) -> Graph:
    nodes = list(g.nodes)
    nodes[i] = Node(**{**nodes[i].__dict__, **kw})
    return g.replace(nodes=tuple(nodes))


# ---- signatures ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_names_its_operands_and_attrs_as_its_reference_does(name):
    op = OPS[name]
    assert op.operands and all(o.role in ROLES for o in op.operands)
    fn = RECIPES.get(name, op.ref)
    params = list(inspect.signature(fn).parameters.values())[1 if name in RECIPES else 0:]  # a recipe takes k first
    positional = [p for p in params if p.kind in POSITIONAL]
    ins = positional[:len(op.operands)]
    assert [p.name for p in ins] == [o.name for o in op.operands]
    assert [p.default is not p.empty for p in ins] == [o.optional for o in op.operands]
    rest = positional[len(op.operands):] + [p for p in params if p.kind == p.KEYWORD_ONLY]
    explicit = {p.name: p.default is not p.empty for p in rest}
    declared = {a.name: a.optional for a in op.attrs}
    if any(p.kind == p.VAR_KEYWORD for p in params):  # the rest are the inner op's, passed through
        assert explicit.items() <= declared.items()
    else:
        assert explicit == declared
    for i, _ in op.state_io:
        assert op.operands[i].role in ("cache", "state")
    if any(o.role == "cache" for o in op.operands):
        assert op.cache_format in declared


def test_spec_strings_parse_and_print_back():
    o = Operand.parse("rows?:cache/compressed_rows")
    assert (o.name, o.role, o.optional, o.kind, o.gemm) == ("rows", "cache", True, "compressed_rows", False)
    assert str(o) == "rows?:cache/compressed_rows" and Operand.parse("w:weight/gemm").gemm
    assert Operand.parse("x") == Operand("x", "activation")
    for bad in ("x:input", "x:activation/gemm", "w:weight/window", "r:cache/ring"):
        with pytest.raises(ValueError):
            Operand.parse(bad)
    a = Attr.parse("yarn:tuple?")
    assert a.accepts(None) and a.accepts((1.0, 2)) and not a.accepts([1])
    assert Attr.parse("eps:float").accepts(1) and not Attr.parse("eps:float").accepts(True)
    assert not Attr.parse("n:int").accepts(2.0) and not Attr.parse("n:int").accepts(None)


def test_operand_lookups_by_name_and_role(tiny):
    att = next(n for n in tiny.nodes if n.op == "attention" and n.attr["kind"] == "csa")
    assert operand(att, "ring") == att.inputs[2] and operand(att, "idx") == att.inputs[7]
    slide = next(n for n in tiny.nodes if n.op == "attention" and n.attr["kind"] == "sliding")
    assert operand(slide, "rows") is None
    assert [k for k, _ in operands_with_role(att, "cache")] == ["ring", "rows"]
    moe = next(n for n in tiny.nodes if n.op == "moe_experts")
    assert [k for k, _ in operands_with_role(moe, "weight", gemm=True)] == ["w13", "w2"]
    with pytest.raises(GraphError, match="no operand 'nope'"):
        operand(att, "nope")


def test_weight_params_are_the_gemm_weights(tiny):
    ws = weight_params(tiny)
    assert "lm_head.weight" in ws and any(w.endswith("experts.gate_up_proj") for w in ws)
    assert not any(w.endswith(("norm.weight", ".sinks", "embed_tokens.weight", "position_bias")) for w in ws)


def test_qgemm_mismatch_names_the_operand():
    b = GraphBuilder("q")
    b.input("h", ("B", "T", 64), "f32")
    b.input("ids", ("B", "T"), "i64")
    rw = b.param("rw", (4, 64), "f32")
    bias = b.param("bias", (4,), "f32")
    w13, w2 = b.param("w13", (4, 64, 64), "f32"), b.param("w2", (4, 64, 32), "f32")
    sg = b.param("sg", (128, 64), "f8e4m3")
    b.param("sg_scale_inv", (1, 1), "e8m0")
    su, sd = b.param("su", (128, 64), "f32"), b.param("sd", (64, 128), "f32")
    idx, w, perm, offs = b.op("moe_router", "h", rw, bias, out=("i", "w", "p", "o"), scaling=1.0, topk=2)
    y = b.op("moe_ffn", "h", idx, w, perm, offs, w13, w2, sg, su, sd, out="y", limit=7.0)
    g = verify(b.finish([y]))
    node = g.nodes[-1]
    assert quantised_inputs(g, node) == {"sg": "f8e4m3"}
    assert mismatch(node, quantised_inputs(g, node)).endswith(
        "operand w13, input 5 (%w13) is unquantised, the quantised kernel takes mxfp4")


# ---- the verifier ----------------------------------------------------------------------------

def test_verifier_checks_operand_count_and_attributes():
    g = verify(small_graph())
    with pytest.raises(GraphError, match=r"node 0 \(linear -> %y\): takes 2..2 inputs \(linear\(x:activation, "
                                         r"w:weight/gemm\)\), got 3"):
        verify(_mutate(g, 0, inputs=("x", "w", "x")))
    with pytest.raises(GraphError, match=r"node 2 \(rms_norm -> %z\): unknown attribute 'epsilon' "
                                         r"\(rms_norm takes eps:float\?\)"):
        verify(_mutate(g, 2, attrs=(("epsilon", 1e-6),)))
    with pytest.raises(GraphError, match=r"node 2 \(rms_norm -> %z\): attribute 'eps' must be float or null, "
                                         r"got '1e-6'"):
        verify(_mutate(g, 2, attrs=(("eps", "1e-6"),)))
    b = GraphBuilder("r")
    b.input("x", ("B", "T", 8), "f32")
    b.input("pos", ("B", "T"), "i64")
    b.op("rope", "x", "pos", out="y", rope_dim=4, theta=1e4)
    rg = verify(b.finish(["y"]))
    with pytest.raises(GraphError, match=r"node 0 \(rope -> %y\): missing attribute 'theta' \(rope takes "
                                         r"rope_dim:int, theta:float, yarn:tuple\?, inverse:bool\?\)"):
        verify(_mutate(rg, 0, attrs=(("rope_dim", 4),)))
    with pytest.raises(GraphError, match="attribute 'inverse' must be bool"):
        verify(_mutate(rg, 0, attrs=rg.nodes[0].attrs + (("inverse", 1),)))


def test_verifier_checks_operand_roles():
    g = small_graph()
    with pytest.raises(GraphError, match=r"operand w \(%x\) is a weight: it must be a param"):
        verify(_mutate(g, 0, inputs=("x", "x")))
    with pytest.raises(GraphError, match=r"operand x \(%w\) is a param, not an activation"):
        verify(_mutate(g, 2, inputs=("w",), types=(TensorType((4, 8), "f32"),)))
    with pytest.raises(GraphError, match=r"operand ring \(%y\) is a cache: it must be a state"):
        verify(_mutate(g, 1, inputs=("y", "ring_pos", "y", "pos")))
    with pytest.raises(GraphError, match=r"operand ring \(%ring\) must be a window state; %ring is declared "
                                         r"compressed_rows"):
        verify(small_graph("compressed_rows"))


# ---- state declarations ----------------------------------------------------------------------

def test_state_declarations_carry_kind_and_format_through_text(tiny):
    kinds = dict(tiny.state_decls)
    assert {d.kind for d in kinds.values()} == set(STATE_KINDS)
    assert all(d.format == "plain" for d in kinds.values())
    assert kinds["l0.win"] == StateDecl("window") and kinds["l0.win_pos"] == StateDecl("window")
    g = PassManager([p() for p in FUSION_PASSES] + [QuantizeKVCache("fp8_ds", "mxfp4")], out=lambda s: None).run(tiny)
    text = print_graph(g)
    assert parse_graph(text) == g and print_graph(parse_graph(text)) == text
    lines = {ln.split()[1][1:]: ln for ln in text.splitlines() if ln.startswith("  state ")}
    csa = next(s for s, d in g.state_decls if d.kind == "indexer_keys").split(".")[0]
    assert lines[f"{csa}.win"].endswith("] window as fp8_ds")
    assert lines[f"{csa}.win_pos"].endswith("] window")
    assert lines[f"{csa}.comp.rows"].endswith("] compressed_rows as fp8_ds")
    assert lines[f"{csa}.index.rows"].endswith("] indexer_keys as mxfp4")
    assert lines[f"{csa}.comp.pend_kv"].endswith("] compressor_state")


def test_quantize_kv_cache_sets_the_declared_formats(tiny):
    g = QuantizeKVCache("bf16", "fp8").run(tiny).graph
    verify(g)
    before, states = dict(tiny.states), dict(g.states)
    for s, d in g.state_decls:
        # the ring positions are window state but no cache: they stay plain
        want = "plain" if s.endswith("win_pos") else {"window": "bf16", "compressed_rows": "bf16",
                                                         "indexer_keys": "fp8"}.get(d.kind, "plain")
        assert d.format == want, s
        assert states[s].dtype == {"bf16": "bf16", "fp8": "u8", "plain": before[s].dtype}[want], s
    assert {n.attr.get("store") for n in g.nodes if n.op == "compress"} == {"bf16", "fp8"}


def test_verifier_checks_state_declarations(tiny):
    g = small_graph()
    with pytest.raises(GraphError, match=r"state %ring : f32\[B,3,4\] declares no kind"):
        verify(g.replace(state_decls=g.state_decls[1:]))
    with pytest.raises(GraphError, match="unknown kind 'ring'"):
        verify(g.replace(state_decls=(("ring", StateDecl("ring")), g.state_decls[1])))
    with pytest.raises(GraphError, match="a compressor_state state cannot be stored as 'fp8_ds'"):
        verify(g.replace(state_decls=(("ring", StateDecl("compressor_state", "fp8_ds")), g.state_decls[1])))
    with pytest.raises(GraphError, match=r"stored as fp8_ds it must be u8"):
        verify(g.replace(state_decls=(("ring", StateDecl("window", "fp8_ds")), g.state_decls[1])))
    with pytest.raises(GraphError, match="in the order of the states"):
        verify(g.replace(state_decls=g.state_decls[::-1]))
    # a cache read without the declared format's decoding
    q = QuantizeKVCache("bf16", "bf16").run(tiny).graph
    i = next(i for i, n in enumerate(q.nodes) if n.op == "window_append")
    with pytest.raises(GraphError, match=r"operand ring \(%l0.win\) has kv_format=None, but %l0.win is declared bf16"):
        verify(_mutate(q, i, attrs=()))


def test_state_kind_reads_the_declaration_not_the_name(tiny):
    renamed = parse_graph(print_graph(tiny).replace("l0.win_pos", "l0.some_buffer"))
    assert state_kind(renamed, "l0.some_buffer") == "window"
    by_kind = cache_footprint(tiny, 4096).by_kind
    assert set(by_kind) == set(STATE_KINDS) and all(v > 0 for v in by_kind.values())
    with pytest.raises(GraphError, match="no declaration"):
        state_kind(tiny, "nope")


def test_builder_infers_a_missing_kind_from_the_operands_that_use_it():
    def build(extra: bool):
        b = GraphBuilder("k")
        b.input("kv", ("B", "T", 4), "f32")
        b.input("pos", ("B", "T"), "i64")
        ring, rp = b.state("ring", ("B", 3, 4), "f32"), b.state("rp", ("B", 3), "i64")
        if extra:
            b.state("unused", ("B", 3), "f32")
        b.op("window_append", ring, rp, "kv", "pos", out=(ring, rp))
        return b.finish(["kv"])

    assert dict(build(False).state_decls) == {"ring": StateDecl("window"), "rp": StateDecl("window")}
    with pytest.raises(ValueError, match="state %unused: its uses imply kinds"):
        build(True)
    assert get_op("compress").operands[4].kind is None  # compressed rows or indexer keys: the reader decides


@pytest.mark.parametrize("kv,indexer", [("fp32", "fp32"), ("fp8_ds", "mxfp4"), ("bf16", "fp8")])
def test_text_without_state_kinds_gets_the_ones_its_uses_imply(kv, indexer):
    """IR written before states declared kind and format (older artifacts) parses into the same
    declarations: read back from the ops that use each state."""
    import re
    passes = [p() for p in FUSION_PASSES] + ([QuantizeKVCache(kv, indexer)] if kv != "fp32" else [])
    g = PassManager(passes, out=lambda s: None).run(build_graph(V4Config.from_dict(tiny_config_dict()), "f32"))
    text = print_graph(g)
    old = re.sub(r"^(\s*state \S+ : \S+) [a-z_]+(?: as [a-z0-9_]+)?$", r"\1", text, flags=re.M)
    states = [ln.split() for ln in old.splitlines() if ln.strip().startswith("state ")]
    assert old != text and states and all(len(w) == 4 for w in states)  # "state %name : type", nothing after
    back = verify(parse_graph(old))
    assert back.state_decls == g.state_decls and back == g
