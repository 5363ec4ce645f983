"""v4c plan: each term of the step and serving model against hand-computed values on the tiny config,
memory per GPU equal to `v4c inspect --json` (one GPU and each sharded layout), the chosen concurrency
fits and one more does not, the --json keys, and errors by their message."""
import json
import math
from dataclasses import replace

import pytest

import v4c
from v4c.cli import main
from v4c.graph.analysis import decode_step_kernels
from v4c.inspect import inspect_artifact
from v4c.model.presets import tiny_config_dict
from v4c.plan import make_plan
from v4c.plan.choose import ACCEPT_P, default_accept
from v4c.plan.devices import GPUS, gpu
from v4c.plan.efficiency import Efficiency, efficiency_for
from v4c.plan.kernels import expected_experts, step_kernels
from v4c.plan.memory import memory_per_gpu
from v4c.plan.pool import Layout, Pool
from v4c.plan.serving import Speculation, Workload, colocated, disaggregated
from v4c.plan.source import load_model
from v4c.plan.step import TERMS, kernel_seconds, step_time

CFG = tiny_config_dict()
D, V, E, K, M = CFG["hidden_size"], CFG["vocab_size"], CFG["n_routed_experts"], CFG["num_experts_per_tok"], \
    CFG["moe_intermediate_size"]
