"""The prefix cache inside ``v4c serve``'s engine: requests resume from cached prefixes and give the
tokens (and log-probabilities) of uncached runs; two running requests share their common prefix; a
small budget evicts while requests run; usage fields, /metrics, the flags, and a restart from disk."""
import json

import pytest
import torch

import v4c
from v4c.cli import build_parser
from v4c.runtime.prefix_cache import PrefixCache
from v4c.serve import Engine, SamplingParams

fastapi = pytest.importorskip("fastapi")

CTX = 1024
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return v4c.load(tiny_artifact, device="cpu")


def _ids(n, seed):
    return torch.randint(2, 1024, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def uncached(model):
    """What an engine without a cache gives for a prompt (memoised: tokens and log-probabilities)."""
    seen = {}
    engine = Engine(model, max_batch=2, max_context=CTX)

    def run(prompt):
        key = tuple(prompt)
        if key not in seen:
            seen[key] = engine.generate(prompt, GREEDY)
        return seen[key]
    yield run
    engine.stop()


def _same(got, want):
    assert got.tokens == want.tokens
    assert max(abs(a - b) for a, b in zip(got.logprobs, want.logprobs)) <= 1e-4


def test_requests_resume_and_give_the_uncached_tokens(model, uncached):
    first = _ids(700, 1)
    branch = first[:600] + _ids(90, 2)  # shares 600 tokens: resumes at the 512 boundary
    with Engine(model, max_batch=2, max_context=CTX, prefix_cache=PrefixCache.for_model(model)) as eng:
        a = eng.generate(first, GREEDY)
        b = eng.generate(branch, GREEDY)
        # the next turn of the first conversation: resumes where it stopped (its last token is not in its row)
        turn = first + a.tokens + _ids(40, 3)
        c = eng.generate(turn, GREEDY)
        m = eng.metrics()["prefix_cache"]
    assert (a.cached_tokens, b.cached_tokens, c.cached_tokens) == (0, 512, len(first) + len(a.tokens) - 1)
    for got, prompt in ((a, first), (b, branch), (c, turn)):
        _same(got, uncached(prompt))
    assert (m["requests_hit"], m["requests_missed"], m["errors"]) == (2, 1, 0)
    assert m["hit_tokens"] == b.cached_tokens + c.cached_tokens
    assert m["miss_tokens"] == len(first) + len(branch) + len(turn) - m["hit_tokens"]


def test_two_running_requests_share_their_common_prefix(model, uncached):
    """Admitted in the same step, both start at 0: the second waits while the first computes each common
    block, then resumes from its snapshot, so the 512 common tokens are computed once."""
    common = _ids(600, 4)
    one, two = common + _ids(50, 5), common + _ids(70, 6)
    eng = Engine(model, max_batch=2, max_context=CTX, prefix_cache=PrefixCache.for_model(model))
    h1, h2 = eng.submit(one, GREEDY), eng.submit(two, GREEDY)  # both queued before the scheduler starts
    try:
        r1, r2 = h1.result(120), h2.result(120)
        m = eng.metrics()["prefix_cache"]
    finally:
        eng.stop()
    assert (r1.cached_tokens, r2.cached_tokens) == (0, 512)
    assert m["miss_tokens"] == len(one) + len(two) - 512
    _same(r1, uncached(one))
    _same(r2, uncached(two))


def test_a_small_budget_evicts_while_requests_run(model, uncached):
    prompts = [_ids(560, 10 + i // 2) + _ids(20, 20 + i) for i in range(6)]  # three prefixes, two of each
    probe = model.new_session(1, max_context=CTX)
    probe.forward(torch.tensor([prompts[0][:256]]))
    one = probe.snapshot(0).nbytes  # a boundary snapshot of one block
    cache = PrefixCache.for_model(model, memory_bytes=3 * one)
    with Engine(model, max_batch=4, max_context=CTX, prefix_cache=cache) as eng:
        handles = [eng.submit(p, GREEDY) for p in prompts]
        results = [h.result(300) for h in handles]
    st = cache.stats()["memory"]
    assert st["evictions"] > 0 and st["bytes"] <= st["capacity"] and st["held"] == 0
    for got, p in zip(results, prompts):
        _same(got, uncached(p))


def test_usage_and_metrics_over_http(model):
    from fastapi.testclient import TestClient

    from v4c.serve.app import create_app
    prompt = _ids(700, 30)
    with Engine(model, max_batch=2, max_context=CTX, prefix_cache=PrefixCache.for_model(model)) as eng:
        client = TestClient(create_app(eng, model_name="tiny"))
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 3, "temperature": 0}
        cold = client.post("/v1/completions", json=body).json()["usage"]
        warm = client.post("/v1/completions", json=body).json()["usage"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                            "stream_options": {"include_usage": True}}) as r:
            lines = [ln for ln in r.iter_lines() if ln.startswith("data: {")]
        streamed = json.loads(lines[-1][6:])["usage"]
        metrics = client.get("/metrics").text
    assert cold["prompt_tokens_details"] == {"cached_tokens": 0} and cold["prompt_cache_miss_tokens"] == 700
    assert warm["prompt_tokens_details"] == {"cached_tokens": 512}
    assert (warm["prompt_cache_hit_tokens"], warm["prompt_cache_miss_tokens"]) == (512, 188)
    assert streamed["prompt_cache_hit_tokens"] == 512
    for line in ('v4c_prefix_cache_hits_total{model_name="tiny"} 2', 'v4c_prefix_cache_misses_total{model_name="tiny"} 1',
                 'v4c_prefix_cache_hit_tokens_total{model_name="tiny"} 1024',
                 'v4c_prefix_cache_entries{model_name="tiny",tier="memory"}',
                 'v4c_prefix_cache_evictions_total{model_name="tiny",tier="memory"} 0'):
        assert line in metrics, line


def test_a_restarted_server_resumes_from_disk(model, uncached, tmp_path):
    prompt = _ids(600, 40)
    first = PrefixCache.for_model(model, disk_dir=tmp_path)
    with Engine(model, max_batch=2, max_context=CTX, prefix_cache=first) as eng:
        assert eng.generate(prompt, GREEDY).cached_tokens == 0
    first.close()  # what `v4c serve` does on its way out: the queued writes land
    again = PrefixCache.for_model(model, disk_dir=tmp_path, memory_bytes=0)
    with Engine(model, max_batch=2, max_context=CTX, prefix_cache=again) as eng:
        got = eng.generate(prompt[:590] + _ids(10, 41), GREEDY)
        m = eng.metrics()["prefix_cache"]
    assert got.cached_tokens == 512 and m["disk"]["reads"] == 1
    _same(got, uncached(prompt[:590] + _ids(10, 41)))


def test_serve_flags(capsys):
    a = build_parser().parse_args(["serve", "x.v4c", "--prefix-cache-bytes", "512M", "--context-cache-dir", "/tmp/c",
                                   "--context-cache-bytes", "2G"])
    assert (a.prefix_cache_bytes, a.context_cache_dir, a.context_cache_bytes) == (512 << 20, "/tmp/c", 2 << 30)
    assert build_parser().parse_args(["serve", "x.v4c"]).prefix_cache_bytes is None  # the default: 1 GiB
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "x.v4c", "--prefix-cache-bytes", "lots"])
    assert "'lots' is not a byte count" in capsys.readouterr().err


def test_serve_builds_the_cache_its_flags_ask_for(model, tmp_path):
    from v4c.serve.app import _prefix_cache
    assert _prefix_cache(model, 0, None, None) is None
    c = _prefix_cache(model, None, tmp_path, 1 << 20)
    assert c.stats()["memory"]["capacity"] == 1 << 30 and c.stats()["disk"]["capacity"] == 1 << 20
