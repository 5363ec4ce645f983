"""The HTTP server: a FastAPI app over the continuous-batching ``Engine``, speaking OpenAI's API.

``create_app(engine, ...)`` builds the app (routes, API-key check, error bodies, metrics); ``serve``
loads an artifact and runs the app under uvicorn (``v4c serve``). Every refusal is OpenAI's error body
with the field named; no request can take the server down (each handler's failure is its own 4xx/5xx).
"""
import asyncio  # (no postponed annotations here: FastAPI reads the routes' annotations at definition)
import hmac
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator

from . import openai_api as api
from ..runtime.model import DEFAULT_MAX_CONTEXT
from .requests import Finished, QueueFullError, SamplingParams
from .metrics_text import render as render_metrics
from .tokenizer import IncrementalDetokenizer, ServeTokenizer, StopStrings

DEFAULT_MAX_BODY = 8 << 20  # bytes of request body read at most
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this, so the client sees the 413
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
NO_TOKENIZER = ("the artifact has no tokenizer (its checkpoint had no tokenizer.json when it was compiled): "
                "send the prompt as a list of token ids to /v1/completions")


# --- one request's output: tokens -> text ---------------------------------------------------------

class _Text:
    """Token ids -> released text, with stop strings cut off. Tokens in ``hidden`` (end of sentence,
    stop token ids) end the output without being part of its text."""

    def __init__(self, tok: ServeTokenizer | None, prompt_ids, stops, hidden, skip_special: bool):
        self.tok = tok
        self.detok = IncrementalDetokenizer(tok, prompt_ids, skip_special) if tok is not None else None
        self.stops = StopStrings(stops)
        self.hidden = frozenset(hidden)

    @property
    def stopped(self) -> bool:
        return self.stops.hit is not None

    def push(self, token: int) -> str:
        if token in self.hidden or self.stopped:
            return ""
        piece = self.detok.push(token) if self.detok is not None else f"{token} "
        return self.stops.feed(piece)

    def flush(self) -> str:
        if self.stopped:
            return ""
        tail = self.detok.flush() if self.detok is not None else ""
        return self.stops.feed(tail) + self.stops.flush()


@dataclass
class _Step:
    token: int | None  # None: text released at the end
    text: str
    logprob: float | None = None
    top: Any = None


@dataclass
class _Outcome:
    reason: str = "error"
    completion_tokens: int = 0
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens resumed from the prefix cache


async def _steps(handle, text: _Text, out: _Outcome) -> AsyncIterator[_Step]:
    """The request's tokens as they come, each with the text it releases; ``out`` is filled at the
    end. A stop string cancels the request (its row is freed) with reason "stop"."""
    n = 0
    events = handle.aevents()
    try:
        async for ev in events:
            if isinstance(ev, Finished):
                out.reason, out.error = ev.reason, ev.error
                out.completion_tokens = ev.completion_tokens if ev.completion_tokens is not None else n
                break
            n += 1
            piece = text.push(int(ev.token))
            yield _Step(int(ev.token), piece, ev.logprob, ev.top_logprobs)
            if text.stopped:
                handle.cancel("stop")
                out.reason, out.completion_tokens = "stop", n
                break
        else:
            out.reason, out.completion_tokens = "error", n
            out.error = out.error or "the engine ended the request without finishing it"
        # (a request ended by a stop string never sees its Finished: the handle has the count by then)
        out.cached_tokens = getattr(handle, "cached_tokens", 0)
        tail = text.flush()
        if tail:
            yield _Step(None, tail)
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def _top_pairs(top) -> list[tuple[int, float]]:
    """The engine's top logprobs (pairs, a dict, or objects) as (token, logprob) pairs."""
    if top is None:
        return []
    if isinstance(top, dict):
        return [(int(k), float(v)) for k, v in top.items()]
    pairs = []
    for x in top:
        if isinstance(x, (tuple, list)):
            pairs.append((int(x[0]), float(x[1])))
        else:
            pairs.append((int(getattr(x, "token")), float(getattr(x, "logprob"))))
    return pairs


