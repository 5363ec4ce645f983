"""OpenAI's API shapes: request checks that name the bad field, and the response and chunk bodies.

Requests are plain JSON objects checked by hand (not a schema library) so that every refusal is
OpenAI's error body, ``{"error": {"message", "type", "param", "code"}}``, with ``param`` naming the
field. Fields the server does not implement are refused when they would change the answer
(``n`` > 1, penalties, ``logit_bias``, ``suffix``) and ignored otherwise (``user``, metadata).
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 16  # stop strings / ids per request
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """A refusal with its HTTP status and OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _show(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


# --- field checks ---------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict, name: str, lo: int | None = None, hi: int | None = None, what: str = "") -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer() and math.isfinite(v):
        v = int(v)
    if not _is_int(v):
        raise bad(name, f"{name} must be an integer{what}, got {_show(v)}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(name, f"{name} must be {rng}{what}, got {v}")
    return v


def _opt_number(body: dict, name: str) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(name, f"{name} must be a number, got {_show(v)}")
    return float(v)


def _opt_bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {_show(v)}")
    return v


def _sampling(body: dict) -> tuple[float, float, int | None]:
    t = _opt_number(body, "temperature")
    t = 1.0 if t is None else t
    if not (math.isfinite(t) and t >= 0.0):
        raise bad("temperature", f"temperature must be a finite number >= 0 (0: greedy), got {t!r}")
    p = _opt_number(body, "top_p")
    p = 1.0 if p is None else p
    if not (0.0 < p <= 1.0):  # NaN fails this too
        raise bad("top_p", f"top_p must be in (0, 1], got {p!r}")
    seed = _opt_int(body, "seed")
    return t, p, seed


def _stop(body: dict) -> tuple[list[str], list[int]]:
    """``stop``: a string, or a list of strings and token ids; also ``stop_token_ids`` (vLLM's)."""
    v = body.get("stop")
    strings, ids = [], []
    items = [] if v is None else [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v
    if not isinstance(items, list):
        raise bad("stop", f"stop must be a string or a list of strings and token ids, got {_show(v)}")
    extra = body.get("stop_token_ids")
    if extra is not None:
        if not isinstance(extra, list) or not all(_is_int(i) for i in extra):
            raise bad("stop_token_ids", f"stop_token_ids must be a list of token ids, got {_show(extra)}")
    for i, s in enumerate(items):
        if isinstance(s, str):
            if s:
                strings.append(s)
        elif _is_int(s):
            ids.append(s)
        else:
            raise bad("stop", f"stop[{i}] must be a string or a token id, got {_show(s)}")
    ids += list(extra or ())
    if len(strings) + len(ids) > MAX_STOP:
        raise bad("stop", f"stop: at most {MAX_STOP} stop strings and token ids, got {len(strings) + len(ids)}")
    return strings, ids


def _unsupported(body: dict) -> None:
    n = _opt_int(body, "n", 1)
    if n not in (None, 1):
        raise bad("n", f"n must be 1 (one choice per request), got {n}")
    b = _opt_int(body, "best_of", 1)
    if b not in (None, 1):
        raise bad("best_of", f"best_of must be 1, got {b}")
    for name in ("presence_penalty", "frequency_penalty"):
        v = _opt_number(body, name)
        if v not in (None, 0.0):
            raise bad(name, f"{name} is not supported (must be 0), got {v!r}")
    if body.get("logit_bias"):
        raise bad("logit_bias", "logit_bias is not supported")
    if body.get("suffix") not in (None, ""):
        raise bad("suffix", "suffix is not supported")
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise bad("stream_options", f"stream_options must be an object, got {_show(so)}")


def _model(body: dict) -> str | None:
    m = body.get("model")
    if m is not None and not isinstance(m, str):
        raise bad("model", f"model must be a string, got {_show(m)}")
    return m


# --- requests -------------------------------------------------------------------------------------

@dataclass
class CommonRequest:
    model: str | None
    max_tokens: int | None  # None: the default (16 for completions, the rest of the context for chat)
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stop_token_ids: list[int]
    stream: bool
    include_usage: bool
    logprobs: int | None  # top-k per token (0: the chosen token's only), None: no logprobs
    ignore_eos: bool


def _common(body: dict, logprobs: int | None, max_tokens_names=("max_tokens",)) -> CommonRequest:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    _unsupported(body)
    model = _model(body)
    max_tokens = None
    for name in max_tokens_names:
        v = _opt_int(body, name, 1)
        if v is not None:
            max_tokens = v
            break
    t, p, seed = _sampling(body)
    strings, ids = _stop(body)
    stream = _opt_bool(body, "stream")
    include_usage = bool(stream and isinstance(body.get("stream_options"), dict)
                         and body["stream_options"].get("include_usage") is True)
    return CommonRequest(model, max_tokens, t, p, seed, strings, ids, stream, include_usage, logprobs,
                         _opt_bool(body, "ignore_eos"))


@dataclass
class CompletionRequest(CommonRequest):
    prompt: str | list[int] = ""
    echo: bool = False
    return_token_ids: bool = False  # vLLM's extension: each choice also gives the generated token ids


def parse_completion(body: Any) -> CompletionRequest:
    """``POST /v1/completions``'s body, checked."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    lp = _opt_int(body, "logprobs", 0, MAX_TOP_LOGPROBS)
    c = _common(body, lp)
    if "prompt" not in body:
        raise bad("prompt", "prompt is required (a string or a list of token ids)")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(x, (str, list)) for x in prompt):
        raise bad("prompt", f"prompt: batches of prompts are not supported; send one request per prompt "
                            f"(got {len(prompt)})")
    if isinstance(prompt, list):
        for i, x in enumerate(prompt):
            if not _is_int(x):
                raise bad("prompt", f"prompt must be a string or a list of token ids; prompt[{i}] is {_show(x)}")
    elif not isinstance(prompt, str):
        raise bad("prompt", f"prompt must be a string or a list of token ids, got {_show(prompt)}")
    if len(prompt) == 0:
        raise bad("prompt", "prompt is empty")
    return CompletionRequest(**vars(c), prompt=prompt, echo=_opt_bool(body, "echo"),
                             return_token_ids=_opt_bool(body, "return_token_ids"))


@dataclass
class ChatRequest(CommonRequest):
    messages: list[dict] = field(default_factory=list)
    tools: list[dict] | None = None
    thinking: bool | None = None  # None: the server's default
    reasoning_effort: str | None = None


def _content(v, where: str, role: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, list):  # content parts: text only
        out = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content", f"{where}.content[{j}]: only text parts "
                                              f'({{"type": "text", "text": ...}}) are supported, got {_show(part)}')
            out.append(part["text"])
        return "\n".join(out)  # as the chat format joins them
    raise bad(f"{where}.content", f"{where}.content must be a string or a list of text parts, got {_show(v)}")


def _tool_calls(v, where: str) -> list[dict]:
    if not isinstance(v, list):
        raise bad(f"{where}.tool_calls", f"{where}.tool_calls must be a list, got {_show(v)}")
    calls = []
    for j, c in enumerate(v):
        w = f"{where}.tool_calls[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(w, f"{w} must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}, "
                         f"got {_show(c)}")
        args = fn.get("arguments", "{}")
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            raise bad(f"{w}.function.arguments", f"{w}.function.arguments must be a JSON string, got {_show(args)}")
        calls.append({**c, "type": "function", "function": {"name": fn["name"], "arguments": args}})
    return calls


def _messages(v) -> list[dict]:
    if not isinstance(v, list) or not v:
        raise bad("messages", f"messages must be a non-empty list of messages, got {_show(v)}")
    out = []
    for i, m in enumerate(v):
        w = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(w, f"{w} must be an object with a role and content, got {_show(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{w}.role", f"{w}.role must be one of {', '.join(ROLES)}, got {_show(role)}")
        msg = dict(m)
        if role == "developer":
            msg["role"] = role = "system"
        msg["content"] = _content(m.get("content"), w, role)
        if "tool_calls" in m and m["tool_calls"] is not None:
            if role != "assistant":
                raise bad(f"{w}.tool_calls", f"{w}: only assistant messages have tool_calls")
            msg["tool_calls"] = _tool_calls(m["tool_calls"], w)
        else:
            msg.pop("tool_calls", None)
        if msg["content"] is None and role != "assistant":
            raise bad(f"{w}.content", f"{w}.content is required for a {role} message")
        rc = m.get("reasoning_content")
        if rc is not None and not isinstance(rc, str):
            raise bad(f"{w}.reasoning_content", f"{w}.reasoning_content must be a string, got {_show(rc)}")
        out.append(msg)
    return out


def _tools(body: dict) -> list[dict] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise bad("tool_choice", f'tool_choice must be "auto" or "none" (forcing a tool is not supported), '
                                 f"got {_show(choice)}")
    if tools is None or choice == "none":
        return None
    if not isinstance(tools, list):
        raise bad("tools", f"tools must be a list of function tools, got {_show(tools)}")
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if (not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(fn, dict)
                or not isinstance(fn.get("name"), str) or not fn["name"]):
            raise bad(f"tools[{i}]", f'tools[{i}] must be {{"type": "function", "function": {{"name", '
                                     f'"description", "parameters"}}}}, got {_show(t)}')
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", f"tools[{i}].function.parameters must be a JSON schema "
                                                         f"object")
    return tools or None


def parse_chat(body: Any) -> ChatRequest:
    """``POST /v1/chat/completions``'s body, checked."""
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    lp = None
    if _opt_bool(body, "logprobs"):
        lp = _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    elif body.get("top_logprobs") is not None:
        _opt_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    c = _common(body, lp, ("max_completion_tokens", "max_tokens"))
    if "messages" not in body:
        raise bad("messages", "messages is required")
    messages = _messages(body["messages"])
    kwargs = body.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise bad("chat_template_kwargs", f"chat_template_kwargs must be an object, got {_show(kwargs)}")
    thinking = None
    for key in ("thinking", "enable_thinking"):
        if kwargs and key in kwargs:
            if not isinstance(kwargs[key], bool):
                raise bad(f"chat_template_kwargs.{key}",
                          f"chat_template_kwargs.{key} must be true or false, got {_show(kwargs[key])}")
            thinking = kwargs[key]
            break
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise bad("reasoning_effort", f"reasoning_effort must be a string, got {_show(effort)}")
    return ChatRequest(**vars(c), messages=messages, tools=_tools(body), thinking=thinking, reasoning_effort=effort)


# --- responses ------------------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage, with the prompt tokens resumed from the prefix cache under OpenAI's name
    (``prompt_tokens_details.cached_tokens``) and DeepSeek's (``prompt_cache_hit_tokens`` and
    ``prompt_cache_miss_tokens``)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
            "prompt_cache_hit_tokens": cached_tokens, "prompt_cache_miss_tokens": prompt_tokens - cached_tokens}


def completion(rid: str, created: int, model: str, text: str, finish_reason: str | None, logprobs: dict | None,
               use: dict, token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice],
            "usage": use}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None, token_ids: list[int] | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}


