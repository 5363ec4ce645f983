"""MTP speculative decoding inside the serving engine (issue 21): ``Engine(model, speculative="mtp",
draft_tokens=k)`` and ``v4c serve --speculative mtp``, on the tiny random model with an MTP block (f32; sliding
window 8, CSA ratio 4, HCA ratio 16, so rejected drafts complete and take back window, CSA and HCA slots).

The random MTP block's drafts are nearly always wrong, which tests rejections only; ``steer`` replaces the
real drafter's tokens (after it ran, its state handled as in production) by the known greedy continuation,
each wrong with a chosen probability, so runs of accepted drafts, stops inside them and rejections at every
offset happen."""
import subprocess
import sys

import pytest
import torch

import v4c
from v4c.model.presets import tiny_config_dict
from v4c.model.random_weights import write_random_checkpoint
from v4c.serve import Engine, SamplingParams
from v4c.serve.metrics_text import render
from serve_helpers import assert_agrees, greedy_reference, uvicorn_server

CTX = 160


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    ck = write_random_checkpoint(tiny_config_dict(), root / "ck", seed=0, mtp=True)
    return v4c.load(v4c.compile(ck, root / "art", target="cpu"))


def _prompt(n, seed):
    return torch.randint(0, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def steer(engine, truth, miss, seed=0):
    """The engine's drafter gives ``truth[prompt]``'s next tokens (each replaced by a wrong one with
    probability ``miss``) instead of its own, after running as in production (``miss`` None: its own drafts,
    only watched). Returns the positions of the drafts a verify step had to take back (those from the first
    that is not plain decoding's token on)."""
    real = engine._drafter.draft
    index = {p: i for i, p in enumerate(truth)}
    rejected = []

    def draft(rows):
        out = real(rows)
        by_row = {r.row: r for r in engine._running}
        for row, (toks, q) in out.items():
            r = by_row[row]
            want = truth.get(tuple(r.prompt))
            if want is None:  # a request the test knows no continuation of: its own drafts
                continue
            n = r.fed + len(r.history)  # the pending token's position; draft j goes at n + 1 + j
            first_wrong = None
            for j in range(len(toks)):
                i = r.generated + j
                right = want[i] if i < len(want) else 0
                if miss is not None:  # drawn per (request, token): the same whatever order the engine drafts rows in
                    gen = torch.Generator().manual_seed(seed * 1_000_003 + index[tuple(r.prompt)] * 10_007 + i)
                    wrong = bool(torch.rand(1, generator=gen) < miss)
                    toks[j] = (right + 1 + int(torch.randint(1022, (1,), generator=gen))) % 1024 if wrong else right
                if toks[j] != right and first_wrong is None:
                    first_wrong = j
            if first_wrong is not None:
                rejected.extend(n + 1 + j for j in range(first_wrong, len(toks)))
        return out

    engine._drafter.draft = draft
    return rejected


PROMPTS = [(17, 40), (5, 33), (30, 46), (11, 25)]  # (prompt length, max_tokens)


@pytest.fixture(scope="module")
def cases(model):
    prompts = [_prompt(n, 10 + i) for i, (n, _) in enumerate(PROMPTS)]
    refs = [greedy_reference(model, p, m) for p, (_, m) in zip(prompts, PROMPTS)]
    for p, (toks, _), (_, m) in zip(prompts, refs, PROMPTS):  # model.generate is the reference's calls
        assert model.generate(torch.tensor([p]), m)[0, len(p):].tolist() == toks
    return prompts, refs


def _run(engine, prompts, params):
    handles = [engine.submit(p, sp) for p, sp in zip(prompts, params)]
    return [h.result(timeout=300) for h in handles]


@pytest.fixture(scope="module")
def plain_engine_tokens(model, cases):
    prompts, _ = cases
    with Engine(model, max_batch=4, max_context=CTX, step_tokens=32) as engine:
        got = _run(engine, prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in PROMPTS])
    return [c.tokens for c in got]