def _finite(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf (OpenAI's own floor)


# --- the app --------------------------------------------------------------------------------------

class _Server:
    def __init__(self, engine, model_name: str, tokenizer: ServeTokenizer | None, vocab_size: int,
                 max_context: int, api_key: str | None, reasoning: bool, max_body: int, eos_ids):
        self.engine = engine
        self.model_name = model_name
        self.tok = tokenizer
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.api_key = api_key
        self.reasoning = reasoning
        self.max_body = max_body
        self.eos_ids = tuple(eos_ids)
        self.created = api.now()
        self.http_counts: dict[tuple[str, str, int], int] = {}
        self.lock = threading.Lock()

    def count(self, method: str, path: str, status: int) -> None:
        route = path if path in ROUTES or path.startswith("/v1/models/") else "other"
        if route.startswith("/v1/models/"):
            route = "/v1/models/{model}"
        with self.lock:
            k = (method, route, status)
            self.http_counts[k] = self.http_counts.get(k, 0) + 1

    # -- shared pieces --

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise api.APIError(400, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                               param="model", code="model_not_found")

    def check_ids(self, ids: list[int], param: str) -> None:
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab_size:
                raise api.bad(param, f"{param}[{i}] = {t} is outside the vocabulary (token ids are in "
                                     f"[0, {self.vocab_size}))")

    def room(self, req: api.CommonRequest, n_prompt: int, param: str, default: int | None) -> int:
        """max_tokens, checked against the context (``default`` None: the rest of the context)."""
        if n_prompt >= self.max_context:
            raise api.bad(param, f"{param}: the prompt is {n_prompt} tokens; the context is {self.max_context} "
                                 f"tokens (--max-context), which leaves no room for a generated token",
                          code="context_length_exceeded")
        left = self.max_context - n_prompt
        if req.max_tokens is None:
            return left if default is None else min(default, left)
        if req.max_tokens > left:
            raise api.bad("max_tokens", f"max_tokens = {req.max_tokens} is beyond the context: the prompt is "
                                        f"{n_prompt} tokens and the context {self.max_context}, which leaves "
                                        f"{left}", code="context_length_exceeded")
        return req.max_tokens

    def submit(self, ids: list[int], req: api.CommonRequest, max_tokens: int):
        for t in req.stop_token_ids:
            if not 0 <= t < self.vocab_size:
                raise api.bad("stop", f"stop token id {t} is outside the vocabulary (token ids are in "
                                      f"[0, {self.vocab_size}))")
        stop_ids = tuple(dict.fromkeys([*req.stop_token_ids, *(() if req.ignore_eos else self.eos_ids)]))
        try:
            params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                    seed=req.seed, stop_token_ids=stop_ids, logprobs=req.logprobs,
                                    ignore_eos=req.ignore_eos)
            return self.engine.submit(ids, params)
        except QueueFullError as e:
            after = max(1, math.ceil(float(getattr(e, "retry_after", 1) or 1)))
            raise api.APIError(429, f"the server is busy ({e}); retry after {after} s", type="rate_limit_error",
                               code="rate_limit_exceeded", headers={"Retry-After": str(after)}) from None
        except ValueError as e:
            msg = str(e)
            param = msg.split()[0].strip(":=,") if msg else None
            raise api.APIError(400, msg, param=param if param and param.isidentifier() else None) from None

    def token_name(self, t: int) -> str:
        return self.tok.token_text(t) if self.tok is not None else f"token_id:{t}"

    def hidden(self, req: api.CommonRequest) -> set[int]:
        return set(req.stop_token_ids) | set(self.eos_ids)

    # -- completions --

    async def completions(self, request, body) -> Any:
        from starlette.responses import JSONResponse
        req = api.parse_completion(body)
        self.check_model(req.model)
        if req.stop and self.tok is None:
            raise api.bad("stop", "stop strings need a tokenizer, and the artifact has none: give stop token ids")
        if isinstance(req.prompt, str):
            if self.tok is None:
                raise api.bad("prompt", f"a text prompt needs a tokenizer: {NO_TOKENIZER}", code="no_tokenizer")
            ids = await asyncio.to_thread(self.tok.encode, req.prompt, True)
            if not ids:
                raise api.bad("prompt", "prompt is empty (no tokens)")
        else:
            ids = list(req.prompt)
        self.check_ids(ids, "prompt")
        max_tokens = self.room(req, len(ids), "prompt", 16)
        handle = self.submit(ids, req, max_tokens)
        text = _Text(self.tok, ids, req.stop, self.hidden(req), skip_special=True)
        rid, created = api.new_id("cmpl"), api.now()
        echo = ""
        if req.echo:
            echo = self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else \
                "".join(f"{t} " for t in ids)
        if req.stream:
            return _sse_response(request, handle, self._completion_stream(handle, text, req, ids, rid, created, echo))
        out = _Outcome()
        chunks, toks, lps, tops, offsets, gen_ids = [echo], [], [], [], [], []
        pos = len(echo)
        if req.logprobs is not None and req.echo:  # prompt tokens: no logprobs from the engine
            detok, at = (IncrementalDetokenizer(self.tok, (), True) if self.tok is not None else None), 0
            for t in ids:
                toks.append(self.token_name(t)), lps.append(None), tops.append(None), offsets.append(at)
                at += len(detok.push(t)) if detok is not None else len(f"{t} ")
        done = await _until_done_or_disconnect(request, handle, self._collect(handle, text, out, chunks, toks, lps,
                                                                                 tops, offsets, pos, req, gen_ids))
        if not done:
            return JSONResponse(api.error_body("the client went away"), status_code=499)
        _raise_failed(out)
        logprobs = None
        if req.logprobs is not None:
            logprobs = {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
        finish = "length" if out.reason == "length" else "stop"
        body = api.completion(rid, created, self.model_name, "".join(chunks), finish, logprobs,
                              api.usage(len(ids), out.completion_tokens, out.cached_tokens),
                              token_ids=gen_ids if self.want_ids(req) else None)
        return JSONResponse(body)

    def _lp_entry(self, step: _Step, k: int | None):
        if step.token is None:
            return None
        top = None
        if k:
            top = {}
            for t, lp in _top_pairs(step.top)[:k]:
                top.setdefault(self.token_name(t), _finite(lp))
        return self.token_name(step.token), _finite(step.logprob), top

    def want_ids(self, req) -> bool:
        return req.return_token_ids or self.tok is None

    async def _collect(self, handle, text, out, chunks, toks, lps, tops, offsets, pos, req, gen_ids) -> None:
        async for step in _steps(handle, text, out):
            if step.token is not None:
                gen_ids.append(step.token)
            if req.logprobs is not None and step.token is not None and step.token not in text.hidden:
                name, lp, top = self._lp_entry(step, req.logprobs)
                toks.append(name), lps.append(lp), tops.append(top), offsets.append(pos)
            chunks.append(step.text)
            pos += len(step.text)

    async def _completion_stream(self, handle, text, req, ids, rid, created, echo):
        out = _Outcome()
        want_ids = self.want_ids(req)
        if echo:
            yield api.sse(api.completion_chunk(rid, created, self.model_name, echo))
        pos = len(echo)
        async for step in _steps(handle, text, out):
            lp = None
            if req.logprobs is not None and step.token is not None and step.token not in text.hidden:
                name, logp, top = self._lp_entry(step, req.logprobs)
                lp = {"tokens": [name], "token_logprobs": [logp], "top_logprobs": [top], "text_offset": [pos]}
            tids = [step.token] if want_ids and step.token is not None else None
            if step.text or lp is not None or tids:
                yield api.sse(api.completion_chunk(rid, created, self.model_name, step.text, logprobs=lp,
                                                   token_ids=tids))
            pos += len(step.text)
        if out.reason in ("error", "cancelled"):
            yield api.sse(_failure_body(out))
        else:
            yield api.sse(api.completion_chunk(rid, created, self.model_name, "",
                                               "length" if out.reason == "length" else "stop"))
            if req.include_usage:
                yield api.sse(api.usage_chunk(rid, created, self.model_name, "text_completion",
                                              api.usage(len(ids), out.completion_tokens, out.cached_tokens)))
        yield api.sse("[DONE]")

    # -- chat --

    async def chat(self, request, body) -> Any:
        from starlette.responses import JSONResponse
        req = api.parse_chat(body)
        self.check_model(req.model)
        if self.tok is None:
            raise api.APIError(400, f"chat needs a tokenizer: {NO_TOKENIZER}", param="messages",
                               code="no_tokenizer")
        thinking = req.thinking  # the request's mode; else a reasoning_effort asks for thinking; else the default
        if thinking is None:
            thinking = True if req.reasoning_effort is not None else self.reasoning
        from .chat import ChatFormatError, encode_messages
        try:
            prompt = encode_messages(req.messages, tools=req.tools, thinking=thinking,
                                     reasoning_effort=req.reasoning_effort, add_generation_prompt=True)
        except ChatFormatError as e:
            raise api.bad(_chat_param(str(e)), str(e)) from None
        ids = await asyncio.to_thread(self.tok.encode, prompt, False)
        self.check_ids(ids, "messages")
        max_tokens = self.room(req, len(ids), "messages", None)
        handle = self.submit(ids, req, max_tokens)
        text = _Text(self.tok, ids, req.stop, self.hidden(req), skip_special=False)
        rid, created = api.new_id("chatcmpl"), api.now()
        if req.stream:
            return _sse_response(request, handle, self._chat_stream(handle, text, req, ids, rid, created, thinking))
        out = _Outcome()
        raw: list[str] = []
        content_lp: list[dict] = []
        done = await _until_done_or_disconnect(request, handle, self._chat_collect(handle, text, out, raw,
                                                                                      content_lp, req))
        if not done:
            return JSONResponse(api.error_body("the client went away"), status_code=499)
        _raise_failed(out)
        message, calls = api.chat_message("".join(raw), thinking)
        finish = "length" if out.reason == "length" else ("tool_calls" if calls else "stop")
        logprobs = {"content": content_lp} if req.logprobs is not None else None
        return JSONResponse(api.chat_completion(rid, created, self.model_name, message, finish, logprobs,
                                                api.usage(len(ids), out.completion_tokens, out.cached_tokens)))

    def _chat_lp(self, step: _Step, k: int) -> dict:
        def entry(t, lp):
            return {"token": self.token_name(t), "logprob": _finite(lp),
                    "bytes": list(self.tok.token_bytes(t)) if self.tok is not None else None}
        return {**entry(step.token, step.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in _top_pairs(step.top)[:k]]}

    async def _chat_collect(self, handle, text, out, raw, content_lp, req) -> None:
        async for step in _steps(handle, text, out):
            raw.append(step.text)
            if req.logprobs is not None and step.token is not None and step.token not in text.hidden:
                content_lp.append(self._chat_lp(step, req.logprobs))

    async def _chat_stream(self, handle, text, req, ids, rid, created, thinking):
        out = _Outcome()
        parser = _SafeParser(thinking)
        model = self.model_name
        yield api.sse(api.chat_chunk(rid, created, model, {"role": "assistant", "content": ""}))
        async for step in _steps(handle, text, out):
            lp = None
            if req.logprobs is not None and step.token is not None and step.token not in text.hidden:
                lp = {"content": [self._chat_lp(step, req.logprobs)]}
            deltas = parser.feed(step.text) if step.text else []
            for i, d in enumerate(deltas):
                yield api.sse(api.chat_chunk(rid, created, model, d, logprobs=lp if i == 0 else None))
            if lp is not None and not deltas:
                yield api.sse(api.chat_chunk(rid, created, model, {}, logprobs=lp))
        for d in parser.finish():
            yield api.sse(api.chat_chunk(rid, created, model, d))
        if out.reason in ("error", "cancelled"):
            yield api.sse(_failure_body(out))
        else:
            finish = "length" if out.reason == "length" else ("tool_calls" if parser.calls else "stop")
            yield api.sse(api.chat_chunk(rid, created, model, {}, finish))
            if req.include_usage:
                yield api.sse(api.usage_chunk(rid, created, model, "chat.completion.chunk",
                                              api.usage(len(ids), out.completion_tokens, out.cached_tokens)))
        yield api.sse("[DONE]")


class _SafeParser:
    """``ChatStreamParser``'s deltas as OpenAI delta objects; if the parser fails on malformed output,
    the rest of the text passes through as content (never an error)."""

    def __init__(self, thinking: bool):
        from .chat import ChatStreamParser
        self.parser = ChatStreamParser(thinking)
        self.broken = False
        self.calls: dict[int, str] = {}  # tool call index -> its id

    def feed(self, text: str) -> list[dict]:
        if self.broken:
            return [{"content": text}]
        try:
            return self._deltas(self.parser.feed(text))
        except Exception:
            self.broken = True
            return [{"content": text}]

    def finish(self) -> list[dict]:
        if self.broken:
            return []
        try:
            return self._deltas(self.parser.finish())
        except Exception:
            self.broken = True
            return []

    def _deltas(self, deltas) -> list[dict]:
        out = []
        for d in deltas:
            if d.kind == "reasoning":
                if d.text:
                    out.append({"reasoning_content": d.text})
            elif d.kind == "content":
                if d.text:
                    out.append({"content": d.text})
            elif d.kind == "tool_call":
                index = int(getattr(d, "index", None) or 0)
                fn: dict[str, Any] = {}
                call: dict[str, Any] = {"index": index}
                if index not in self.calls:
                    self.calls[index] = getattr(d, "id", None) or api.call_id()
                    call.update(id=self.calls[index], type="function")
                    fn["name"] = d.name or ""
                elif d.name:
                    fn["name"] = d.name
                args = getattr(d, "arguments", None)
                if args is not None:
                    fn["arguments"] = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                elif "name" in fn:
                    fn["arguments"] = ""
                call["function"] = fn
                out.append({"tool_calls": [call]})
        return out


def _chat_param(message: str) -> str:
    """The field a chat-format error names first (``messages[2].content: ...``), else ``messages``."""
    import re
    m = re.match(r"([A-Za-z_]\w*(?:\[\d+\])?(?:\.\w+(?:\[\d+\])?)*)\s*:", message)
    return m.group(1) if m else "messages"


def _failure_body(out: _Outcome) -> dict:
    if out.reason == "cancelled":
        return api.error_body("the request was cancelled (the server is shutting down)", "server_error",
                              code="cancelled")
    return api.error_body(f"generation failed: {out.error or 'engine error'}", "server_error")


def _raise_failed(out: _Outcome) -> None:
    if out.reason == "cancelled":
        raise api.APIError(503, "the request was cancelled (the server is shutting down)", code="cancelled")
    if out.reason == "error":
        raise api.APIError(500, f"generation failed: {out.error or 'engine error'}")


async def _wait_disconnect(request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def _until_done_or_disconnect(request, handle, work) -> bool:
    """Runs ``work``; a client that goes away first cancels the request (frees its row). True: done."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()
            return True
        handle.cancel()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        return False
    finally:
        watch.cancel()
        if not task.done():
            handle.cancel()
            task.cancel()


def _sse_response(request, handle, gen):
    """Server-sent events; the request is cancelled (its row freed) when the client goes away."""
    from starlette.responses import StreamingResponse

    watch = asyncio.ensure_future(_watch(request, handle))  # from now: even before the body starts

    async def body():
        finished = False
        try:
            async for chunk in gen:
                yield chunk
            finished = True
        finally:
            watch.cancel()
            if not finished:
                handle.cancel()
            await gen.aclose()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _watch(request, handle) -> None:
    await _wait_disconnect(request)
    handle.cancel()


async def _read_json(request, limit: int) -> Any:
    cl = request.headers.get("content-length")
    too_big = api.APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    if cl is not None:
        try:
            if int(cl) > DRAIN_LIMIT:
                raise too_big
        except ValueError:
            raise api.APIError(400, "bad Content-Length header") from None
    data, n = bytearray(), 0
    async for chunk in request.stream():
        n += len(chunk)
        if n <= limit:
            data += chunk
        elif n > DRAIN_LIMIT:
            raise too_big
    if n > limit:
        raise too_big
    try:
        return json.loads(bytes(data))
    except (ValueError, RecursionError) as e:
        raise api.APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None


class _Guard:
    """ASGI middleware: the API key (every route but /health) and the request counts by status."""

    def __init__(self, app, server: _Server):
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "")
        status = {"code": 500}

        async def send_counted(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            key = self.server.api_key
            if key is not None and path != "/health" and not _authorized(scope, key):
                from starlette.responses import JSONResponse
                resp = JSONResponse(api.error_body("missing or wrong API key: send Authorization: Bearer KEY",
                                                   "authentication_error", None, "invalid_api_key"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_counted)
            return await self.app(scope, receive, send_counted)
        finally:
            self.server.count(method, path, status["code"])


def _authorized(scope, key: str) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            v = value.decode("latin-1").strip()
            if v[:7].lower() == "bearer " and hmac.compare_digest(v[7:].strip().encode(), key.encode()):
                return True
    return False


def create_app(engine, *, model_name: str, tokenizer: ServeTokenizer | None = None, vocab_size: int | None = None,
               max_context: int | None = None, api_key: str | None = None, reasoning: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY, eos_token_ids=None):
    """The FastAPI app over ``engine`` (started and stopped by its owner, not by the app).

    ``vocab_size`` and ``max_context`` default to the engine's model's; ``eos_token_ids`` (tokens that
    end a reply and are not part of its text) to the tokenizer's end-of-sentence token."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, PlainTextResponse

    model = getattr(engine, "model", None)
    if vocab_size is None:
        vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0) or \
            (tokenizer.vocab_size if tokenizer is not None else 0)
    if max_context is None:
        max_context = getattr(engine, "max_context", None)
    if not max_context:
        raise ValueError("max_context: the engine does not say its context; pass max_context")
    if eos_token_ids is None:
        eos_token_ids = tokenizer.eos_ids() if tokenizer is not None else ()
    s = _Server(engine, model_name, tokenizer, int(vocab_size), int(max_context), api_key, reasoning,
                max_body_bytes, eos_token_ids)
    app = FastAPI(title="v4c", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = s

    def err(e: api.APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(api.APIError)
    async def _api_error(request, e: api.APIError):
        return err(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(api.error_body(msg, kind), status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e):
        return JSONResponse(api.error_body(str(e), "invalid_request_error"), status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request, e):  # a bug answers 500 for its own request; the server goes on
        return JSONResponse(api.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"),
                            status_code=500)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await s.completions(request, await _read_json(request, s.max_body))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await s.chat(request, await _read_json(request, s.max_body))

    def model_card():
        return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "v4c",
                "max_model_len": s.max_context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def one_model(model_id: str):
        if model_id != s.model_name:
            raise api.APIError(404, f"model {model_id!r} is not served here; this server serves {s.model_name!r}",
                               param="model", code="model_not_found")
        return model_card()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": s.model_name}

    @app.get("/metrics")
    async def metrics():
        m = await asyncio.to_thread(s.engine.metrics)
        return PlainTextResponse(render_metrics(m, dict(s.http_counts), s.model_name),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(_Guard, server=s)
    return app


# --- v4c serve ------------------------------------------------------------------------------------

def serve(artifact, *, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_context: int | None = None,
          max_queue: int = 64, api_key: str | None = None, backend: str | None = None, device: str | None = None,
          reasoning: bool = False, served_model_name: str | None = None, log_level: str = "info",
          step_tokens: int = 256, prefix_cache_bytes: int | None = None, context_cache_dir=None,
          context_cache_bytes: int | None = None, speculative: str | None = None, draft_tokens: int = 2) -> int:
    """Load ``artifact``, start the engine and serve until interrupted (``v4c serve``). The prefix cache:
    ``prefix_cache_bytes`` of memory (None: the default, 0: none) and, with ``context_cache_dir``, a disk
    tier of ``context_cache_bytes``; a sharded artifact is served without one. ``speculative="mtp"``:
    speculative decoding with the artifact's MTP block, ``draft_tokens`` per step (not for a sharded
    artifact yet)."""
    from ..errors import V4CError
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise V4CError(f"v4c serve needs FastAPI and uvicorn ({e.name} is missing): "
                       f"pip install 'v4c[serve]'") from None
    from ..artifact import open_artifact
    path = Path(artifact)
    man = open_artifact(path, verify=False)
    if not man.has_weights:
        raise V4CError(f"{path}: weight-free artifact (compiled from a config only); it cannot be served")
    if speculative is not None:  # refused before anything is loaded
        if man.world_size > 1 or "WORLD_SIZE" in os.environ:
            raise V4CError(f"{path}: --speculative is not supported for a sharded artifact yet "
                           f"({man.world_size} ranks); serve it without --speculative")
        if man.mtp_graph_text() is None:
            note = f" ({man.mtp_note})" if man.mtp_note else ""
            raise V4CError(f"{path}: --speculative {speculative} needs the artifact's MTP block, and this artifact "
                           f"has none{note}; compile a checkpoint that holds one (v4c compile --mtp on) or serve "
                           f"without --speculative")
    from .engine import Engine
    from .tokenizer import load_tokenizer
    leader = None
    if man.world_size > 1 or "WORLD_SIZE" in os.environ:  # one of torchrun's ranks (`v4c serve --world-size`)
        from ..runtime.distributed import load_distributed
        from .ranks import LeaderSession, control_group, follow
        model = load_distributed(path, device=device, backend=backend)
        group = control_group()
        session = model.new_session(max_batch, max_context or min(model.config.max_position_embeddings,
                                                                   DEFAULT_MAX_CONTEXT))
        if model.rank != 0:  # requests come to rank 0; this rank makes the calls rank 0 makes
            try:
                follow(session, group)
            finally:
                model.close()
            return 0
        leader = LeaderSession(session, group)
    else:
        from ..runtime.loader import load
        model = load(path, device=device, backend=backend)
    tok = load_tokenizer(path)
    cache = None
    try:
        if leader is None:
            cache = _prefix_cache(model, prefix_cache_bytes, context_cache_dir, context_cache_bytes)
        elif prefix_cache_bytes or context_cache_dir:
            print("v4c serve: no prefix cache for a sharded artifact (not implemented yet)", flush=True)
        spec = {} if speculative is None else {"speculative": speculative, "draft_tokens": draft_tokens}
        engine = Engine(model, max_batch=max_batch, max_context=max_context, max_queue=max_queue,
                        step_tokens=step_tokens, session=leader, prefix_cache=cache, **spec)
    except BaseException:
        if cache is not None:
            cache.close()
        if leader is not None:
            leader.stop()
            model.close()
        raise
    name = served_model_name or path.resolve().name
    app = create_app(engine, model_name=name, tokenizer=tok, api_key=api_key, reasoning=reasoning,
                     max_context=getattr(engine, "max_context", None) or max_context)
    engine.start()
    ranks = f", {model.world} ranks" if leader is not None else ""
    try:
        print(f"v4c serve: {name} on http://{host}:{port}/v1 (max batch {max_batch}, context "
              f"{app.state.server.max_context}{ranks}, "
              f"{'a tokenizer' if tok else 'no tokenizer: token-id prompts only'}"
              f"{f', speculative {speculative} ({draft_tokens} draft tokens)' if speculative else ''}"
              f"{', API key required' if api_key else ''})", flush=True)
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        engine.stop()
        if cache is not None:
            cache.close()  # the disk tier's queued writes land before the process goes
        if leader is not None:
            leader.stop()
            _leave(model)
    return 0


def _prefix_cache(model, memory_bytes: int | None, disk_dir, disk_bytes: int | None):
    """The engine's prefix cache from ``v4c serve``'s flags; None when both tiers are off."""
    from ..runtime.prefix_cache import DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES, PrefixCache
    memory_bytes = DEFAULT_MEMORY_BYTES if memory_bytes is None else memory_bytes
    if memory_bytes == 0 and disk_dir is None:
        return None
    return PrefixCache.for_model(model, memory_bytes=memory_bytes, disk_dir=disk_dir,
                                 disk_bytes=DEFAULT_DISK_BYTES if disk_bytes is None else disk_bytes)


def _leave(model) -> None:
    """Rank 0 leaves the process group; when the followers have gone already, say so in one line."""
    from ..errors import V4CError
    try:
        model.close()
    except (V4CError, RuntimeError) as e:
        print(f"v4c serve: leaving the process group: {str(e).splitlines()[0][:300]}", flush=True)