def chat_completion(rid: str, created: int, model: str, message: dict, finish_reason: str | None,
                    logprobs: dict | None, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}],
            "usage": use}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, created: int, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": use}


def sse(obj: dict | str) -> bytes:
    """One server-sent event (``data: [DONE]`` for the string "[DONE]")."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n".encode()


def _call_fields(c) -> tuple[str, str, str | None]:
    """(name, JSON arguments, id or None) of a parsed tool call, whatever shape the parser gives it."""
    cid = None
    if isinstance(c, dict):
        fn = c.get("function") if isinstance(c.get("function"), dict) else c
        name, args, cid = fn.get("name"), fn.get("arguments"), c.get("id")
    elif isinstance(c, (tuple, list)) and len(c) == 2:
        name, args = c
    else:
        name, args, cid = getattr(c, "name", None), getattr(c, "arguments", None), getattr(c, "id", None)
    if not isinstance(args, str):
        args = json.dumps(args if args is not None else {}, ensure_ascii=False)
    return str(name or ""), args, cid if isinstance(cid, str) and cid else None


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def chat_message(text: str, thinking: bool, parse=None) -> tuple[dict, bool]:
    """The assistant message for the model's whole output ``text``: reasoning apart from content and
    DSML tool calls as OpenAI ``tool_calls``; returns (message, whether it has tool calls). Output the
    parser cannot read comes back as plain content, never an error."""
    if parse is None:
        from .chat import parse_output as parse
    try:
        reasoning, content, calls = parse(text, thinking)
        calls = [_call_fields(c) for c in (calls or ())]
    except Exception:  # malformed output: the text as it is
        reasoning, content, calls = None, text, []
    msg: dict[str, Any] = {"role": "assistant", "content": content if (content or not calls) else None}
    if thinking or reasoning:
        msg["reasoning_content"] = reasoning or None
    if calls:
        msg["tool_calls"] = [{"id": cid or call_id(), "type": "function", "function": {"name": n, "arguments": a}}
                             for n, a, cid in calls]
    return msg, bool(calls)