def _check_metrics(m, k):
    sp = m["speculative"]
    assert sp["method"] == "mtp" and sp["draft_tokens"] == k and sp["steps"] > 0
    assert 0 <= sp["accepted_tokens_total"] <= sp["draft_tokens_total"]
    assert sum(sp["histogram"]) == sp["accepted_per_step"]["count"] > 0 and len(sp["histogram"]) == k + 1
    assert sp["accepted_tokens_total"] == sum(a * n for a, n in enumerate(sp["histogram"]))
    assert sp["draft_tokens_total"] <= k * sum(sp["histogram"])
    text = render(m, {}, "tiny")
    for name in ("v4c_spec_decode_steps_total", "v4c_spec_decode_draft_tokens_total",
                 "v4c_spec_decode_accepted_tokens_total", "v4c_spec_decode_accepted_per_step_bucket"):
        assert name in text, name
    assert f'v4c_spec_decode_accepted_tokens_total{{model_name="tiny"}} {sp["accepted_tokens_total"]}' in text
    assert f'v4c_spec_decode_accepted_per_step_bucket{{model_name="tiny",le="{k}"}}' in text


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_the_models_own_drafts_equals_plain(model, cases, plain_engine_tokens, k):
    """Four requests at once (prompts of 5..30 tokens, 25..46 new): the random block's drafts, nearly all
    rejected, at every offset of the window, CSA and HCA rows."""
    prompts, refs = cases
    truth = {tuple(p): want for p, (want, _) in zip(prompts, refs)}
    with Engine(model, max_batch=4, max_context=CTX, step_tokens=32, speculative="mtp", draft_tokens=k) as engine:
        rejected = steer(engine, truth, miss=None)
        got = _run(engine, prompts, [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in PROMPTS])
        m = engine.metrics()
    for i, (c, (want, logits), plain) in enumerate(zip(got, refs, plain_engine_tokens)):
        assert c.finish_reason == "length" and c.completion_tokens == len(c.tokens) == PROMPTS[i][1]
        assert_agrees(c.tokens, want, logits, f"request {i}, k={k}")
        assert_agrees(c.tokens, plain, logits, f"request {i} against the engine without speculation, k={k}")
    _check_metrics(m, k)
    assert {p % 8 for p in rejected} == set(range(8))  # every window ring slot, CSA and HCA rows
    assert any((p + 1) % 16 == 0 for p in rejected) and any((p + 1) % 4 == 0 and (p + 1) % 16 for p in rejected)
    assert m["generation_tokens_total"] == sum(n for _, n in PROMPTS)
    assert m["running"] == 0 and m["kv_cache_bytes_in_use"] == 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_with_accepted_runs_equals_plain(model, cases, plain_engine_tokens, k):
    """Drafts right 70% of the time: runs of accepted drafts, rejections at every window slot and at CSA and
    HCA rows; every request still gives plain decoding's tokens, and the engine's speculation fewer steps."""
    prompts, refs = cases
    truth = {tuple(p): want for p, (want, _) in zip(prompts, refs)}
    with Engine(model, max_batch=4, max_context=CTX, step_tokens=32, speculative="mtp", draft_tokens=k) as engine:
        rejected = steer(engine, truth, miss=0.3, seed=k)
        got = _run(engine, prompts, [SamplingParams(max_tokens=m, ignore_eos=True, logprobs=2) for _, m in PROMPTS])
        m = engine.metrics()
    for i, (c, (want, logits)) in enumerate(zip(got, refs)):
        assert c.completion_tokens == len(c.tokens) == len(c.logprobs) == PROMPTS[i][1]
        assert_agrees(c.tokens, want, logits, f"request {i}, k={k}")
        assert_agrees(c.tokens, plain_engine_tokens[i], logits, f"request {i} against the engine without speculation")
        for j, (tok, lp, top) in enumerate(zip(c.tokens, c.logprobs, c.top_logprobs)):  # the model's own
            ref = torch.log_softmax(logits[j], -1)
            assert lp == pytest.approx(float(ref[tok]), abs=1e-4) and top[0][0] == tok and len(top) == 2
    _check_metrics(m, k)
    sp = m["speculative"]
    assert sp["histogram"][0] > 0 and sp["histogram"][k] > 0  # rejections and full acceptances
    assert sp["accepted_tokens_total"] > 0.4 * sp["draft_tokens_total"]
    assert len({p % 8 for p in rejected}) >= 6  # window ring slots, CSA and HCA rows
    assert any((p + 1) % 16 == 0 for p in rejected) and any((p + 1) % 4 == 0 and (p + 1) % 16 for p in rejected)


def test_stops_inside_an_accepted_run(model, cases):
    """Every draft right (k = 3): a stop token, ``max_tokens`` and EOS fall inside runs of accepted drafts;
    nothing after them is emitted, the rows are freed, and the next requests on those rows are right."""
    prompts, refs = cases
    truth = {tuple(p): want for p, (want, _) in zip(prompts, refs)}
    want = refs[0][0]
    s = 5
    while want[s] in want[:s]:  # a token that first appears at position s
        s += 1
    with Engine(model, max_batch=2, max_context=CTX, step_tokens=32, speculative="mtp", draft_tokens=3) as engine:
        steer(engine, truth, miss=0.0)
        c = engine.generate(prompts[0], SamplingParams(max_tokens=40, stop_token_ids=(want[s],), ignore_eos=True),
                            timeout=120)
        assert (c.finish_reason, c.tokens, c.stop_token, c.completion_tokens) == ("stop", want[:s], want[s], s + 1)
        c = engine.generate(prompts[0], SamplingParams(max_tokens=7, ignore_eos=True, logprobs=0), timeout=120)
        assert (c.finish_reason, c.tokens, len(c.logprobs)) == ("length", want[:7], 7)
        engine.eos_token_ids = frozenset({want[s]})  # as if it were the model's EOS
        c = engine.generate(prompts[0], SamplingParams(max_tokens=40), timeout=120)
        assert (c.finish_reason, c.tokens, c.completion_tokens) == ("stop", want[:s], s + 1)
        engine.eos_token_ids = frozenset()
        got = _run(engine, prompts[1:3], [SamplingParams(max_tokens=m, ignore_eos=True) for _, m in PROMPTS[1:3]])
        m = engine.metrics()
    for c, (w, logits) in zip(got, refs[1:3]):
        assert_agrees(c.tokens, w, logits, "a request after the stops")
    sp = m["speculative"]
    assert sp["accepted_tokens_total"] == sp["draft_tokens_total"] and sp["histogram"][3] > 0
    assert m["requests_total"]["stop"] == 2 and m["requests_total"]["length"] == 3 and m["running"] == 0


