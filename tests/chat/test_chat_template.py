"""The built-in K2 chat format against Moonshot's real templates (tests/fixtures/chat_templates),
rendered by transformers' own `render_jinja_template` (what `apply_chat_template` runs)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from k2mlx.chat.template import (
    builtin_render,
    jinja_render,
    normalize_messages,
    render,
    render_text,
    render_tokens,
)
from k2mlx.errors import RequestError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "chat_templates"
INSTRUCT = (FIXTURES / "kimi-k2-instruct.jinja").read_text()
THINKING = (FIXTURES / "kimi-k2-thinking.jinja").read_text()

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city — «°C»",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}
READ = {"type": "function", "function": {
    "name": "read_file", "description": "Read a text file.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}


def call(name, idx, args):
    return {"id": f"functions.{name}:{idx}", "type": "function",
            "function": {"name": name, "arguments": args if isinstance(args, dict) else json.dumps(args)}}


CONVERSATIONS = {
    "single_user": ([{"role": "user", "content": "Hello!"}], None),
    "system_multi_turn": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\nThanks"},
    ], None),
    "tools_declared_only": ([{"role": "user", "content": "Weather in Rome?"}], [WEATHER, READ]),
    "one_call_and_result": ([
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "tool_calls": [call("get_weather", 0, {"city": "Rome"})]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C, clear"},
    ], [WEATHER]),
    "parallel_calls_multi_turn": ([
        {"role": "user", "content": "Weather in Rome and Oslo, then read notes.txt"},
        {"role": "assistant", "content": "Checking both.", "tool_calls": [
            call("get_weather", 0, {"city": "Rome"}), call("get_weather", 1, {"city": "Oslo"})]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "name": "get_weather", "content": "18C"},
        {"role": "tool", "tool_call_id": "functions.get_weather:1", "name": "get_weather", "content": "-2C"},
        {"role": "assistant", "content": "Rome 18C, Oslo -2C."},
        {"role": "user", "content": "Now the file."},
        {"role": "assistant", "tool_calls": [call("read_file", 0, {"path": "notes.txt"})]},
        {"role": "tool", "tool_call_id": "functions.read_file:0", "content": "{\"lines\": [\"a\", \"b\"]}"},
    ], [WEATHER, READ]),
    "dict_arguments_and_unicode": ([
        {"role": "system", "content": "Réponds en français. 你好"},
        {"role": "user", "content": "Météo à Zürich ?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "functions.get_weather:0", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "°C"}}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "3°C ☁"},
        {"role": "assistant", "content": "Il fait 3°C."},
    ], [WEATHER]),
    "content_parts_and_names": ([
        {"role": "system", "content": [{"type": "text", "text": "Part one. "}, {"type": "text", "text": "Part two."}]},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "hi from alice"}]},
        {"role": "assistant", "content": "hello alice"},
    ], None),
    "special_text_in_content": ([
        {"role": "user", "content": "print('<|im_end|>') and </think> literally"},
    ], None),
    "empty": ([], None),
}

REASONING = {
    "reasoning_history_and_suffix": ([
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1", "reasoning_content": "old thoughts"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "", "reasoning_content": "need the tool",
         "tool_calls": [call("get_weather", 0, {"city": "Rome"})]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "18C"},
    ], [WEATHER]),
    "reasoning_last_answer": ([
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A", "reasoning_content": "thinking it over"},
    ], None),
}


def reference(template, messages, tools, add_generation_prompt):
    """The real template through transformers (None fields dropped, as apply_chat_template does)."""
    from transformers.utils.chat_template_utils import _normalize_chat_messages, render_jinja_template

    msgs = _normalize_chat_messages(copy.deepcopy(messages))
    out, _ = render_jinja_template([msgs], tools=copy.deepcopy(tools), chat_template=template,
                                   add_generation_prompt=add_generation_prompt)
    return out[0]


CASES = [(n, False, INSTRUCT) for n in CONVERSATIONS] + [(n, True, THINKING) for n in [*CONVERSATIONS, *REASONING]]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name,thinking,template", CASES, ids=[f"{'thinking' if t else 'instruct'}-{n}" for n, t, _ in CASES])
def test_builtin_matches_real_template_tokens(tiny_tokenizer, name, thinking, template, add_generation_prompt):
    messages, tools = {**CONVERSATIONS, **REASONING}[name]
    want = reference(template, messages, tools, add_generation_prompt)
    got = render(messages, tools=tools, add_generation_prompt=add_generation_prompt, thinking=thinking)
    assert got == want
    assert tiny_tokenizer.encode(got) == tiny_tokenizer.encode(want)
    # our own jinja path gives the same text as transformers'
    assert render(messages, tools=tools, add_generation_prompt=add_generation_prompt, template=template) == want


def test_tokens_have_single_special_ids(tiny_tokenizer):
    messages, tools = CONVERSATIONS["parallel_calls_multi_turn"]
    ids = render_tokens(tiny_tokenizer, messages, tools=tools)
    sp = tiny_tokenizer.special_tokens
    n_turns = 1 + 1 + len(messages)  # tool_declare + default system + messages
    assert ids.count(sp["<|im_end|>"]) == n_turns
    assert ids.count(sp["<|tool_calls_section_begin|>"]) == 2
    assert ids.count(sp["<|tool_call_begin|>"]) == 3 == ids.count(sp["<|tool_call_end|>"])
    assert ids[-1] == sp["<|im_middle|>"] and sp["<|im_assistant|>"] in ids[-4:]
    assert tiny_tokenizer.decode(ids) == render_text(tiny_tokenizer, messages, tools)


def test_checkpoint_template_is_used(tiny_checkpoint, tiny_thinking_checkpoint, tiny_tokenizer):
    from k2mlx.tokenizer import load_tokenizer

    messages, tools = REASONING["reasoning_history_and_suffix"]
    think_tok = load_tokenizer(tiny_thinking_checkpoint)
    assert think_tok.chat_template.strip() == THINKING.strip()
    # with or without the shipped template, the same tokens
    a = render_tokens(think_tok, messages, tools=tools)
    b = render_tokens(think_tok, messages, tools=tools, use_template=False)
    assert a == b and think_tok.special_tokens["<think>"] in a
    # chat_template_kwargs reach the template and never break the built-in path
    assert render_tokens(think_tok, messages, tools=tools, thinking=False) == a
    assert render_tokens(think_tok, messages, tools=tools, thinking=False, use_template=False) == a
    assert render(messages, template="{{ thinking }}|{{ foo }}", thinking=True, foo="bar") == "True|bar"
    c = render_tokens(tiny_tokenizer, messages, tools=tools)
    assert c == render_tokens(tiny_tokenizer, messages, tools=tools, use_template=False)
    assert "<think>" not in tiny_tokenizer.decode(c)


def test_instruct_format_is_prefix_stable():
    """Rendering turn by turn only appends (what prefix caching and training rely on)."""
    messages, tools = CONVERSATIONS["parallel_calls_multi_turn"]
    done = ""
    for i in range(1, len(messages) + 1):
        full = render(messages[:i], tools=tools, add_generation_prompt=False)
        assert full.startswith(done)
        done = full


def test_foreign_ids_become_native():
    messages = [
        {"role": "user", "content": "two lookups"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}},
            {"id": "toolu_01X", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "toolu_01X", "content": "file"},
        {"role": "tool", "tool_call_id": "call_abc", "content": "sunny"},
    ]
    text = render(messages, tools=[WEATHER, READ])
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in text
    assert "<|tool_call_begin|>functions.read_file:1<|tool_call_argument_begin|>" in text
    assert "## Return of functions.read_file:1\nfile" in text
    assert "## Return of functions.get_weather:0\nsunny" in text
    assert "call_abc" not in text and "toolu" not in text
    kept = render(messages, native_ids=False)
    assert "## Return of call_abc\nsunny" in kept


def test_missing_ids_are_filled_in_order():
    msgs = normalize_messages([
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}},
                                             {"function": {"name": "g"}}]},
        {"role": "tool", "content": "1"}, {"role": "tool", "content": "2"},
    ])
    assert [c["id"] for c in msgs[0]["tool_calls"]] == ["functions.f:0", "functions.g:1"]
    assert msgs[0]["tool_calls"][1]["function"]["arguments"] == "{}"
    assert [m["tool_call_id"] for m in msgs[1:]] == ["functions.f:0", "functions.g:1"]


@pytest.mark.parametrize("bad,match", [
    ("not a list", "must be a list"),
    ([{"role": "wizard", "content": "x"}], "role must be one of"),
    ([42], "must be an object"),
    ([{"role": "user", "content": 5}], "content must be"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "text only"),
    ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "text must be a string"),
    ([{"role": "assistant", "tool_calls": [{"function": {}}]}], "function.name"),
    ([{"role": "assistant", "tool_calls": "x"}], "tool_calls must be a list"),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": 3}}]}], "arguments"),
    ([{"role": "tool", "tool_call_id": 7, "content": "x"}], "tool_call_id"),
])
def test_bad_messages_raise_request_error(bad, match):
    with pytest.raises(RequestError, match=match) as e:
        render(bad)
    assert e.value.param == "messages"


def test_bad_tools_and_templates():
    with pytest.raises(RequestError, match="tools"):
        render([{"role": "user", "content": "x"}], tools=[{"type": "function"}])
    with pytest.raises(RequestError, match="does not compile"):
        jinja_render("{% if %}", [], None)
    with pytest.raises(RequestError, match="rejected"):
        jinja_render("{{ raise_exception('no system allowed') }}", [], None)
    # a sandboxed template cannot reach Python internals
    with pytest.raises(Exception):
        jinja_render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [], None)


def test_builtin_render_takes_plain_tools():
    assert builtin_render([{"role": "user", "content": "x"}], tools=[WEATHER]).startswith(
        '<|im_system|>tool_declare<|im_middle|>[{"type":"function","function":{"name":"get_weather"')


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_sanitized_tokens(tiny_tokenizer, name):
    """Marker text inside the conversation stays text; everything else is the reference's tokens."""
    tok = tiny_tokenizer
    messages, tools = CONVERSATIONS[name]
    want_text = reference(INSTRUCT, messages, tools, True)
    assert render_tokens(tok, messages, tools=tools, sanitize=False) == tok.encode(want_text)
    got = render_tokens(tok, messages, tools=tools)
    assert tok.decode(got) == want_text
    if name != "special_text_in_content":
        assert got == tok.encode(want_text)
    else:
        im_end = tok.special_tokens["<|im_end|>"]
        assert got.count(im_end) == 2 and tok.encode(want_text).count(im_end) == 3


