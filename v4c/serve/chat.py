"""DeepSeek-V4's chat format: OpenAI-style messages -> prompt text, and the model's output -> reasoning,
content and tool calls (streaming).

V4 ships no Jinja chat template, so the server renders prompts itself. This module is pure Python (no
tokenizer): ``encode_messages`` gives the prompt as text, special tokens spelled out; the tokenizer turns
those spellings into their token ids.

Prompt layout::

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user turn}<｜Assistant｜>{assistant turn}<｜end▁of▁sentence｜>
    <｜User｜>...<｜Assistant｜><think>        (generation prompt, thinking mode)
    <｜User｜>...<｜Assistant｜></think>       (generation prompt, chat mode)

- ``{system}`` is, joined by a blank line: the "max" reasoning-effort instruction (``MAX_EFFORT_INSTRUCTION``,
  only with ``reasoning_effort="max"``), the system (or developer) messages' text, and the ``## Tools``
  block (only when tools are given). Without any of them nothing stands between the BOS and ``<｜User｜>``.
- An assistant turn is ``<think>{reasoning}</think>{content}`` when its reasoning is kept and it has some,
  else ``</think>{content}``; tool calls follow the content (after a blank line when there is content) as
  one DSML block, and the turn ends with ``<｜end▁of▁sentence｜>``. Reasoning is kept when tools are given,
  and for the assistant messages after the last user message (the exchange in progress); earlier turns'
  reasoning is dropped.
- There is no tool role: consecutive tool and user messages make one user turn, each tool result written
  as ``<tool_result>{content}</tool_result>``, the pieces joined by a blank line.

DSML tool-call markup (``｜`` is U+FF5C FULLWIDTH VERTICAL LINE), exactly as the encoder writes it and the
parser reads it (whitespace between elements is free; a parameter's value is everything between its tags)::

    <｜DSML｜tool_calls>
    <｜DSML｜invoke name="get_weather">
    <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
    <｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>
    </｜DSML｜invoke>
    </｜DSML｜tool_calls>

``string="true"``: the value is a raw string (no quotes, no escaping); ``string="false"``: the value is JSON.
A string the raw form cannot hold (it contains ``</｜DSML｜parameter>`` or ``<｜end▁of▁sentence｜>``) is
written as JSON with ``<`` escaped as ``\\u003c``.

``ChatStreamParser`` reads the model's output (the text after the generation prompt) as it streams.
It holds back only what could still be the start of a tag, and a tail of whitespace (whitespace at the
start of a section and just before a tag or the end is dropped); a DSML block is buffered until each
``invoke`` closes, then comes out as one ``tool_call`` delta, also inside the reasoning. Markup that
breaks the grammar, or is unfinished at the end, comes out as text of the section it is in (content,
or reasoning before ``</think>``). ``<｜end▁of▁sentence｜>`` ends the output; the rest is ignored. The
result does not depend on how the text is split over ``feed`` calls.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from ..errors import V4CError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_RESULT_START = "<tool_result>"
TOOL_RESULT_END = "</tool_result>"
DSML = "｜DSML｜"
TOOL_CALLS_START = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_PREFIX = f'<{DSML}invoke name="'  # + name + '">'
INVOKE_END = f"</{DSML}invoke>"
PARAMETER_PREFIX = f'<{DSML}parameter name="'  # + name + '" string="true|false">'
PARAMETER_END = f"</{DSML}parameter>"

# the text pieces a tokenizer should hold as single tokens (tests/serve_tokenizer.py)
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)
MARKUP_TOKENS = (THINK_START, THINK_END, TOOL_RESULT_START, TOOL_RESULT_END, TOOL_CALLS_START, TOOL_CALLS_END,
                 f"<{DSML}invoke", INVOKE_END, f"<{DSML}parameter", PARAMETER_END)

REASONING_EFFORTS = ("low", "medium", "high", "max")
MAX_EFFORT_INSTRUCTION = (
    "Reasoning effort: max. Before you answer, think the problem through as thoroughly as you can: work "
    "through every step explicitly, question your assumptions, consider alternative approaches and edge "
    "cases, and check each intermediate result. Verify your conclusion before you write the final answer, "
    "and take as long as the problem needs."
)

_TOOLS_HEADER = (
    "## Tools\n\n"
    "You can call the tools below. Each is listed with its name, what it does, and its parameters as a "
    "JSON Schema."
)
_TOOLS_USAGE = (
    "### How to call tools\n"
    "To call tools, write one block like this after your reply, with one invoke element per call:\n\n"
    f"{TOOL_CALLS_START}\n"
    f'{INVOKE_PREFIX}TOOL_NAME">\n'
    f'{PARAMETER_PREFIX}PARAMETER_NAME" string="true">a string value, written as it is</{DSML}parameter>\n'
    f'{PARAMETER_PREFIX}PARAMETER_NAME" string="false">any other value, written as JSON</{DSML}parameter>\n'
    f"{INVOKE_END}\n"
    f"{TOOL_CALLS_END}\n\n"
    'Use string="true" for a string value and write it with no quotes or escaping; use string="false" for '
    "numbers, booleans, null, arrays and objects, written as JSON. Then stop: the results come back in the "
    f"next user turn, one {TOOL_RESULT_START}...{TOOL_RESULT_END} element per call, in the order of the calls."
)


class ChatFormatError(V4CError, ValueError):
    """Messages or tools that do not fit the chat format; the message names the field."""


# ---------------------------------------------------------------------------------------------- encoding

def _text(value, where: str, *, allow_none: bool = False) -> str | None:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts (joined by newlines)."""
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for i, p in enumerate(value):
            if not isinstance(p, dict):
                raise ChatFormatError(f"{where}[{i}]: expected an object like {{'type': 'text', 'text': ...}}")
            if p.get("type") != "text":
                raise ChatFormatError(f"{where}[{i}].type: only 'text' parts are supported, got {p.get('type')!r}")
            if not isinstance(p.get("text"), str):
                raise ChatFormatError(f"{where}[{i}].text: expected a string")
            parts.append(p["text"])
        return "\n".join(parts)
    raise ChatFormatError(f"{where}: expected a string or a list of text parts, got {type(value).__name__}")