IN, OUT = 512, 128
H100 = GPUS["h100"]
SMALL = replace(H100, key="small", memory=20e6)  # an H100 with 20 MB: a few dozen tiny sequences fit


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny config directory and weight-free bf16 artifacts: one GPU, and two ranks in each layout."""
    root = tmp_path_factory.mktemp("plan")
    d = root / "tiny"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    arts = {None: v4c.compile(d, root / "one", target="cpu", dtype="bf16", weights="none", tuning_cache=False)}
    for par in ("ep=2,attn=dp", "ep=2,attn=tp", "ep=1,attn=dp"):
        arts[par] = v4c.compile(d, root / par.replace(",", "-").replace("=", ""), target="cpu", dtype="bf16",
                                weights="none", tuning_cache=False, world_size=2, parallel=par)
    (root / "no-results").mkdir()
    return d, arts, root / "no-results"


@pytest.fixture(scope="module")
def src(tiny):
    return load_model(tiny[0], H100)


def plan(model, results, **kw):
    args = dict(gpu=H100, gpus=1, input_len=IN, output_len=OUT, results_dir=results)
    return make_plan(model, **{**args, **kw})


# ---- the terms, by hand ----------------------------------------------------------------------

def test_a_kernel_costs_its_roofline_over_the_efficiency_plus_its_launch(src):
    eff = Efficiency()
    ks = step_kernels(src.graph, batch=1, tokens=1, context=64, topk=K, experts=E, global_tokens=1)
    head = next(k for k in ks if k.name == "logits")
    # the LM head: a [1, D] x [V, D]^T GEMM, all bf16
    assert (head.flops, head.bytes, head.dtype) == (2 * D * V, D * 2 + V * D * 2 + V * 2, "bf16")
    term, work, launch = kernel_seconds(head, H100, eff, 1)
    assert term == "weights" and launch == 2e-6
    assert work == pytest.approx(max(2 * D * V / (989e12 * 0.78), (D * 2 + V * D * 2 + V * 2) / (3.35e12 * 0.80)))
    # a step is the sum of its kernels, split by what bounds each
    st = step_time(ks, H100, eff, 1)
    assert set(st.terms) == set(TERMS) and st.terms["collectives"] == 0
    assert st.terms["launch"] == pytest.approx(2e-6 * sum(k.launches for k in ks))
    assert st.seconds == pytest.approx(sum(sum(kernel_seconds(k, H100, eff, 1)[1:]) for k in ks))


def test_grouped_gemms_with_few_rows_per_expert_reach_less_of_hbm(src):
    """Mega MoE's two published points: 16-22% of HBM at one token per EP8 rank of Flash (0.1875 rows per
    expert), the batched fraction from 512 tokens per rank (96 rows); log-linear between."""
    eff = Efficiency()
    assert eff.grouped_hbm(None) == eff.grouped_hbm(96) == eff.grouped_hbm(1e4) == 0.62
    assert eff.grouped_hbm(0.01) == eff.grouped_hbm(0.1875) == 0.19
    assert eff.grouped_hbm(0.1875 * 512 ** 0.5) == pytest.approx((0.19 + 0.62) / 2)  # half-way in log
    # a fraction measured below the small-batch one is never raised by it
    assert replace(eff, hbm={**eff.hbm, "grouped_gemm": 0.1}).grouped_hbm(1.0) == 0.1
    # the tiny model's experts at batch 3: 3 tokens x 2 of 8 experts = 0.75 rows per expert
    ks = step_kernels(src.graph, batch=3, tokens=1, context=64, topk=K, experts=E, global_tokens=3)
    moe = next(k for k in ks if k.op == "moe_ffn")
    assert moe.rows_per_expert == pytest.approx(3 * K / E)
    frac = 0.19 + 0.43 * math.log(0.75 / 0.1875) / math.log(512)
    term, work, _ = kernel_seconds(moe, H100, eff, 1)
    assert term == "weights"
    assert work == pytest.approx(max(moe.flops / (989e12 * 0.68), moe.bytes / (3.35e12 * frac)))
    assert all(k.rows_per_expert is None for k in ks if k.op != "moe_ffn")


def test_a_collective_costs_its_latency_plus_its_bytes_over_the_link(src):
    eff = Efficiency()
    g = src.rank_graph(2, "ep=2,attn=tp")
    ks = step_kernels(g, batch=1, tokens=1, context=64, topk=K, experts=E, global_tokens=1)
    ar = [k for k in ks if k.op == "all_reduce"]
    assert len(ar) == 2 * CFG["num_hidden_layers"]  # attention output and expert output of every layer
    # a ring all-reduce of one bf16 row: each rank sends 2 (W - 1) / W of it
    assert all(k.bytes == 2 * D * 2 * 1 // 2 for k in ar)
    term, work, launch = kernel_seconds(ar[0], H100, eff, 2)
    assert (term, launch) == ("collectives", 0.0)
    assert work == pytest.approx(5e-6 + D * 2 / (450e9 * 0.81))
    # past the NVLink domain the NIC carries it, with the network latency
    assert kernel_seconds(ar[0], H100, eff, 16)[1] == pytest.approx(15e-6 + D * 2 / (50e9 * 0.81))


def test_kernels_are_inspects_and_experts_read_their_expected_union(src):
    g = src.graph
    one = step_kernels(g, batch=1, tokens=1, context=64, topk=K, experts=E, global_tokens=1)
    assert [(k.name, k.flops, k.bytes) for k in one] == [(k.name, k.flops, k.bytes)
                                                         for k in decode_step_kernels(g, 64, 1)]
    # three tokens route 6 assignments among 8 experts: inspect's bound reads min(8, 6) experts, the plan
    # the expected number touched, 8 * (1 - (1 - 2/8)^3) = 4.625
    assert expected_experts(E, K, 3) == pytest.approx(4.625)
    three = {k.name: k for k in step_kernels(g, batch=3, tokens=1, context=64, topk=K, experts=E, global_tokens=3)}
    per_expert = 3 * D * M * 2  # gate, up and down, bf16
    for k in decode_step_kernels(g, 64, 3):
        got = three[k.name]
        want = k.bytes + (4.625 - 6) * per_expert if k.op == "moe_ffn" else k.bytes
        assert (got.flops, got.bytes) == (pytest.approx(k.flops), pytest.approx(want)), k.name


def test_prefill_chunks_compute_logits_for_their_last_row_only(src):
    g = src.graph
    full = {k.name: k for k in step_kernels(g, batch=1, tokens=64, context=32, topk=K, experts=E, global_tokens=64)}
    last = {k.name: k for k in step_kernels(g, batch=1, tokens=64, context=32, topk=K, experts=E, global_tokens=64,
                                            logits_rows=1)}
    assert full["logits"].flops == 64 * 2 * D * V and last["logits"].flops == 2 * D * V
    assert last["logits"].bytes == V * D * 2 + (64 * D * 2 + 64 * V * 2) / 64
    assert all(full[n] == last[n] for n in full if n != "logits")


def test_mtp_iteration_is_its_draft_steps_plus_a_verify_step(src):
    pool = Pool(src, H100, Efficiency(), Layout(1, "dp"))
    it = pool.iteration(4, 600, 3)
    assert it.seconds == pytest.approx(pool.forward(4, 4, 600).seconds + 3 * pool.draft(4, 600).seconds)
    assert pool.iteration(4, 600, 0).seconds == pool.forward(4, 1, 600).seconds
    # the draft step is the MTP layer (a sliding one), the head and the e/h projections
    names = {k.name for k in pool._draft_kernels(1, 1, 600)}
    assert {"logits", "head.h", "mtp.e_proj", "mtp.h_proj", "l0.attn.o1"} <= names and "l1.attn.o1" not in names
    # acceptance: 3 drafts accept 2.5 tokens (SGLang's figure), chained with one per-token probability
    assert default_accept(3) == pytest.approx(2.5) and default_accept(1) == pytest.approx(1 + ACCEPT_P)


def test_one_request_at_a_time_is_its_prefill_then_its_decode(src):
    pool = Pool(src, H100, Efficiency(), Layout(1, "dp"))
    w = Workload(IN, OUT, chunk=256)
    for k, a in ((0, 1.0), (2, 2.0)):
        s = colocated(pool, w, Speculation(k, a), 1)
        chunk = pool.prefill_chunk(256, IN // 2, mtp=k > 0).seconds
        it = pool.iteration(1, IN + OUT // 2, k).seconds
        assert s.ttft_s == pytest.approx(2 * chunk)  # two chunks of 256, nobody ahead
        assert s.tpot.seconds == pytest.approx(it / a)
        assert s.tokens_per_s_per_gpu == pytest.approx((IN + OUT) / (2 * chunk + (OUT - 1) * it / a))
    d = disaggregated(pool, 1, pool, w, Speculation(), 1)
    assert d.gpus == 2 and d.ttft_s == pytest.approx(2 * pool.prefill_chunk(256, IN // 2, mtp=False).seconds)


def test_under_load_littles_law_holds(src):
    pool = Pool(src, H100, Efficiency(), Layout(1, "dp"))
    w = Workload(IN, OUT)
    s = colocated(pool, w, Speculation(), 64)
    # requests in flight = those decoding + arrivals x time to first token; decode time = TPOT per token
    assert s.decoding + s.requests_per_s * s.ttft_s == pytest.approx(64, rel=1e-6)
    assert s.decoding / s.requests_per_s == pytest.approx((OUT - 1) * s.tpot.seconds, rel=1e-6)
    assert 1 < s.decoding < 64 and s.tpot.seconds > pool.iteration(1, IN + OUT // 2, 0).seconds


def test_a_running_request_cap_queues_the_rest_before_their_prefill(src):
    pool = Pool(src, H100, Efficiency(), Layout(1, "dp"))
    capped, at_cap = Workload(IN, OUT, max_running=16), Workload(IN, OUT)
    for fn, args in ((colocated, (pool,)), (disaggregated, (pool, 1, pool))):
        ref = fn(*args, at_cap, Speculation(), 16)
        s = fn(*args, capped, Speculation(), 64)
        # the admitted 16 run as 16 in flight do; the other 48 wait 48 / r each, then see the same TTFT
        assert s.concurrency == 64 and s.decoding == ref.decoding and s.requests_per_s == ref.requests_per_s
        assert s.tpot.seconds == ref.tpot.seconds and s.tokens_per_s_per_gpu == ref.tokens_per_s_per_gpu
        assert s.ttft_s == pytest.approx(ref.ttft_s + 48 / ref.requests_per_s)
        assert s.ttft_bound == "admission"  # the wait to be admitted bounds it
        assert fn(*args, capped, Speculation(), 16) == ref  # at or under the cap nothing changes
    with pytest.raises(ValueError, match="--max-running must be >= 1, got 0"):
        Workload(IN, OUT, max_running=0)


def test_only_admitted_requests_need_memory(tiny):
    d, _, results = tiny
    most = plan(d, results, gpu=SMALL, profile="max-throughput", speculative="none")["max_concurrency"]
    r = plan(d, results, gpu=SMALL, concurrency=4 * most, max_running=most, speculative="none")
    assert r["concurrency"] == 4 * most and r["steady_state"]["admitted"] == most
    assert r["memory_per_gpu"]["sequences_on_gpu"] == most and r["workload"]["max_running"] == most
    with pytest.raises(ValueError, match=f"--concurrency {4 * most} does not fit"):
        plan(d, results, gpu=SMALL, concurrency=4 * most, speculative="none")


def test_max_running_on_the_command_line(tiny, capsys):
    d, _, _ = tiny
    args = ["plan", str(d), "--gpu", "H100", "--gpus", "1", "--input-len", str(IN), "--output-len", str(OUT),
            "--concurrency", "64"]
    assert main([*args, "--max-running", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["workload"]["max_running"] == 8 and r["steady_state"]["admitted"] == 8
    assert r["bounds"]["ttft_ms"] == "admission"
    assert main([*args, "--max-running", "8"]) == 0
    text = capsys.readouterr().out
    assert "concurrency 64 (at most" in text and "the engine admits 8 at once)" in text


def test_cost_per_million_tokens(tiny):
    r = plan(tiny[0], tiny[2], concurrency=4, speculative="none", price_per_gpu_hour=2.0)
    assert r["cost_per_million_output_tokens"] == pytest.approx(2.0 * 1e6 / (3600 * r["output_tokens_per_s_per_gpu"]))
    assert r["cost_per_million_tokens"] == pytest.approx(2.0 * 1e6 / (3600 * r["tokens_per_s_per_gpu"]))
    assert r["output_tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s_per_gpu"] * OUT / (IN + OUT))


# ---- memory: what inspect counts ------------------------------------------------------------

def test_memory_on_one_gpu_is_inspects(tiny):
    d, arts, results = tiny
    want = inspect_artifact(arts[None], context=IN + OUT, backend="reference")
    for model in (d, arts[None]):  # built in memory from the config, or read from the artifact
        r = plan(model, results, concurrency=8, speculative="none")
        m = r["memory_per_gpu"]
        assert m["weight_bytes"] == want["weights"]["total_bytes"]
        assert m["kv_bytes"] == 8 * want["kv_cache"]["total_bytes"]
        assert m["mtp_bytes"] == 0 and m["activation_bytes"] > 0
        assert m["total_bytes"] == m["weight_bytes"] + m["kv_bytes"] + m["activation_bytes"]


@pytest.mark.parametrize("parallel", ["ep=2,attn=dp", "ep=2,attn=tp", "ep=1,attn=dp"])
def test_memory_per_gpu_is_the_sharded_plans_rank_0(tiny, parallel):
    d, arts, results = tiny
    ranks = inspect_artifact(arts[parallel], context=IN + OUT, batch=6, backend="reference")["ranks"]
    assert ranks[0]["memory_bytes"] == max(x["memory_bytes"] for x in ranks)  # rank 0 is the fullest
    for model in (d, arts[parallel]):
        m = plan(model, results, gpus=2, parallel=parallel, concurrency=6, speculative="none")["memory_per_gpu"]
        assert (m["weight_bytes"], m["kv_bytes"]) == (ranks[0]["weight_bytes"], ranks[0]["kv_bytes"])
        assert m["sequences_on_gpu"] == ranks[0]["sequences"] == (3 if "dp" in parallel else 6)


def test_mtp_adds_a_layer_and_its_ring(src):
    pool = Pool(src, H100, Efficiency(), Layout(1, "dp"))
    layer0 = sum(t.nbytes() for n, t in src.graph.params if n.startswith("model.layers.0."))
    ring = sum(t.nbytes({"B": 1, "L": 1}) for n, t in src.graph.states if n.startswith("l0.win"))
    assert pool.mtp_bytes(5) == layer0 + 2 * D * D + 5 * ring


@pytest.mark.parametrize("parallel", [None, "ep=2,attn=dp"])
def test_the_chosen_concurrency_fits_and_one_more_does_not(tiny, parallel):
    d, _, results = tiny
    gpus = 1 if parallel is None else 2
    r = plan(d, results, gpu=SMALL, gpus=gpus, parallel=parallel, profile="max-throughput", speculative="none")
    c = r["concurrency"]
    assert c == r["max_concurrency"] and 8 < c < 1000
    pool = Pool(load_model(d, SMALL), SMALL, Efficiency(), Layout(gpus, "dp"))
    fit = memory_per_gpu(pool, c, IN + OUT, chunk=IN, tokens=1, mtp=False)
    over = memory_per_gpu(pool, c + 1, IN + OUT, chunk=IN, tokens=1, mtp=False)
    assert fit["fits"] and fit["total_bytes"] <= 0.9 * 20e6 and fit == r["memory_per_gpu"]
    assert not over["fits"] and over["total_bytes"] > 0.9 * 20e6
    with pytest.raises(ValueError, match=f"--concurrency {c + 1} does not fit: at most {c} sequences of 640 tokens"):
        plan(d, results, gpu=SMALL, gpus=gpus, parallel=parallel, concurrency=c + 1, speculative="none")


# ---- choices, CLI, errors -----------------------------------------------------------------

def test_profiles_choose_their_layout_and_depth(tiny):
    d, _, results = tiny
    low = plan(d, results, gpus=2, profile="low-latency")
    scored = [c for c in low["considered"] if "score" in c]
    # four layouts (attention tp / dp, experts split or whole on each GPU), MTP off and 1 to 3 drafts, one
    # request at a time
    assert len(scored) == 16 and all(c["option"].endswith("concurrency 1") for c in scored)
    assert {c["option"].split(", ")[1] for c in scored} == {"ep=2,attn=tp", "ep=2,attn=dp", "ep=1,attn=tp",
                                                            "ep=1,attn=dp"}
    best = max(scored, key=lambda c: c["score"])  # the shortest time per output token
    k = low["speculative"]["draft_tokens"]
    assert best["option"] == f"2 GPUs, {low['layout']['parallel']}, {f'MTP {k}' if k else 'no MTP'}, concurrency 1"
    assert low["tpot_ms"] == pytest.approx(-best["score"] * 1e3) and low["concurrency"] == 1
    bal = plan(d, results, gpu=SMALL, gpus=2, profile="balanced")
    scored = [c for c in bal["considered"] if "score" in c]
    assert max(c["score"] for c in scored) == pytest.approx(bal["tokens_per_s_per_gpu"] * bal["tokens_per_s_per_user"])
    assert bal["concurrency"] in {1 << i for i in range(12)} | {bal["max_concurrency"]}
    fixed = plan(d, results, gpus=2, profile="low-latency", parallel="ep=2,attn=dp", speculative="mtp",
                 draft_tokens=1, accept_length=1.5)
    assert fixed["layout"]["parallel"] == "ep=2,attn=dp" and fixed["speculative"] == \
        {"method": "mtp", "draft_tokens": 1, "accept_length": 1.5}


def test_json_keys(tiny, capsys):
    d, _, _ = tiny
    assert main(["plan", str(d), "--gpu", "H100", "--gpus", "2", "--input-len", str(IN), "--output-len", str(OUT),
                 "--concurrency", "4", "--price-per-gpu-hour", "1.3", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    metrics = ("ttft_ms", "tpot_ms", "tokens_per_s_per_user", "tokens_per_s_per_gpu", "cost_per_million_output_tokens")
    assert all(isinstance(r[k], float) and r[k] > 0 for k in metrics)
    assert set(r["bounds"]) == set(metrics) and set(r["bounds"].values()) <= {*TERMS, "queueing"}
    assert set(r["memory_per_gpu"]) >= {"weight_bytes", "kv_bytes", "mtp_bytes", "activation_bytes", "total_bytes",
                                        "usable_bytes", "fits"}
    assert r["layout"]["world_size"] * r["layout"]["replicas"] == 2 and r["concurrency"] == 4 and r["max_concurrency"] > 4
    assert r["gpu"]["key"] == "h100" and r["kv_cache_format"] == "bf16" and set(r["tpot_terms_ms"]) == set(TERMS)
    assert r["efficiency"]["source"].startswith("published kernel measurements") or r["efficiency"]["measured"]
    assert r["tokens_per_s_per_user"] == pytest.approx(1e3 / r["tpot_ms"])
    assert "sweep" not in r


def test_text_output_names_each_metric_and_its_bound(tiny, capsys):
    d, _, _ = tiny
    assert main(["plan", str(d), "--gpu", "b200", "--gpus", "1", "--input-len", "256", "--output-len", "64",
                 "--profile", "low-latency"]) == 0
    out = capsys.readouterr().out
    for line in ("TTFT (ms)", "time per output token (ms)", "tokens/s per user", "tokens/s per GPU",
                 "$ per million output tokens", "memory     per GPU: weights"):
        assert line in out


@pytest.mark.parametrize("kw,message", [
    (dict(gpu="a100"), "unknown --gpu 'a100'; choose one of h100, h200, h20, b200, b300, gb200, gb300"),
    (dict(sweep=True, concurrency=4), "--sweep goes over the concurrency itself"),
    (dict(speculative="mtp", draft_tokens=2, accept_length=3.5), "--accept-length must be between 1 and draft"),
    (dict(draft_tokens=2), "--draft-tokens and --accept-length need --speculative mtp"),
    (dict(input_len=4000, output_len=200), "4200 tokens is beyond the model's maximum context of 4096"),
    (dict(price_per_gpu_hour=0.0), "--price-per-gpu-hour must be > 0"),
    (dict(prefill_gpus=2), "--prefill-gpus and --max-gpus need --disagg"),
    (dict(gpus=4, parallel="ep=4,attn=tp"), "attn=tp: 2 output groups .* cannot be split over 4 ranks"),
    (dict(gpu=replace(H100, memory=1e6)), "no layout fits: 1 GPU, no MTP: one sequence of 640 tokens does not fit"),
])
def test_errors_name_what_is_wrong(tiny, kw, message):
    with pytest.raises(ValueError, match=message):
        plan(tiny[0], tiny[2], **kw)


def test_heads_that_straddle_output_groups_rule_out_tensor_parallel_attention(tmp_path):
    """3 heads in 2 output groups (valid: 3 x 64 channels split in two): no rank can own whole groups of whole
    heads, so attn=tp is refused by name and the plan takes data-parallel attention (it had failed inside the
    sharded graph: 'reshape f32[B,T,1,64] -> [B,T,1,96]')."""
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config_dict(num_attention_heads=3, o_groups=2)))
    with pytest.raises(ValueError, match=r"attn=tp: 3 attention heads in 2 output groups cannot be split over 2 ranks in whole heads"):
        v4c.compile(d, tmp_path / "tp", target="cpu", weights="none", world_size=2, parallel="ep=2,attn=tp")
    model = v4c.compile(d, tmp_path / "one", target="cpu", dtype="bf16", weights="none", tuning_cache=False)
    r = plan(model, tmp_path, gpus=2)
    assert r["layout"]["world_size"] == 2 and "attn=dp" in r["layout"]["parallel"]


def test_experts_that_do_not_split_over_the_gpus_are_replicated(tmp_path):
    """4 experts on 8 GPUs: ep=8 is refused by name (every rank needs an expert) and the plan takes the experts
    whole on every GPU (ep=1; it had said "no layout fits"). Replicas with data-parallel attention exchange
    nothing, so the step has no collectives; their weights per GPU are the whole model's."""
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(tiny_config_dict(n_routed_experts=4)))
    r = plan(d, tmp_path, gpus=8, profile="max-throughput", speculative="none")
    # experts whole on every GPU: one 8-GPU instance with ep=1, or instances of fewer GPUs that each hold them all
    assert r["layout"]["ep"] == 1 and r["layout"]["world_size"] * r["layout"]["replicas"] == 8
    refused = {c["option"]: c["refused"] for c in r["considered"] if "refused" in c}
    assert "ep=8: a layer has only 4 routed experts" in refused["8 GPUs, ep=8,attn=dp"]
    assert r["tpot_terms_ms"]["collectives"] == 0
    one = plan(d, tmp_path, gpus=1, speculative="none", concurrency=1)
    assert r["memory_per_gpu"]["weight_bytes"] == one["memory_per_gpu"]["weight_bytes"]


