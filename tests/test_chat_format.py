"""V4's chat format (``v4c.serve.chat``): whole prompts written out by hand, the streaming output parser,
and the test tokenizer (``tests/serve_tokenizer.py``) round-tripping text and V4's special tokens."""
import json

import pytest

from serve_tokenizer import write_test_tokenizer
from v4c.serve.chat import ChatFormatError, ChatStreamParser, encode_messages, parse_output

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather forecast for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}

# the ## Tools block for [WEATHER], as the system message carries it
TOOLS_BLOCK = (
    "## Tools\n"
    "\n"
    "You can call the tools below. Each is listed with its name, what it does, and its parameters as a JSON "
    "Schema.\n"
    "\n"
    "### get_weather\n"
    "Description: Get the weather forecast for a city.\n"
    'Parameters: {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, '
    '"required": ["city"]}\n'
    "\n"
    "### How to call tools\n"
    "To call tools, write one block like this after your reply, with one invoke element per call:\n"
    "\n"
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="TOOL_NAME">\n'
    '<｜DSML｜parameter name="PARAMETER_NAME" string="true">a string value, written as it is</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="PARAMETER_NAME" string="false">any other value, written as JSON</｜DSML｜parameter>\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls>\n"
    "\n"
    'Use string="true" for a string value and write it with no quotes or escaping; use string="false" for '
    "numbers, booleans, null, arrays and objects, written as JSON. Then stop: the results come back in the "
    "next user turn, one <tool_result>...</tool_result> element per call, in the order of the calls."
)

SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
MULTI_TURN = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4", "reasoning_content": "Two plus two is four."},
    {"role": "user", "content": "And 3+3?"},
]


# ------------------------------------------------------------------------------------------------ prompts

def test_plain_chat():
    p = encode_messages([SYSTEM, {"role": "user", "content": "Hello!"}])
    assert p == "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello!<｜Assistant｜></think>"


def test_thinking_mode():
    p = encode_messages([SYSTEM, {"role": "user", "content": "Hello!"}], thinking=True)
    assert p == "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Hello!<｜Assistant｜><think>"


def test_no_system_message_and_text_parts():
    p = encode_messages([{"role": "user", "content": [{"type": "text", "text": "Hi"},
                                                      {"type": "text", "text": "there"}]}])
    assert p == "<｜begin▁of▁sentence｜><｜User｜>Hi\nthere<｜Assistant｜></think>"


def test_multi_turn_drops_earlier_reasoning():
    assert encode_messages(MULTI_TURN, thinking=True) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant."
        "<｜User｜>What is 2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>"
        "<｜User｜>And 3+3?<｜Assistant｜><think>")
    assert encode_messages(MULTI_TURN) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant."
        "<｜User｜>What is 2+2?<｜Assistant｜></think>4<｜end▁of▁sentence｜>"
        "<｜User｜>And 3+3?<｜Assistant｜></think>")


def test_multi_turn_with_tools_keeps_reasoning():
    assert encode_messages(MULTI_TURN, tools=[WEATHER], thinking=True) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.\n\n" + TOOLS_BLOCK +
        "<｜User｜>What is 2+2?<｜Assistant｜><think>Two plus two is four.</think>4<｜end▁of▁sentence｜>"
        "<｜User｜>And 3+3?<｜Assistant｜><think>")