def _json(value) -> str:
    s = json.dumps(value, ensure_ascii=False)
    if PARAMETER_END in s or EOS in s:  # '<' only occurs inside JSON strings, where \u003c means the same
        s = s.replace("<", "\\u003c")
    return s


def _parameter(name: str, value) -> str:
    if isinstance(value, str) and PARAMETER_END not in value and EOS not in value:
        return f'{PARAMETER_PREFIX}{name}" string="true">{value}{PARAMETER_END}'
    return f'{PARAMETER_PREFIX}{name}" string="false">{_json(value)}{PARAMETER_END}'


_NAME = re.compile(r'[^"<>\n]+')


def _tool_calls_block(calls, where: str) -> tuple[str, list[str]]:
    """The DSML block of an assistant message's ``tool_calls``, and the calls' ids."""
    if not isinstance(calls, list):
        raise ChatFormatError(f"{where}: expected a list")
    invokes, ids = [], []
    for j, c in enumerate(calls):
        w = f"{where}[{j}]"
        if not isinstance(c, dict):
            raise ChatFormatError(f"{w}: expected an object")
        if c.get("type", "function") != "function":
            raise ChatFormatError(f"{w}.type: only 'function' tool calls are supported, got {c.get('type')!r}")
        if c.get("id") is not None:
            if not isinstance(c["id"], str):
                raise ChatFormatError(f"{w}.id: expected a string")
            ids.append(c["id"])
        fn, name = _function(c, w, "'name' and 'arguments'")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as e:
                raise ChatFormatError(f"{w}.function.arguments: not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise ChatFormatError(f"{w}.function.arguments: expected a JSON object, got {type(args).__name__}")
        for k in args:
            if not _NAME.fullmatch(k):
                raise ChatFormatError(f"{w}.function.arguments: parameter name {k!r} is empty or holds a "
                                      f"quote, '<', '>' or a newline")
        params = "".join(_parameter(k, v) + "\n" for k, v in args.items())
        invokes.append(f'{INVOKE_PREFIX}{name}">\n{params}{INVOKE_END}\n')
    return f"{TOOL_CALLS_START}\n{''.join(invokes)}{TOOL_CALLS_END}", ids


def _function(obj: dict, w: str, fields: str) -> tuple[dict, str]:
    """``obj["function"]`` (a tool or a tool call's) and its name, checked; ``w`` names ``obj`` in errors."""
    fn = obj.get("function")
    if not isinstance(fn, dict):
        raise ChatFormatError(f"{w}.function: expected an object with {fields}")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ChatFormatError(f"{w}.function.name: expected a non-empty name without quotes, '<', '>' "
                              f"or newlines, got {name!r}")
    return fn, name


def _tools_block(tools) -> str:
    if not isinstance(tools, list):
        raise ChatFormatError("tools: expected a list")
    entries = []
    for i, t in enumerate(tools):
        w = f"tools[{i}]"
        if not isinstance(t, dict):
            raise ChatFormatError(f"{w}: expected an object like {{'type': 'function', 'function': {{...}}}}")
        if t.get("type", "function") != "function":
            raise ChatFormatError(f"{w}.type: only 'function' tools are supported, got {t.get('type')!r}")
        fn, name = _function(t, w, "'name', 'description', 'parameters'")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ChatFormatError(f"{w}.function.description: expected a string")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ChatFormatError(f"{w}.function.parameters: expected a JSON Schema object")
        lines = [f"### {name}"]
        if desc:
            lines.append(f"Description: {desc}")
        lines.append(f"Parameters: {json.dumps(params, ensure_ascii=False)}")
        entries.append("\n".join(lines))
    return "\n\n".join([_TOOLS_HEADER, *entries, _TOOLS_USAGE])


def encode_messages(messages: list[dict], *, tools: list[dict] | None = None, thinking: bool = False,
                    reasoning_effort: str | None = None, add_generation_prompt: bool = True) -> str:
    """The prompt text for OpenAI-style ``messages`` (roles system/developer, user, assistant, tool).

    Assistant messages may carry ``reasoning_content`` and ``tool_calls``
    (``[{"id", "type": "function", "function": {"name", "arguments": JSON string}}]``); tool messages
    carry ``tool_call_id`` (an id of the preceding assistant message's calls) and ``content``. With
    ``add_generation_prompt`` the last message must be a user or tool message and the prompt ends with
    ``<｜Assistant｜><think>`` (``thinking``) or ``<｜Assistant｜></think>``. ``reasoning_effort`` is one of
    low/medium/high/max; "max" (thinking mode only) adds ``MAX_EFFORT_INSTRUCTION`` to the system text.
    Raises ``ChatFormatError`` naming the field at fault.
    """
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError(f"reasoning_effort: expected one of {', '.join(REASONING_EFFORTS)}, "
                              f"got {reasoning_effort!r}")
    if reasoning_effort == "max" and not thinking:
        raise ChatFormatError("reasoning_effort: 'max' needs thinking mode")
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages: expected a non-empty list")
    if tools is not None and not isinstance(tools, list):
        raise ChatFormatError("tools: expected a list")
    has_tools = bool(tools)
    tools_text = _tools_block(tools) if has_tools else None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"messages[{i}]: expected an object with 'role' and 'content'")
        if m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise ChatFormatError(f"messages[{i}].role: expected system, developer, user, assistant or tool, "
                                  f"got {m.get('role')!r}")

    system, start = [], 0
    while start < len(messages) and messages[start]["role"] in ("system", "developer"):
        system.append(_text(messages[start].get("content"), f"messages[{start}].content"))
        start += 1
    head = ([MAX_EFFORT_INSTRUCTION] if reasoning_effort == "max" else []) + system
    head += [tools_text] if tools_text else []
    out = [BOS, "\n\n".join(head)]

    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    prev = None  # the role group of the previous message: "user" (user or tool) or "assistant"
    pending_ids: list[str] = []  # the calls of the assistant message the tool results answer
    user_parts: list[str] = []

    def close_user_turn():
        if user_parts:
            out.append(USER + "\n\n".join(user_parts))
            user_parts.clear()

    for i in range(start, len(messages)):
        m, w = messages[i], f"messages[{i}]"
        role = m["role"]
        if role in ("system", "developer"):
            raise ChatFormatError(f"{w}.role: {role} messages must come before the conversation")
        if role == "user":
            user_parts.append(_text(m.get("content"), f"{w}.content"))
            pending_ids = []
            prev = "user"
        elif role == "tool":
            if not pending_ids:
                raise ChatFormatError(f"{w}.role: a tool message must follow an assistant message with tool_calls")
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or cid not in pending_ids:
                raise ChatFormatError(f"{w}.tool_call_id: {cid!r} is not the id of a call in the preceding "
                                      f"assistant message ({', '.join(map(repr, pending_ids))})")
            user_parts.append(TOOL_RESULT_START + _text(m.get("content"), f"{w}.content") + TOOL_RESULT_END)
            prev = "user"
        else:  # assistant
            if prev != "user":
                raise ChatFormatError(f"{w}.role: an assistant message must follow a user or tool message")
            close_user_turn()
            content = _text(m.get("content"), f"{w}.content", allow_none=True) or ""
            reasoning = m.get("reasoning_content")
            if reasoning is not None and not isinstance(reasoning, str):
                raise ChatFormatError(f"{w}.reasoning_content: expected a string")
            keep = has_tools or i > last_user
            turn = [ASSISTANT, f"{THINK_START}{reasoning}{THINK_END}" if keep and reasoning else THINK_END]
            pending_ids = []
            calls = m.get("tool_calls")
            if calls:
                block, pending_ids = _tool_calls_block(calls, f"{w}.tool_calls")
                turn.append(f"{content}\n\n{block}" if content else block)
            else:
                turn.append(content)
            out.append("".join(turn) + EOS)
            prev = "assistant"
    if prev is None:
        raise ChatFormatError(f"messages: no user message after the {len(system)} system message(s)")
    close_user_turn()
    if add_generation_prompt:
        if prev != "user":
            raise ChatFormatError(f"messages[{len(messages) - 1}].role: the generation prompt needs a user or "
                                  f"tool message last, got assistant")
        out.append(ASSISTANT + (THINK_START if thinking else THINK_END))
    return "".join(out)