def test_sampled_requests(model, cases):
    """temperature > 0 (rejection sampling with the request's own generator): the requested number of tokens,
    the same with the same seed, whatever runs beside it; a greedy request beside it is unchanged."""
    prompts, refs = cases
    params = SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, seed=7, ignore_eos=True, logprobs=1)
    with Engine(model, max_batch=4, max_context=CTX, step_tokens=32, speculative="mtp", draft_tokens=2) as engine:
        alone = engine.generate(prompts[1], params, timeout=120)
        both = _run(engine, [prompts[1], prompts[0]], [params, SamplingParams(max_tokens=20, ignore_eos=True)])
        m = engine.metrics()
    assert alone.finish_reason == "length" and len(alone.tokens) == alone.completion_tokens == 30
    assert len(alone.logprobs) == 30 and all(lp <= 0 for lp in alone.logprobs)
    assert both[0].tokens == alone.tokens
    assert_agrees(both[1].tokens, refs[0][0][:20], refs[0][1], "the greedy request beside a sampled one")
    _check_metrics(m, 2)


def test_prefix_cache_with_speculation(model):
    """A generation that passes a 256-token block boundary is cut there and snapshotted; a later prompt that
    extends it past the boundary resumes from that snapshot and still gives plain decoding's tokens."""
    from v4c.runtime.prefix_cache import PrefixCache
    prompt = _prompt(250, 3)
    want, logits = greedy_reference(model, prompt, 24)
    cache = PrefixCache.for_model(model, memory_bytes=1 << 28)
    with Engine(model, max_batch=2, max_context=320, step_tokens=64, prefix_cache=cache, speculative="mtp",
                draft_tokens=3) as engine:
        steer(engine, {tuple(prompt): want}, miss=0.0)
        c = engine.generate(prompt, SamplingParams(max_tokens=24, ignore_eos=True), timeout=300)
        assert_agrees(c.tokens, want, logits, "the first request")
        second = prompt + c.tokens[:12]  # 262 tokens: the boundary at 256 lies in the first one's generation
        want2, logits2 = greedy_reference(model, second, 10)
        c2 = engine.generate(second, SamplingParams(max_tokens=10, ignore_eos=True), timeout=300)
        m = engine.metrics()
    assert c2.cached_tokens == 256
    assert_agrees(c2.tokens, want2, logits2, "the request resumed from the generation's boundary")
    assert m["prefix_cache"]["errors"] == 0


def test_an_artifact_without_mtp_is_refused_by_name(tiny_artifact, model):
    """An artifact without an MTP block, bad arguments and a sharded serve are refused at start, by name."""
    plain = v4c.load(tiny_artifact, device="cpu")
    with pytest.raises(ValueError, match="needs the artifact's MTP block, and this artifact has none"):
        Engine(plain, max_batch=2, max_context=64, speculative="mtp")
    with pytest.raises(ValueError, match="draft_tokens must be an integer from 1 to 3"):
        Engine(model, max_batch=2, max_context=64, speculative="mtp", draft_tokens=4)
    with pytest.raises(ValueError, match="speculative must be one of mtp"):
        Engine(model, max_batch=2, max_context=64, speculative="eagle")
    assert Engine(model, max_batch=2, max_context=64).metrics()["speculative"] is None
    r = subprocess.run([sys.executable, "-m", "v4c.cli", "serve", str(tiny_artifact), "--speculative", "mtp",
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "needs the artifact's MTP block, and this artifact has none" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "v4c.cli", "serve", str(model.path), "--speculative", "mtp",
                        "--world-size", "2", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--speculative is not supported for a sharded artifact yet" in r.stderr, r.stderr


def test_over_http(model, cases):
    """``create_app`` over a speculative engine: a greedy completion equals plain decoding, and /metrics
    carries the speculative series."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    from v4c.serve.app import create_app
    prompts, refs = cases
    with Engine(model, max_batch=4, max_context=CTX, speculative="mtp", draft_tokens=2) as engine:
        with uvicorn_server(create_app(engine, model_name="tiny-mtp")) as base:
            r = httpx.post(f"{base}/v1/completions", timeout=120, json={
                "model": "tiny-mtp", "prompt": prompts[2], "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            text = httpx.get(f"{base}/metrics", timeout=30).text
    got = [int(t) for t in r.json()["choices"][0]["text"].split()]
    assert len(got) == 16 and r.json()["usage"]["completion_tokens"] == 16
    assert_agrees(got, refs[2][0][:16], refs[2][1], "over HTTP")
    assert 'v4c_spec_decode_steps_total{model_name="tiny-mtp"}' in text
    assert "v4c_spec_decode_accepted_per_step_bucket" in text