def test_replicas_are_instances_that_share_the_requests(tiny):
    """2 instances of 2 GPUs at concurrency 2c are one 2-GPU instance at c, twice: the same latency, memory per
    GPU and tokens/s per GPU, twice the requests and the sequences that fit. The chooser tries every divisor of
    the GPUs, and refuses by name a concurrency the instances cannot share equally."""
    from v4c.plan.choose import choose
    d, _, results = tiny
    src, eff, w, specs = load_model(d, SMALL), Efficiency(), Workload(IN, OUT), [Speculation()]
    two = choose("max-throughput", src, SMALL, eff, w, gpus=4, replicas=2, parallel="ep=2,attn=dp", specs=specs).best
    one = choose("max-throughput", src, SMALL, eff, w, gpus=2, parallel="ep=2,attn=dp", specs=specs).best
    assert two.replicas == 2 and two.describe() == "2 x 2 GPUs, ep=2,attn=dp" and one.replicas == 1
    assert (two.concurrency, two.max_concurrency) == (2 * one.concurrency, 2 * one.max_concurrency)
    a, b = two.state, one.state
    assert (a.ttft_s, a.tpot.seconds, a.gpus) == (b.ttft_s, b.tpot.seconds, 4) and two.memory == one.memory
    assert a.tokens_per_s_per_gpu == pytest.approx(b.tokens_per_s_per_gpu)
    assert a.requests_per_s == pytest.approx(2 * b.requests_per_s)
    r = plan(d, results, gpu=SMALL, gpus=4, profile="balanced", speculative="none")
    assert {c["option"].split(", ")[0] for c in r["considered"]} >= {"4 x 1 GPU", "2 x 2 GPUs", "4 GPUs"}
    assert r["layout"]["replicas"] * r["layout"]["world_size"] == 4
    r = plan(d, results, gpu=SMALL, gpus=4, concurrency=3, speculative="none")
    assert any("--concurrency 3 does not split into 2 instances" in c.get("refused", "") for c in r["considered"])
    with pytest.raises(ValueError, match="replicas 3 must divide --gpus 4"):
        choose("balanced", src, SMALL, eff, w, gpus=4, replicas=3, specs=specs)