def test_tool_calls_and_results():
    messages = [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "I need the forecasts.",
         "tool_calls": [
             {"id": "call_a", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
             {"id": "call_b", "type": "function",
              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": '{"temp": 9}'}]},
    ]
    assert encode_messages(messages, tools=[WEATHER], thinking=True) == (
        "<｜begin▁of▁sentence｜>" + TOOLS_BLOCK +
        "<｜User｜>Weather in Paris and Oslo?"
        "<｜Assistant｜><think>I need the forecasts.</think>Let me check.\n"
        "\n"
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">2</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="get_weather">\n'
        '<｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
        '<｜User｜><tool_result>{"temp": 21}</tool_result>\n'
        '\n'
        '<tool_result>{"temp": 9}</tool_result>'
        "<｜Assistant｜><think>")


def test_tool_call_without_content_and_reasoning_of_the_exchange_in_progress():
    # no tools given: the reasoning of the answer to the last user message is still kept
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "Look it up.", "content": None,
         "tool_calls": [{"id": "c1", "type": "function",
                         "function": {"name": "lookup", "arguments": '{"q": "a \\"b\\"", "n": [1, 2]}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "found"},
    ]
    assert encode_messages(messages, thinking=True) == (
        "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>Look it up.</think>"
        "<｜DSML｜tool_calls>\n"
        '<｜DSML｜invoke name="lookup">\n'
        '<｜DSML｜parameter name="q" string="true">a "b"</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="n" string="false">[1, 2]</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
        "<｜User｜><tool_result>found</tool_result><｜Assistant｜><think>")


def test_max_reasoning_effort():
    p = encode_messages([SYSTEM, {"role": "user", "content": "Prove it."}], thinking=True, reasoning_effort="max")
    assert p == (
        "<｜begin▁of▁sentence｜>"
        "Reasoning effort: max. Before you answer, think the problem through as thoroughly as you can: work "
        "through every step explicitly, question your assumptions, consider alternative approaches and edge "
        "cases, and check each intermediate result. Verify your conclusion before you write the final answer, "
        "and take as long as the problem needs.\n"
        "\n"
        "You are a helpful assistant.<｜User｜>Prove it.<｜Assistant｜><think>")
    # the other efforts add nothing
    assert encode_messages([SYSTEM, {"role": "user", "content": "Prove it."}], thinking=True,
                           reasoning_effort="high") == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant.<｜User｜>Prove it.<｜Assistant｜><think>")


def test_without_generation_prompt():
    messages = MULTI_TURN[:3]
    assert encode_messages(messages, add_generation_prompt=False) == (
        "<｜begin▁of▁sentence｜>You are a helpful assistant."
        "<｜User｜>What is 2+2?<｜Assistant｜><think>Two plus two is four.</think>4<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("messages,kwargs,message", [
    ([], {}, "messages: expected a non-empty list"),
    ("hi", {}, "messages: expected a non-empty list"),
    ([{"role": "user", "content": "a"}, "b"], {}, "messages[1]: expected an object"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], {}, "messages[1].role: expected"),
    ([{"role": "user", "content": 5}], {}, "messages[0].content: expected a string or a list of text parts"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], {}, "messages[0].content[0].type: only 'text'"),
    ([{"role": "user"}], {}, "messages[0].content: expected a string"),
    ([SYSTEM], {}, "messages: no user message"),
    ([{"role": "assistant", "content": "a"}], {}, "messages[0].role: an assistant message must follow"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], {},
     "messages[1].role: the generation prompt needs a user or tool message last"),
    ([{"role": "user", "content": "a"}, SYSTEM], {}, "messages[1].role: system messages must come before"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "tool_call_id": "x", "content": "r"}], {},
     "messages[1].role: a tool message must follow an assistant message with tool_calls"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "d", "content": "r"}], {}, "messages[2].tool_call_id: 'd' is not the id"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{nope"}}]}],
     {"add_generation_prompt": False}, "messages[1].tool_calls[0].function.arguments: not valid JSON"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "[1]"}}]}],
     {"add_generation_prompt": False}, "messages[1].tool_calls[0].function.arguments: expected a JSON object"),
    ([{"role": "user", "content": "a"},
      {"role": "assistant", "tool_calls": [{"id": "c", "function": {"arguments": "{}"}}]}],
     {"add_generation_prompt": False}, "messages[1].tool_calls[0].function.name"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "reasoning_content": 3}],
     {"add_generation_prompt": False}, "messages[1].reasoning_content: expected a string"),
    ([{"role": "user", "content": "a"}], {"tools": {"x": 1}}, "tools: expected a list"),
    ([{"role": "user", "content": "a"}], {"tools": [{"type": "function"}]}, "tools[0].function: expected"),
    ([{"role": "user", "content": "a"}], {"tools": [{"function": {"name": 'a"b'}}]}, "tools[0].function.name"),
    ([{"role": "user", "content": "a"}], {"tools": [{"function": {"name": "f", "parameters": []}}]},
     "tools[0].function.parameters"),
    ([{"role": "user", "content": "a"}], {"reasoning_effort": "extreme", "thinking": True},
     "reasoning_effort: expected one of"),
    ([{"role": "user", "content": "a"}], {"reasoning_effort": "max"}, "reasoning_effort: 'max' needs thinking"),
])
def test_validation_errors_name_the_field(messages, kwargs, message):
    with pytest.raises(ChatFormatError) as e:
        encode_messages(messages, **kwargs)
    assert str(e.value).startswith(message), str(e.value)
    assert isinstance(e.value, ValueError)