# ----------------------------------------------------------------------------------------------- parsing

@dataclass
class Delta:
    """A piece of parsed output: ``reasoning`` or ``content`` text, or a whole ``tool_call``."""
    kind: str  # "reasoning" | "content" | "tool_call"
    text: str = ""
    name: str | None = None  # tool_call: the function's name
    arguments: str | None = None  # tool_call: the arguments as a JSON object (text)
    index: int | None = None  # tool_call: 0, 1, ... in the order of the output
    id: str | None = None  # tool_call: a fresh "call_..." id


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


_INVOKE_TAG = re.compile(re.escape(INVOKE_PREFIX) + r'([^"<>\n]+)">')
_PARAMETER_TAG = re.compile(re.escape(PARAMETER_PREFIX) + r'([^"<>\n]+)" string="(true|false)">')
_MAX_TAG = 512  # an attribute tag is shorter than this


def _literal(rest: str, tag: str):
    """'ok' (with the length), 'partial' (``rest`` may still become ``tag``) or None."""
    if rest.startswith(tag):
        return "ok", len(tag), None
    return ("partial", 0, None) if tag.startswith(rest) else None


def _attributed(rest: str, prefix: str, pattern: re.Pattern):
    if rest.startswith(prefix):
        k = rest.find(">", len(prefix), _MAX_TAG)  # a bounded look, so that the answer never depends on
        if k < 0:                                   # how much of the text has come
            return ("partial", 0, None) if len(rest) < _MAX_TAG else None
        m = pattern.fullmatch(rest, 0, k + 1)
        return ("ok", k + 1, m) if m else None
    return ("partial", 0, None) if prefix.startswith(rest) else None


