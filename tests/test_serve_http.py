"""`v4c serve` over HTTP: a tiny random model with the test tokenizer behind uvicorn on a loopback port,
driven by the real OpenAI client (and raw HTTP where the client hides what is checked)."""
import ast
import asyncio
import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

fastapi = pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import torch  # noqa: E402

import v4c  # noqa: E402
from serve_tokenizer import write_test_tokenizer  # noqa: E402
from v4c.serve import Engine, Finished, TokenEvent  # noqa: E402
from v4c.serve.app import create_app  # noqa: E402
from v4c.serve.chat import encode_messages, parse_output  # noqa: E402
from v4c.serve.tokenizer import IncrementalDetokenizer, ServeTokenizer, StopStrings, load_tokenizer  # noqa: E402
from serve_helpers import uvicorn_server  # noqa: E402

CONTEXT = 128
EOS = 1  # the tiny config's eos_token_id, and the test tokenizer's <｜end▁of▁sentence｜>
METRIC_NAMES = ("v4c_http_requests_total", "v4c_requests_total", "v4c_requests_running", "v4c_requests_waiting",
                "v4c_prompt_tokens_total", "v4c_generation_tokens_total", "v4c_time_to_first_token_seconds_bucket",
                "v4c_time_per_output_token_seconds_bucket", "v4c_e2e_request_latency_seconds_bucket",
                "v4c_kv_cache_bytes_in_use", "v4c_kv_cache_bytes_capacity", "v4c_batch_size_bucket",
                "v4c_steps_total")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny random model (its vocabulary the test tokenizer's) compiled with the tokenizer, an engine
    of 8 rows x 128 tokens, and the app on a loopback port."""
    root = tmp_path_factory.mktemp("serve")
    ckpt = root / "ckpt"
    write_test_tokenizer(ckpt, 1024)
    from tokenizers import Tokenizer

    from v4c.model.presets import tiny_config_dict
    from v4c.model.random_weights import write_random_checkpoint
    config = tiny_config_dict()
    config["vocab_size"] = Tokenizer.from_file(str(ckpt / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    write_random_checkpoint(config, ckpt, seed=0)
    art = v4c.compile(ckpt, root / "tiny-chat", target="cpu")
    model = v4c.load(art)
    tok = load_tokenizer(art)
    assert tok is not None, "the compiler copies the checkpoint's tokenizer.json into the artifact"
    engine = Engine(model, max_batch=8, max_context=CONTEXT, max_queue=64).start()
    app = create_app(engine, model_name=Path(art).name, tokenizer=tok)
    try:
        with uvicorn_server(app) as base:
            yield SimpleNamespace(base=base, model=model, tok=tok, engine=engine, art=Path(art),
                                  name=Path(art).name, vocab=config["vocab_size"])
    finally:
        engine.stop()


def _client(base, **kw):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, timeout=120, **kw)


def _extra(obj, key):
    """A field the OpenAI client's models do not declare (reasoning_content, token_ids)."""
    v = getattr(obj, key, None)
    if v is None and getattr(obj, "model_extra", None):
        v = obj.model_extra.get(key)
    return v


def _greedy(model, ids, n):
    """What `model.generate` gives for ``ids``, up to (without) the EOS; and whether it stopped there."""
    out = model.generate(torch.tensor([ids]), n)[0, len(ids):].tolist()
    return (out[:out.index(EOS)], True) if EOS in out else (out, False)


def _running(base) -> float:
    text = httpx.get(f"{base}/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("v4c_requests_running"))
    return float(line.rsplit(" ", 1)[1])


# ---------------------------------------------------------------------------------------------- routes

def test_health_models_and_metrics(served):
    r = httpx.get(f"{served.base}/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    assert [m.id for m in _client(served.base).models.list().data] == ["tiny-chat"]
    r = httpx.get(f"{served.base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in METRIC_NAMES:
        assert name in r.text, name
    r = httpx.get(f"{served.base}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_greedy_completion_over_http_equals_generate(served):
    ids = [5, 17, 42, 99, 7, 300, 12, 64]
    want, stopped = _greedy(served.model, ids, 12)
    r = _client(served.base).completions.create(model=served.name, prompt=ids, max_tokens=12, temperature=0,
                                                extra_body={"return_token_ids": True})
    c = r.choices[0]
    assert _extra(c, "token_ids") == want
    assert c.finish_reason == ("stop" if stopped else "length")
    assert c.text == served.tok.decode(want, skip_special_tokens=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want) + stopped)
    assert r.usage.total_tokens == len(ids) + len(want) + stopped


def test_text_prompt_streaming_echo_and_logprobs(served):
    cl = _client(served.base)
    prompt = "The capital of France is"
    a = cl.completions.create(model=served.name, prompt=prompt, max_tokens=10, temperature=0)
    text = a.choices[0].text
    chunks = list(cl.completions.create(model=served.name, prompt=prompt, max_tokens=10, temperature=0, stream=True,
                                        stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == a.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == a.usage.completion_tokens  # the usage chunk comes last
    e = cl.completions.create(model=served.name, prompt=prompt, max_tokens=10, temperature=0, echo=True)
    assert e.choices[0].text == prompt + text
    lp = cl.completions.create(model=served.name, prompt=prompt, max_tokens=10, temperature=0, logprobs=3)
    assert lp.choices[0].text == text
    got = lp.choices[0].logprobs
    n = lp.usage.completion_tokens - (lp.choices[0].finish_reason == "stop")
    assert len(got.tokens) == len(got.token_logprobs) == len(got.top_logprobs) == n > 0
    for chosen, top in zip(got.token_logprobs, got.top_logprobs):
        assert 1 <= len(top) <= 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy: the most likely token


def test_stop_string_trims_and_stops(served):
    cl = _client(served.base)
    prompt = "Think step by step"
    full = cl.completions.create(model=served.name, prompt=prompt, max_tokens=16, temperature=0,
                                 extra_body={"ignore_eos": True})
    text = full.choices[0].text
    assert len(text) >= 6, text
    k = len(text) // 2
    stop = text[k:k + 2]
    cut = text[:text.index(stop)]
    r = cl.completions.create(model=served.name, prompt=prompt, max_tokens=16, temperature=0, stop=[stop],
                              extra_body={"ignore_eos": True})
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert r.usage.completion_tokens < 16
    s = cl.completions.create(model=served.name, prompt=prompt, max_tokens=16, temperature=0, stop=stop,
                              stream=True, extra_body={"ignore_eos": True})
    chunks = list(s)
    assert "".join(ch.choices[0].text for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


# ------------------------------------------------------------------------------------------------ chat

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.parametrize("thinking", [False, True])
def test_chat_plain_thinking_and_streaming(served, thinking):
    cl = _client(served.base)
    kw = dict(model=served.name, messages=MESSAGES, max_tokens=12, temperature=0,
              extra_body={"chat_template_kwargs": {"thinking": thinking}})
    r = cl.chat.completions.create(**kw)
    msg = r.choices[0].message
    # the same prompt as a completion, its raw output through the chat parser: what chat must answer
    ids = served.tok.encode(encode_messages(MESSAGES, thinking=thinking), add_special_tokens=False)
    raw = cl.completions.create(model=served.name, prompt=ids, max_tokens=12, temperature=0,
                                extra_body={"return_token_ids": True})
    reasoning, content, calls = parse_output(served.tok.decode(_extra(raw.choices[0], "token_ids")), thinking)
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == raw.usage.completion_tokens
    assert msg.role == "assistant" and msg.content == content
    assert _extra(msg, "reasoning_content") == reasoning
    if not thinking:
        assert not reasoning
    chunks = list(cl.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    streamed_reasoning = "".join(_extra(ch.choices[0].delta, "reasoning_content") or "" for ch in chunks)
    assert streamed == (content or "") and streamed_reasoning == (reasoning or "")
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


class _ScriptedEngine:
    """An engine whose every request "generates" the tokens of a fixed text, then EOS: the app's
    reply building (reasoning, content, tool calls) on model output chosen by the test."""

    def __init__(self, tok, text):
        self.ids = tok.encode(text, add_special_tokens=False)
        self.max_context = 4096

    def submit(self, prompt, params):
        ids = self.ids

        class Handle:
            prompt_tokens = len(prompt)

            async def aevents(self):
                for t in ids:
                    await asyncio.sleep(0)
                    yield TokenEvent(t)
                yield Finished("stop", len(prompt), len(ids) + 1, stop_token=EOS)

            def cancel(self, reason="cancelled"):
                pass

        return Handle()

    def metrics(self):
        return {}


CALL = ('<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        '</｜DSML｜invoke>\n</｜DSML｜tool_calls>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "the weather",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}, "days": {"type": "integer"}}}}}]


@pytest.mark.parametrize("output,thinking,reasoning,content", [
    ("I should look it up.</think>Let me check.\n\n" + CALL, True, "I should look it up.", "Let me check."),
    ("I need the weather first.\n\n" + CALL + "</think>Checking.", True, "I need the weather first.", "Checking."),
    (CALL, False, None, None),
])
def test_tool_calls_become_openai_tool_calls(served, output, thinking, reasoning, content):
    app = create_app(_ScriptedEngine(served.tok, output), model_name="scripted", tokenizer=served.tok,
                     vocab_size=served.vocab, reasoning=thinking)
    with uvicorn_server(app) as base:
        cl = _client(base)
        kw = dict(model="scripted", messages=MESSAGES, tools=TOOLS)
        r = cl.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == \
            [("get_weather", {"city": "Paris", "days": 3})]
        assert msg.tool_calls[0].id.startswith("call_")
        assert msg.content == content and _extra(msg, "reasoning_content") == reasoning
        chunks = list(cl.chat.completions.create(**kw, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
        think = "".join(_extra(ch.choices[0].delta, "reasoning_content") or "" for ch in chunks)
        calls = [c for ch in chunks for c in (ch.choices[0].delta.tool_calls or ())]
        assert "DSML" not in text and "DSML" not in think
        assert text == (content or "") and think == (reasoning or "")
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].id.startswith("call_")
        assert (calls[0].function.name, json.loads(calls[0].function.arguments)) == \
            ("get_weather", {"city": "Paris", "days": 3})
        assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_malformed_model_output_comes_back_as_text(served):
    bad = 'Sure.<｜DSML｜tool_calls>\n<｜DSML｜invoke name="get_weather">\nnot a parameter'
    app = create_app(_ScriptedEngine(served.tok, bad), model_name="scripted", tokenizer=served.tok,
                     vocab_size=served.vocab)
    with uvicorn_server(app) as base:
        cl = _client(base)
        r = cl.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS)
        assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
        assert r.choices[0].message.content.startswith("Sure.") and "not a parameter" in r.choices[0].message.content
        chunks = list(cl.chat.completions.create(model="scripted", messages=MESSAGES, tools=TOOLS, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content


# ---------------------------------------------------------------------------------------------- errors

_LONG = list(range(2, CONTEXT + 10))
BAD = [  # (route, body, status, the field the error names)
    ("completions", "{not json", 400, None),
    ("completions", "[1, 2]", 400, None),
    ("completions", {"model": "gpt-4", "prompt": [5]}, 400, "model"),
    ("completions", {"prompt": [5], "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"prompt": [5], "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("completions", {"prompt": _LONG, "max_tokens": 1}, 400, "prompt"),
    ("completions", {"prompt": [5, 10**6]}, 400, "prompt"),
    ("completions", {"prompt": [-1]}, 400, "prompt"),
    ("completions", {"prompt": [5, "x"]}, 400, "prompt"),
    ("completions", {"prompt": [5], "temperature": -0.5}, 400, "temperature"),
    ("completions", '{"prompt": [5], "temperature": NaN}', 400, "temperature"),
    ("completions", {"prompt": [5], "top_p": 0}, 400, "top_p"),
    ("completions", {"prompt": [5], "top_p": 1.5}, 400, "top_p"),
    ("completions", {"prompt": [5], "logprobs": 50}, 400, "logprobs"),
    ("completions", {"prompt": [5], "stop": [{"a": 1}]}, 400, "stop"),
    ("completions", {"prompt": [5], "n": 3}, 400, "n"),
    ("completions", {"max_tokens": 3}, 400, "prompt"),
    ("chat/completions", {"messages": "hello"}, 400, "messages"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {"messages": MESSAGES, "tools": "x"}, 400, "tools"),
    ("chat/completions", {"messages": MESSAGES, "reasoning_effort": "extreme"}, 400, "reasoning_effort"),
    ("chat/completions", {"messages": MESSAGES, "chat_template_kwargs": {"thinking": "yes"}}, 400,
     "chat_template_kwargs.thinking"),
]


def test_bad_requests_name_their_field_and_the_server_goes_on(served):
    with httpx.Client(base_url=f"{served.base}/v1", timeout=60) as h:
        for route, body, status, param in BAD:
            data = body if isinstance(body, str) else json.dumps(body)
            r = h.post(f"/{route}", content=data, headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], err
            assert err["param"] == param, (body, err)
            if param:
                assert param.split("[")[0].split(".")[0] in err["message"], err
        r = h.post("/completions", content=b"{" + b" " * (9 << 20) + b"}", headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        _client(served.base).completions.create(model=served.name, prompt=[5], temperature=-1)
    assert e.value.status_code == 400 and "temperature" in str(e.value)
    r = _client(served.base).completions.create(model=served.name, prompt=[5, 6], max_tokens=2, temperature=0)
    assert r.usage.prompt_tokens == 2  # served normally after all that


def test_without_a_tokenizer_token_ids_still_work(served):
    app = create_app(served.engine, model_name="no-tok", tokenizer=None)
    with uvicorn_server(app) as base:
        h = httpx.Client(base_url=f"{base}/v1", timeout=60)
        r = h.post("/completions", json={"prompt": "hello", "max_tokens": 2})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
        r = h.post("/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
        ids = [5, 17, 42, 99]
        want, stopped = _greedy(served.model, ids, 4)
        r = h.post("/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want
        assert r.json()["choices"][0]["text"] == "".join(f"{t} " for t in want)


def test_api_key(served):
    app = create_app(served.engine, model_name="locked", tokenizer=served.tok, api_key="s3cret")
    with uvicorn_server(app) as base:
        assert httpx.get(f"{base}/health").status_code == 200
        for path in ("/v1/models", "/metrics"):
            r = httpx.get(f"{base}{path}")
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.post(f"{base}/v1/completions", json={"prompt": [5]}).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            _client(base, api_key="wrong").models.list()
        cl = _client(base, api_key="s3cret")
        assert [m.id for m in cl.models.list().data] == ["locked"]
        assert cl.completions.create(model="locked", prompt=[5], max_tokens=1).usage.completion_tokens == 1


def test_queue_full_is_429_with_retry_after(served):
    engine = Engine(served.model, max_batch=1, max_context=CONTEXT, max_queue=1)
    forward = engine.session.forward_rows

    def slow_forward(*a, **kw):  # ~6 s for the first request's tokens: the queue stays full meanwhile
        time.sleep(0.05)
        return forward(*a, **kw)

    engine.session.forward_rows = slow_forward
    engine.start()
    app = create_app(engine, model_name="small", tokenizer=served.tok)
    try:
        with uvicorn_server(app) as base, httpx.Client(base_url=f"{base}/v1", timeout=60) as h:
            body = {"prompt": [5, 6, 7], "max_tokens": CONTEXT - 3, "ignore_eos": True, "stream": True}
            with h.stream("POST", "/completions", json=body) as first:
                lines = first.iter_lines()  # (kept: a dropped iterator closes the connection)
                next(lines)  # running: it holds the row
                with h.stream("POST", "/completions", json=body) as second:  # waiting
                    assert second.status_code == 200
                    assert (engine.metrics()["running"], engine.metrics()["waiting"]) == (1, 1)
                    r = h.post("/completions", json={"prompt": [5], "max_tokens": 1})
                    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    with pytest.raises(openai.RateLimitError):
                        _client(base).completions.create(model="small", prompt=[5], max_tokens=1)
            deadline = time.monotonic() + 20  # both clients gone: both requests cancelled
            while engine.metrics()["running"] + engine.metrics()["waiting"] and time.monotonic() < deadline:
                time.sleep(0.05)
            assert engine.metrics()["running"] == engine.metrics()["waiting"] == 0
            assert _client(base).completions.create(model="small", prompt=[5], max_tokens=1).usage.total_tokens == 2
    finally:
        engine.stop()


# --------------------------------------------------------------------------------------- concurrency

def test_64_concurrent_streams_each_get_their_greedy_tokens(served):
    rng = random.Random(0)
    prompts = [[rng.randrange(2, served.vocab) for _ in range(rng.randrange(3, 12))] for _ in range(16)]
    want = [_greedy(served.model, p, 4)[0] for p in prompts]
    client = openai.AsyncOpenAI(base_url=f"{served.base}/v1", api_key="none", max_retries=0, timeout=300)

    async def one(i):
        s = await client.completions.create(model=served.name, prompt=prompts[i % 16], max_tokens=4, temperature=0,
                                            stream=True, extra_body={"return_token_ids": True})
        toks, finish = [], None
        async for ch in s:
            toks += _extra(ch.choices[0], "token_ids") or []
            finish = ch.choices[0].finish_reason or finish
        return toks, finish

    async def main():
        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await client.close()

    got = asyncio.run(main())
    for i, (toks, finish) in enumerate(got):
        assert toks == want[i % 16], i
        assert finish == ("length" if len(toks) == 4 else "stop")


def test_client_disconnect_frees_its_row(served):
    before = served.engine.metrics()["requests_total"]["cancelled"]
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", f"{served.base}/v1/completions",
                      json={"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert _running(served.base) == 1
    deadline = time.monotonic() + 20
    while _running(served.base) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _running(served.base) == 0
    assert served.engine.metrics()["requests_total"]["cancelled"] == before + 1


# ------------------------------------------------------------------------------------------ the pieces

def test_incremental_detokenizer_and_stop_strings(served):
    tok = served.tok
    text = "Héllo wörld, 你好 🎉 <think>x</think> done"
    ids = tok.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tok, [5, 6])
    pieces = [d.push(t) for t in ids] + [d.flush()]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces[:-1])
    rng = random.Random(1)
    for _ in range(20):  # any tokens: the pieces join to the whole decode
        ids = [rng.randrange(served.vocab) for _ in range(20)]
        d = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
        assert "".join([d.push(t) for t in ids] + [d.flush()]) == tok.decode(ids, skip_special_tokens=True)
    s = StopStrings(["abc", "xy"])
    assert [s.feed(p) for p in ["12a", "b", "x", "zzab", "c tail"]] == ["12", "", "ab", "xzz", ""]
    assert s.hit == "abc"
    s = StopStrings(["END"])
    assert s.feed("all E") == "all " and s.feed("N") == "" and s.flush() == "EN"
    assert isinstance(tok, ServeTokenizer) and tok.token_text(10**6) == "token_id:1000000"


def test_nothing_below_the_server_imports_it():
    root = Path(v4c.__file__).parent
    bad = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] == "serve" or rel == Path("cli.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            bad += [f"{rel}: {n}" for n in names if "serve" in n.split(".")]
    assert not bad, bad


def test_the_v4c_serve_command(served):
    import subprocess
    import sys
    from serve_process import free_port, wait_healthy
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "v4c.cli", "serve", str(served.art), "--port", str(port),
                          "--max-batch", "2", "--max-context", "64", "--api-key", "k", "--log-level", "warning"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(p, base)
        assert httpx.get(f"{base}/v1/models").status_code == 401
        cl = _client(base, api_key="k")
        assert [m.id for m in cl.models.list().data] == ["tiny-chat"]
        assert cl.models.retrieve("tiny-chat").max_model_len == 64
        r = cl.completions.create(model="tiny-chat", prompt="Hello", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
    finally:
        p.terminate()
        out = p.communicate(timeout=60)[0]
    assert p.returncode in (0, 143, -15), out
    assert f"on http://127.0.0.1:{port}/v1" in out


@pytest.mark.parametrize("variant", ["tiny", "pro_like"])
def test_greedy_over_http_equals_transformers(tmp_path, variant):
    """An HF-named checkpoint built with transformers' own DeepseekV4ForCausalLM: greedy completions
    served to concurrent clients (prompts of different lengths, batched together) are transformers'
    greedy tokens, EOS ignored on both sides."""
    from concurrent.futures import ThreadPoolExecutor

    from hf_reference import VARIANTS, hf_greedy, make_hf_model, save_checkpoint
    cfg = VARIANTS[variant]
    hf = make_hf_model(cfg, seed=1)
    save_checkpoint(hf, cfg, tmp_path / "ckpt")
    art = v4c.compile(tmp_path / "ckpt", tmp_path / "art", target="cpu")
    engine = Engine(v4c.load(art), max_batch=4, max_context=64, step_tokens=16).start()
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, cfg["vocab_size"], (1, n), generator=g) for n in (5, 11, 23)]
    n_new = 12
    want = [hf_greedy(hf, p, n_new)[0, p.shape[1]:].tolist() for p in prompts]
    try:
        with uvicorn_server(create_app(engine, model_name="hf", vocab_size=cfg["vocab_size"])) as base:
            client = _client(base)

            def ask(p):
                r = client.completions.create(model="hf", prompt=p[0].tolist(), max_tokens=n_new, temperature=0,
                                              extra_body={"return_token_ids": True, "ignore_eos": True})
                return _extra(r.choices[0], "token_ids"), r.choices[0].finish_reason

            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(pool.map(ask, prompts))
    finally:
        engine.stop()
    for (tokens, reason), w in zip(got, want):
        assert reason == "length" and tokens == w