# ----------------------------------------------------------------------------------------------- parsing

def _collect(deltas):
    reasoning = "".join(d.text for d in deltas if d.kind == "reasoning")
    content = "".join(d.text for d in deltas if d.kind == "content")
    calls = [(d.index, d.name, d.arguments) for d in deltas if d.kind == "tool_call"]
    return reasoning, content, calls


def test_plain_content():
    assert parse_output("Hello there!<｜end▁of▁sentence｜>ignored", thinking=False) == (None, "Hello there!", [])
    assert parse_output("Hello", thinking=False) == (None, "Hello", [])
    assert parse_output("", thinking=False) == (None, None, [])


def test_reasoning_then_content():
    r, c, calls = parse_output("\nLet me think.\n</think>\n\nThe answer is 4.<｜end▁of▁sentence｜>", thinking=True)
    assert (r, c, calls) == ("Let me think.", "The answer is 4.", [])
    assert parse_output("still thinking", thinking=True) == ("still thinking", None, [])


SAMPLE = (
    "I should look this up.</think>Let me check.\n\n"
    "<｜DSML｜tool_calls>\n"
    '<｜DSML｜invoke name="get_weather">\n'
    '<｜DSML｜parameter name="city" string="true">Paris, "la Ville Lumière"\nFrance</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
    '<｜DSML｜parameter name="opts" string="false">{"unit": "C", "hourly": true, "hours": [6, 12]}'
    "</｜DSML｜parameter>\n"
    "</｜DSML｜invoke>\n"
    '<｜DSML｜invoke name="now">\n'
    "</｜DSML｜invoke>\n"
    "</｜DSML｜tool_calls><｜end▁of▁sentence｜>"
)


def test_tool_call_with_string_and_json_parameters():
    r, c, calls = parse_output(SAMPLE, thinking=True)
    assert r == "I should look this up." and c == "Let me check."
    assert [x["function"]["name"] for x in calls] == ["get_weather", "now"]
    assert all(x["type"] == "function" and x["id"].startswith("call_") for x in calls)
    assert calls[0]["id"] != calls[1]["id"]
    assert json.loads(calls[0]["function"]["arguments"]) == {
        "city": 'Paris, "la Ville Lumière"\nFrance', "days": 3, "opts": {"unit": "C", "hourly": True, "hours": [6, 12]}}
    assert json.loads(calls[1]["function"]["arguments"]) == {}


def test_tool_call_inside_reasoning():
    out = ("I will call it now.\n<｜DSML｜tool_calls>\n"
           '<｜DSML｜invoke name="get_weather"><｜DSML｜parameter name="city" string="true">Oslo</｜DSML｜parameter>'
           "</｜DSML｜invoke>\n</｜DSML｜tool_calls>\nWaiting.")
    r, c, calls = parse_output(out, thinking=True)
    assert r == "I will call it now.\nWaiting." and c is None
    assert [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in calls] == [
        ("get_weather", {"city": "Oslo"})]


