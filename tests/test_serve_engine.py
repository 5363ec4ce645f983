"""The continuous-batching engine (``v4c.serve.Engine``) without HTTP, on the tiny random model (f32)."""
import asyncio
import threading
import time

import pytest
import torch

import v4c
from v4c.serve import Engine, Finished, QueueFullError, SamplingParams, TokenEvent
from serve_helpers import assert_agrees, greedy_reference

CTX = 128


@pytest.fixture(scope="module")
def model(tiny_artifact):
    return v4c.load(tiny_artifact, device="cpu")


def _prompt(model, n, seed):
    return torch.randint(0, model.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _wait(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_a_greedy_request_alone_is_generate_exactly(model):
    prompt = _prompt(model, 10, 1)
    want = model.generate(torch.tensor([prompt]), 8)[0, 10:].tolist()
    ref, ref_logits = greedy_reference(model, prompt, 8)
    assert ref == want
    with Engine(model, max_batch=4, max_context=CTX, step_tokens=32) as engine:
        handle = engine.submit(prompt, SamplingParams(max_tokens=8, ignore_eos=True, logprobs=3))
        events = list(handle.events(timeout=60))
        done = handle.result(timeout=1)
        m = engine.metrics()
    # alone, the prefill is one call and every step a one-row call: the same calls as generate, bit for bit
    assert [e.token for e in events[:-1]] == want == done.tokens
    assert events[-1] == Finished("length", 10, 8)
    assert done.finish_reason == "length" and (done.prompt_tokens, done.completion_tokens) == (10, 8)
    for ev, lg in zip(events[:-1], ref_logits):  # the model's own log-probabilities, the chosen one first
        lp = torch.log_softmax(lg, dim=-1)
        assert ev.logprob == pytest.approx(float(lp[ev.token]), abs=1e-5)
        assert len(ev.top_logprobs) == 3 and ev.top_logprobs[0][0] == ev.token
        assert [b for _, b in ev.top_logprobs] == pytest.approx(lp.topk(3).values.tolist(), abs=1e-5)
    assert done.logprobs == [e.logprob for e in events[:-1]]
    assert m["requests_total"] == {"stop": 0, "length": 1, "cancelled": 0, "error": 0}
    assert (m["prompt_tokens_total"], m["generation_tokens_total"], m["running"], m["waiting"]) == (10, 8, 0, 0)
    assert m["ttft_seconds"]["count"] == m["e2e_seconds"]["count"] == m["tpot_seconds"]["count"] == 1
    assert m["steps_total"] >= 8 and m["kv_cache_bytes_in_use"] == 0
    assert m["kv_cache_bytes_capacity"] == engine.session.memory()["total"]


def test_sixteen_at_once_agree_with_each_alone(model):
    """16 greedy requests at once, prompts of 1 to 75 tokens (prefilled in chunks of what the step's budget
    of 64 leaves, beside the rows already decoding), each gives its lone generate tokens (up to exact ties)."""
    lengths = [1, 75, 3, 40, 9, 33, 17, 60, 2, 48, 12, 5, 70, 25, 16, 8]
    prompts = [_prompt(model, n, 100 + i) for i, n in enumerate(lengths)]
    news = [6 + i % 3 for i in range(16)]
    with Engine(model, max_batch=16, max_context=CTX, step_tokens=64) as engine:
        handles = [engine.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p, n in zip(prompts, news)]
        got = [h.result(timeout=120) for h in handles]
        m = engine.metrics()
    assert m["batch_size"]["buckets"][8] < m["batch_size"]["count"]  # some steps ran more than 8 requests
    assert m["requests_total"]["length"] == 16 and m["prompt_tokens_total"] == sum(lengths)
    for i, (p, n, c) in enumerate(zip(prompts, news, got)):
        assert c.finish_reason == "length" and c.completion_tokens == n
        want, logits = greedy_reference(model, p, n)
        assert_agrees(c.tokens, want, logits, f"request {i} (prompt of {len(p)})")


def test_stop_tokens_and_eos(model):
    prompt = _prompt(model, 7, 2)
    want, _ = greedy_reference(model, prompt, 6)
    k = 3
    while want[k] in want[:k]:  # a token that first appears at position k
        k += 1
    with Engine(model, max_batch=2, max_context=CTX) as engine:
        c = engine.generate(prompt, SamplingParams(max_tokens=6, stop_token_ids=(want[k],)), timeout=60)
        assert (c.finish_reason, c.tokens, c.stop_token, c.completion_tokens) == ("stop", want[:k], want[k], k + 1)
        engine.eos_token_ids = frozenset({want[k]})  # as if it were the model's EOS
        c = engine.generate(prompt, SamplingParams(max_tokens=6), timeout=60)
        assert (c.finish_reason, c.tokens) == ("stop", want[:k])
        c = engine.generate(prompt, SamplingParams(max_tokens=6, ignore_eos=True), timeout=60)
        assert (c.finish_reason, c.tokens) == ("length", want)
    assert model.config.eos_token_id in Engine(model, max_batch=1, max_context=16).eos_token_ids


def test_cancel_frees_the_row_for_a_waiting_request_and_the_queue_is_bounded(model):
    with Engine(model, max_batch=2, max_context=CTX, max_queue=1) as engine:
        params = SamplingParams(max_tokens=120, ignore_eos=True)
        a, b = engine.submit(_prompt(model, 5, 3), params), engine.submit(_prompt(model, 6, 4), params)
        next(a.events(timeout=30)), next(b.events(timeout=30))  # both hold a row
        c = engine.submit(_prompt(model, 4, 5), SamplingParams(max_tokens=3, ignore_eos=True))
        m = engine.metrics()
        assert (m["running"], m["waiting"]) == (2, 1)
        assert m["kv_cache_bytes_in_use"] == m["kv_cache_bytes_capacity"]  # 2 rows of 2
        with pytest.raises(QueueFullError, match="2 running") as full:
            engine.submit(_prompt(model, 4, 6), params)
        assert full.value.retry_after >= 1
        a.cancel()
        evs = list(a.events(timeout=30))
        assert evs[-1].reason == "cancelled" and all(isinstance(e, TokenEvent) for e in evs[:-1])
        assert c.result(timeout=30).finish_reason == "length"  # admitted into a's row
        _wait(lambda: engine.metrics()["running"] == 1)
        b.cancel("client disconnected")
        assert b.result(timeout=30).finish_reason == "client disconnected"
        d = engine.submit(_prompt(model, 4, 7), params)
        next(d.events(timeout=30))
        a.cancel()  # already finished: nothing happens
    # leaving the with: stop() cancels what still runs and joins the thread
    assert d.result(timeout=1).finish_reason == "cancelled"
    m = engine.metrics()
    assert m["requests_total"] == {"stop": 0, "length": 1, "cancelled": 3, "error": 0}
    assert (m["running"], m["waiting"]) == (0, 0)
    with pytest.raises(RuntimeError, match="stopped"):
        engine.submit(_prompt(model, 4, 8), params)


def test_bad_parameters_name_their_field(model):
    v = model.config.vocab_size
    for kw, field in ((dict(max_tokens=0), "max_tokens"), (dict(max_tokens=2.0), "max_tokens"),
                      (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
                      (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=float("nan")), "top_p"),
                      (dict(logprobs=21), "logprobs"), (dict(logprobs=-1), "logprobs"), (dict(seed="1"), "seed"),
                      (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(ignore_eos=1), "ignore_eos")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kw)
    engine = Engine(model, max_batch=1, max_context=CTX)  # never started: a refused request starts nothing
    for prompt, params, field in (([], None, "prompt"), ([v], None, "prompt"), ([-1, 2], None, "prompt"),
                                  ([1.5], None, "prompt"), ("abc", None, "prompt"),
                                  ([1] * CTX, SamplingParams(max_tokens=1), "prompt"),
                                  ([1] * 100, SamplingParams(max_tokens=29), "max_tokens"),
                                  ([1], SamplingParams(stop_token_ids=(v,)), "stop_token_ids")):
        with pytest.raises(ValueError, match=field):
            engine.submit(prompt, params)
    assert engine._thread is None and engine.metrics()["waiting"] == 0
    c = engine.generate([1] * 100, SamplingParams(max_tokens=28, ignore_eos=True), timeout=60)  # just fits
    assert c.completion_tokens == 28
    engine.stop()
    with pytest.raises(ValueError, match="step_tokens"):
        Engine(model, max_batch=8, step_tokens=4)


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    prompt = _prompt(model, 12, 9)
    params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)
    want = model.generate(torch.tensor([prompt]), 8, temperature=0.9, top_p=0.95, seed=7)[0, 12:].tolist()
    with Engine(model, max_batch=6, max_context=CTX, step_tokens=16) as engine:
        alone = engine.generate(prompt, params, timeout=60).tokens
        others = [engine.submit(_prompt(model, n, 20 + n), SamplingParams(max_tokens=6 + n % 4, temperature=t,
                                                                          seed=n, ignore_eos=True))
                  for n, t in ((3, 1.0), (30, 0.0), (9, 0.7), (21, 1.2))]
        mixed = engine.submit(prompt, params)
        late = engine.submit(_prompt(model, 5, 31), SamplingParams(max_tokens=4, temperature=1.0))
        together = mixed.result(timeout=60).tokens
        for h in others + [late]:
            h.result(timeout=60)
        other_seed = engine.generate(prompt, SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=8,
                                                            ignore_eos=True), timeout=60).tokens
    assert alone == want  # alone: generate's calls and its draws, exactly
    # beside others: the request's draws come from its own generator; its logits differ from the lone
    # run's by rounding only (~1e-6), which moves a draw only if it lands that close to a boundary
    assert together == want
    assert other_seed != want