def test_gpu_check_results_override_the_defaults_for_that_gpu(tmp_path):
    rows = [{"op": "moe_ffn", "variant": "release", "flops": 1e6, "bytes": 3.35e12 * 1e-3 * f, "kernel_s": 1e-3}
            for f in (0.5, 0.6, 0.7)]  # memory-bound at 50, 60, 70% of the datasheet bandwidth
    rows.append({"op": "linear", "variant": "bf16", "flops": 989e12 * 1e-3 * 0.4, "bytes": 1e3, "kernel_s": 1e-3})
    rows.append({"op": "indexer", "error": "RuntimeError: no", "flops": 1, "bytes": 1})
    (tmp_path / "gpu_check_h100_2026-12-01.json").write_text(json.dumps(
        {"device": "NVIDIA H100 80GB HBM3", "date": "2026-12-01", "results": rows}))
    (tmp_path / "gpu_check_h200_2026-12-02.json").write_text(json.dumps(
        {"device": "NVIDIA H200", "date": "2026-12-02", "results": rows[:1]}))
    eff = efficiency_for(gpu("h100"), results=tmp_path)
    assert eff.hbm["grouped_gemm"] == pytest.approx(0.6) and eff.compute["dense_gemm"] == pytest.approx(0.4)
    assert eff.measured == ("dense_gemm/compute", "grouped_gemm/hbm") and "gpu_check_h100" in eff.source
    assert eff.hbm["attention"] == Efficiency().hbm["attention"]  # not measured: the default
    # an H200 run is not an H20 one, nor a GB200 one a B200 one
    assert efficiency_for(gpu("h20"), results=tmp_path) == Efficiency()
    assert efficiency_for(gpu("h200"), results=tmp_path).measured == ("grouped_gemm/hbm",)
    assert efficiency_for(gpu("h100"), cuda_graphs=False, results=tmp_path / "none").launch_s == 5e-6