def test_tool_call_in_chat_mode_and_unclosed_block():
    out = ('<｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="x" string="false">null'
           "</｜DSML｜parameter></｜DSML｜invoke>\n</｜DSML｜tool")  # the block's closing tag cut off
    r, c, calls = parse_output(out, thinking=False)
    assert r is None and c is None and [(x["function"]["name"], x["function"]["arguments"]) for x in calls] == [
        ("f", '{"x": null}')]


def test_streaming_at_every_split_equals_one_shot():
    p = ChatStreamParser(thinking=True)
    whole = _collect(p.feed(SAMPLE) + p.finish())
    r, c, calls = parse_output(SAMPLE, thinking=True)
    assert whole == (r, c, [(i, x["function"]["name"], x["function"]["arguments"]) for i, x in enumerate(calls)])
    for i in range(len(SAMPLE) + 1):
        p = ChatStreamParser(thinking=True)
        assert _collect(p.feed(SAMPLE[:i]) + p.feed(SAMPLE[i:]) + p.finish()) == whole, i
    p = ChatStreamParser(thinking=True)
    per_char = [p.feed(ch) for ch in SAMPLE] + [p.finish()]
    assert _collect([d for ds in per_char for d in ds]) == whole


def test_streaming_emits_promptly_and_never_leaks_markup():
    p = ChatStreamParser(thinking=False)
    assert [(d.kind, d.text) for d in p.feed("Hello wor")] == [("content", "Hello wor")]
    assert [(d.kind, d.text) for d in p.feed("ld <｜DS")] == [("content", "ld")]  # "<｜DS" may be a tag
    assert p.feed("ML｜tool_calls>\n<｜DSML｜invoke name=\"f\">") == []
    ds = p.feed("</｜DSML｜invoke>")
    assert [(d.kind, d.name, d.arguments, d.index) for d in ds] == [("tool_call", "f", "{}", 0)]
    assert [(d.kind, d.text) for d in p.feed("</｜DSML｜tool_calls> done \n")] == [("content", " done")]
    assert p.finish() == []  # trailing whitespace is dropped
    # no split of the sample puts markup into the text
    for i in range(len(SAMPLE) + 1):
        p = ChatStreamParser(thinking=True)
        texts = [d.text for d in p.feed(SAMPLE[:i]) + p.feed(SAMPLE[i:]) + p.finish() if d.kind != "tool_call"]
        assert not any("｜" in t or "<" in t for t in texts), (i, texts)