class _FailingPrefill:
    """Makes every prefill-phase forward (a call of more than 16 token slots) raise inside an op."""

    def __init__(self, model):
        self.executor = model.executor

    def __enter__(self):
        self.saved = self.executor.plans

        def boom(*args, **kw):
            raise RuntimeError("op failed on purpose")
        plan = list(self.saved["prefill"])
        plan[len(plan) // 2] = (boom, *plan[len(plan) // 2][1:])
        self.executor.plans = {**self.saved, "prefill": plan}

    def __exit__(self, *exc):
        self.executor.plans = self.saved
        return False


def test_an_op_error_fails_that_call_and_the_engine_goes_on(model):
    short, long_ = _prompt(model, 5, 10), _prompt(model, 40, 11)
    want_short, _ = greedy_reference(model, short, 30)
    want_long, long_logits = greedy_reference(model, long_, 5)
    with Engine(model, max_batch=4, max_context=CTX, step_tokens=64) as engine:
        with _FailingPrefill(model):
            a = engine.submit(short, SamplingParams(max_tokens=30, ignore_eos=True))  # 5 tokens: decode-phase calls
            next(a.events(timeout=30))
            b = engine.submit(long_, SamplingParams(max_tokens=5, ignore_eos=True))  # a 40-token prefill call
            fin = b.result(timeout=30)
            assert fin.finish_reason == "error" and "op failed on purpose" in fin.error and fin.tokens == []
        # the request in the other rows went on untouched: its lone tokens, exactly
        assert a.result(timeout=60).tokens == want_short
        # and the failed call left no mark on the session (read with no call in flight: every call holds
        # the mark while it runs, so a read during request a's steps could see that one's)
        assert engine.session.broken is None
        c = engine.generate(long_, SamplingParams(max_tokens=5, ignore_eos=True), timeout=60)
        assert_agrees(c.tokens, want_long, long_logits, "the request after the error")
        m = engine.metrics()
    assert m["requests_total"]["error"] == 1 and m["requests_total"]["length"] == 2


def test_async_streams_share_the_engine_thread(model):
    prompts = [_prompt(model, n, 40 + n) for n in (4, 9, 20)]
    with Engine(model, max_batch=4, max_context=CTX) as engine:
        threads = threading.active_count()

        async def consume(handle):
            return [ev async for ev in handle.aevents()]

        async def main():
            handles = [engine.submit(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts]
            got = await asyncio.gather(*(consume(h) for h in handles))
            assert threading.active_count() == threads  # no thread per stream
            # bound after the end: the events produced before come first (here: all of them)
            again = await consume(handles[0])
            # leaving a stream early cancels its request
            long_ = engine.submit(prompts[0], SamplingParams(max_tokens=100, ignore_eos=True))
            async for ev in long_.aevents():
                break
            return handles, got, again, long_

        handles, got, again, long_ = asyncio.run(main())
        for h, evs in zip(handles, got):
            assert evs == list(h.events(timeout=1))
            assert [e.token for e in evs[:-1]] == h.result().tokens and evs[-1].reason == "length"
        assert again == got[0]
        assert long_.result(timeout=30).finish_reason == "cancelled"