class ChatStreamParser:
    """Splits the model's output (the text after the generation prompt) into reasoning, content and tool calls.

    ``thinking``: the prompt ended with ``<think>``, so the output opens with reasoning up to ``</think>``.
    ``feed`` returns the deltas that the text so far settles; ``finish`` the rest (call it at the end).
    """

    def __init__(self, thinking: bool):
        self._section = "reasoning" if thinking else "content"  # outside a DSML block
        self._mode = "text"  # text | block | done
        self._buf = ""  # text not yet settled
        self._ws = ""  # whitespace held back (dropped before a tag, at the end and at a section's start)
        self._fresh = True  # nothing emitted yet in this section
        self._out: list[Delta] = []
        self._calls = 0
        # inside a DSML block
        self._sub = "between"  # between (invokes) | invoke | value
        self._raw = ""  # the block's text since its start or its last whole invoke (given back if it breaks)
        self._block_calls = 0
        self._name = ""
        self._params: dict = {}
        self._param: tuple[str, bool] | None = None

    # -- public
    def feed(self, text: str) -> list[Delta]:
        if self._mode != "done" and text:
            self._buf += text
            self._run(final=False)
        return self._take()

    def finish(self) -> list[Delta]:
        if self._mode != "done":
            self._run(final=True)
            self._mode = "done"
        return self._take()

    # -- emission
    def _take(self) -> list[Delta]:
        """The deltas made since the last call, consecutive texts of one kind merged."""
        out: list[Delta] = []
        for d in self._out:
            if out and d.kind != "tool_call" and out[-1].kind == d.kind:
                out[-1].text += d.text
            else:
                out.append(d)
        self._out = []
        return out

    def _emit_text(self, s: str) -> None:
        s = self._ws + s
        self._ws = ""
        if self._fresh:
            s = s.lstrip()
        body = s.rstrip()
        self._ws = s[len(body):]
        if body:
            self._fresh = False
            self._out.append(Delta(self._section, text=body))

    # -- the state machine
    def _run(self, final: bool) -> None:
        while self._mode != "done":
            progressed = self._step_text(final) if self._mode == "text" else self._step_block(final)
            if not progressed:
                break

    def _step_text(self, final: bool) -> bool:
        tags = (THINK_END, TOOL_CALLS_START, EOS) if self._section == "reasoning" else (TOOL_CALLS_START, EOS)
        buf = self._buf
        hits = [(buf.find(t), t) for t in tags]
        hits = [(i, t) for i, t in hits if i >= 0]
        if hits:
            i, tag = min(hits)
            self._emit_text(buf[:i])
            self._buf = buf[i + len(tag):]
            if tag == EOS:
                self._ws, self._buf, self._mode = "", "", "done"
            elif tag == THINK_END:
                self._ws, self._section, self._fresh = "", "content", True
            else:  # a DSML block opens
                self._raw, self._ws = self._ws + tag, ""
                self._mode, self._sub, self._block_calls = "block", "between", 0
            return True
        hold = 0
        if not final:
            for k in range(min(len(buf), max(map(len, tags)) - 1), 0, -1):
                if any(t.startswith(buf[-k:]) for t in tags):
                    hold = k
                    break
        self._emit_text(buf[:len(buf) - hold])
        self._buf = buf[len(buf) - hold:]
        if final:
            self._ws, self._mode = "", "done"
        return False

    def _broken(self, at: int) -> bool:
        """The block does not parse from ``self._buf[at]`` on: its text so far goes out as text."""
        self._emit_text(self._raw + self._buf[:at])
        self._buf = self._buf[at:]
        self._raw, self._mode, self._sub = "", "text", "between"
        return True

    def _consume(self, n: int) -> None:
        self._raw += self._buf[:n]
        self._buf = self._buf[n:]

    def _step_block(self, final: bool) -> bool:
        buf = self._buf
        if self._sub == "value":
            end, eos = buf.find(PARAMETER_END), buf.find(EOS)
            if eos >= 0 and (end < 0 or eos < end):
                return self._broken(eos)
            if end < 0:
                return self._broken(len(buf)) if final else False
            name, is_string = self._param
            value = buf[:end]
            if not is_string:
                try:
                    value = json.loads(value)
                except ValueError:
                    value = value.strip()  # not JSON after all: keep the text
            self._params[name] = value
            self._consume(end + len(PARAMETER_END))
            self._sub = "invoke"
            return True
        j = len(buf) - len(buf.lstrip())
        rest = buf[j:]
        if not rest:
            if final:
                return self._end_block_at_finish()
            return False
        if self._sub == "between":
            options = [("close", _literal(rest, TOOL_CALLS_END)),
                       ("invoke", _attributed(rest, INVOKE_PREFIX, _INVOKE_TAG))]
        else:
            options = [("parameter", _attributed(rest, PARAMETER_PREFIX, _PARAMETER_TAG)),
                       ("end", _literal(rest, INVOKE_END))]
        for what, r in options:
            if r and r[0] == "ok":
                self._consume(j + r[1])
                m = r[2]
                if what == "close":
                    self._raw, self._mode = "", "text"
                elif what == "invoke":
                    self._name, self._params, self._sub = m.group(1), {}, "invoke"
                elif what == "parameter":
                    self._param, self._sub = (m.group(1), m.group(2) == "true"), "value"
                else:  # the invoke is whole: a tool call
                    self._out.append(Delta("tool_call", name=self._name,
                                           arguments=json.dumps(self._params, ensure_ascii=False),
                                           index=self._calls, id=new_call_id()))
                    self._calls += 1
                    self._block_calls += 1
                    self._raw, self._sub = "", "between"
                return True
        if any(r for _, r in options):  # partial: wait for more text
            if final:
                return self._end_block_at_finish()
            return False
        return self._broken(j)

    def _end_block_at_finish(self) -> bool:
        rest = self._buf.strip()
        if self._sub == "between" and self._block_calls and (not rest or TOOL_CALLS_END.startswith(rest)):
            self._raw, self._buf, self._mode = "", "", "text"  # only the block's closing tag is missing
            return True
        return self._broken(len(self._buf))


def parse_output(text: str, thinking: bool) -> tuple[str | None, str | None, list[dict]]:
    """The whole output at once: (reasoning or None, content or None, OpenAI-style tool calls)."""
    p = ChatStreamParser(thinking)
    deltas = p.feed(text) + p.finish()
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [{"id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments}}
             for d in deltas if d.kind == "tool_call"]
    return reasoning or None, content or None, calls