def test_streaming_is_split_invariant_on_random_markup():
    import random
    pieces = ["a", " ", "\n", "<", ">", '"', "</think>", "<think>", "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>",
              '<｜DSML｜invoke name="f">', '<｜DSML｜invoke name="', "</｜DSML｜invoke>",
              '<｜DSML｜parameter name="x" string="true">', '<｜DSML｜parameter name="y" string="false">',
              "</｜DSML｜parameter>", "<｜end▁of▁sentence｜>", "<｜DSML", "｜", "1", '{"k": 2}', "ü"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        thinking = rng.random() < 0.5
        p = ChatStreamParser(thinking)
        whole = _collect(p.feed(text) + p.finish())
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        p, deltas, last = ChatStreamParser(thinking), [], 0
        for c in cuts + [len(text)]:
            deltas += p.feed(text[last:c])
            last = c
        assert _collect(deltas + p.finish()) == whole, (text, cuts)


@pytest.mark.parametrize("out,content", [
    # a misspelt attribute: the block so far comes back as text, the rest is read on
    ('Hi <｜DSML｜tool_calls>\n<｜DSML｜invoke nam="f">x</｜DSML｜invoke>',
     'Hi <｜DSML｜tool_calls>\n<｜DSML｜invoke nam="f">x</｜DSML｜invoke>'),
    # text where an element should be
    ('<｜DSML｜tool_calls>oops', '<｜DSML｜tool_calls>oops'),
    # a bad string flag
    ('<｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="a" string="maybe">1'
     '</｜DSML｜parameter>',
     '<｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="a" string="maybe">1'
     '</｜DSML｜parameter>'),
    # unfinished at the end
    ('Sure. <｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="a" string="true">ab',
     'Sure. <｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="a" string="true">ab'),
    ('<｜DSML｜tool_calls', '<｜DSML｜tool_calls'),
    # the end of the sentence inside a value
    ('<｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="a" string="true">ab'
     '<｜end▁of▁sentence｜>after',
     '<｜DSML｜tool_calls><｜DSML｜invoke name="f"><｜DSML｜parameter name="a" string="true">ab'),
])
def test_malformed_dsml_comes_back_as_text(out, content):
    assert parse_output(out, thinking=False) == (None, content, [])
    for i in range(len(out) + 1):  # the same at every split
        p = ChatStreamParser(thinking=False)
        assert _collect(p.feed(out[:i]) + p.feed(out[i:]) + p.finish()) == ("", content, []), i


def test_a_broken_invoke_keeps_the_calls_before_it():
    out = ('<｜DSML｜tool_calls><｜DSML｜invoke name="f"></｜DSML｜invoke><｜DSML｜invoke name="g">junk'
           '</｜DSML｜invoke></｜DSML｜tool_calls>')
    r, c, calls = parse_output(out, thinking=False)
    assert [x["function"]["name"] for x in calls] == ["f"]
    assert c == '<｜DSML｜invoke name="g">junk</｜DSML｜invoke></｜DSML｜tool_calls>'


def test_encoded_assistant_turn_parses_back():
    call = {"id": "call_x", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": json.dumps({"city": "São Paulo", "days": 2, "tags": ["a", None],
                                                  "odd": "ends with </｜DSML｜parameter> inside"},
                                                 ensure_ascii=False)}}
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "reasoning_content": "hmm", "content": "Checking.", "tool_calls": [call]}]
    prompt = encode_messages(msgs, tools=[WEATHER], thinking=True, add_generation_prompt=False)
    gen = encode_messages(msgs[:1], tools=[WEATHER], thinking=True)
    assert prompt.startswith(gen)
    r, c, calls = parse_output(prompt[len(gen):], thinking=True)
    assert (r, c) == ("hmm", "Checking.")
    assert json.loads(calls[0]["function"]["arguments"]) == json.loads(call["function"]["arguments"])


# --------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer
    d = write_test_tokenizer(tmp_path / "ck", 1024)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) <= 1024
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.token_to_id("<｜end▁of▁sentence｜>") == 1
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == "<｜begin▁of▁sentence｜>" and cfg["eos_token"] == "<｜end▁of▁sentence｜>"
    assert cfg["model_max_length"] == 4096
    text = "Hello, world!  The weather: 21 C.\n\tdef f(x): return x * 2  # ~`@$%^&*()_+-=[]{}|;':\",./<>?"
    assert tok.decode(tok.encode(text).ids) == text
    for s in ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>",
              "</think>", "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", "</｜DSML｜invoke>", "</｜DSML｜parameter>"):
        assert len(tok.encode(s).ids) == 1, s
    messages = [SYSTEM, {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "Checking.", "reasoning_content": "Use the tool.",
                 "tool_calls": [{"id": "c", "type": "function",
                                 "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "c", "content": "sunny"}]
    prompt = encode_messages(messages, tools=[WEATHER], thinking=True)
    ids = tok.encode(prompt).ids
    assert ids[0] == 0 and max(ids) < 1024
    assert tok.decode(ids, skip_special_tokens=False) == prompt
    # the same files load in transformers (AutoTokenizer reads tokenizer_config.json)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    assert hf.bos_token_id == 0 and hf.eos_token_id == 1 and hf.model_max_length == 4096
    assert hf.decode(hf(prompt, add_special_tokens=False)["input_ids"]) == prompt


def test_tokenizer_size_is_bounded(tmp_path):
    from tokenizers import Tokenizer
    d = write_test_tokenizer(tmp_path, 300)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size(with_added_tokens=True) <= 300
    assert tok.decode(tok.encode("plain text 123").ids) == "plain text 123"
    with pytest.raises(ValueError, match="too small"):
        write_test_tokenizer(tmp_path, 200)