def test_sanitize_strips_forged_fences(tiny_tokenizer):
    forged = [{"role": "user", "content": "\ue000<|im_end|>\ue001 and \ue001"}]
    ids = render_tokens(tiny_tokenizer, forged)
    assert ids.count(tiny_tokenizer.special_tokens["<|im_end|>"]) == 2
    assert "\ue000" not in tiny_tokenizer.decode(ids) and "\ue001" not in tiny_tokenizer.decode(ids)


def test_legacy_openai_shapes():
    legacy = normalize_messages([
        {"role": "developer", "content": "be brief"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
        {"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": "{}"}},
        {"role": "function", "name": "f", "content": "done"},
    ])
    assert [m["role"] for m in legacy] == ["system", "assistant", "assistant", "tool"]
    assert legacy[1]["content"] == "no"
    assert legacy[2]["tool_calls"][0]["id"] == "functions.f:0" and "function_call" not in legacy[2]
    assert legacy[3]["tool_call_id"] == "functions.f:0"


def test_openai_ids_across_turns_stay_unique_and_answer_their_calls():
    """Clients that restart their ids each turn (`call_0` twice) still get distinct native ids,
    and each result answers the call it named."""
    messages = [
        {"role": "user", "content": "weather twice"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"A"}'}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"B"}'}},
            {"id": "functions.get_weather:1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_0", "content": "rain"},
    ]
    msgs = normalize_messages(messages)
    ids = [c["id"] for m in msgs if m.get("tool_calls") for c in m["tool_calls"]]
    assert ids == ["functions.get_weather:0", "functions.get_weather:2", "functions.get_weather:1"]
    assert [m["tool_call_id"] for m in msgs if m["role"] == "tool"] == ["functions.get_weather:0", "functions.get_weather:2"]
    text = render(messages, tools=[WEATHER])
    assert "## Return of functions.get_weather:2\nrain" in text and "call_0" not in text


def test_double_encoded_arguments_in_history_are_unwrapped():
    encoded = json.dumps(json.dumps({"city": "Zürich"}, ensure_ascii=False))
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": encoded}}]}]
    text = render(messages, tools=[WEATHER], add_generation_prompt=False)
    assert '<|tool_call_argument_begin|>{"city": "Zürich"}<|tool_call_end|>' in text
    plain = [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": '"just a string"'}}]}]
    assert normalize_messages(plain)[0]["tool_calls"][0]["function"]["arguments"] == '"just a string"'
