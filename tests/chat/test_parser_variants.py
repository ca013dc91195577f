"""Issue 13's Kimi tool-call parsing cases (other servers' tests): malformed and nameless call ids,
chunking independence with stray text inside sections, marker spellings, double-encoded
arguments and calls to undeclared tools. Driven with the tiny checkpoints' real tokenizers."""
from __future__ import annotations

import json
import random

import pytest

from k2mlx.chat.parser import StreamParser, parse_all
from k2mlx.events import ParseWarning, ReasoningDelta, TextDelta, ToolCallArgsDelta, ToolCallBegin, ToolCallEnd

from tests.chat.test_chat_parser import AB, CB, CE, SB, SE, call, check_invariants, collapse, think_tok  # noqa: F401

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "read_file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]


def calls_of(events):
    return [(e.id, e.name) for e in events if isinstance(e, ToolCallBegin)]


def ends_of(events):
    return [e for e in events if isinstance(e, ToolCallEnd)]


def run(tok, text, **kw):
    return collapse(parse_all(tok, tok.encode(text), **kw))


# ---- call ids ---------------------------------------------------------------------------------
def test_malformed_id_is_dropped_and_neighbours_kept(tiny_tokenizer):
    text = SB + call("functions.get_weather:0", '{"city":"Rome"}') + call("functions.invalid.0", '{"x":1}') \
        + call("functions.read_file:2", '{"path":"a"}') + SE
    for kw in ({}, {"tools": TOOLS}, {"buffer_arguments": True}):
        ev = run(tiny_tokenizer, text, **kw)
        # the old parser read `functions.invalid.0` as a call to a tool named "0"
        assert [n for _, n in calls_of(ev)] == ["get_weather", "read_file"], kw
        assert [e.index for e in ends_of(ev)] == [0, 1]
        assert any("malformed" in e.message for e in ev if isinstance(e, ParseWarning))
        assert not any(isinstance(e, TextDelta) for e in ev)
        check_invariants(ev)


@pytest.mark.parametrize("cid", ["0", "call_3", "toolu_01AbC", "call-xyz"])
def test_nameless_ids_map_to_the_one_tool_that_fits(tiny_tokenizer, cid):
    text = SB + call(cid, '{"path": "notes.txt"}') + call(cid, '{"city": "Oslo", "unit": "C"}') + SE
    ev = run(tiny_tokenizer, text, tools=TOOLS)
    assert calls_of(ev) == [("functions.read_file:0", "read_file"), ("functions.get_weather:1", "get_weather")]
    assert [e.arguments for e in ends_of(ev)] == ['{"path": "notes.txt"}', '{"city": "Oslo", "unit": "C"}']
    check_invariants(ev)


def test_nameless_ids_without_exactly_one_fit_are_dropped(tiny_tokenizer):
    both = [TOOLS[1], {"type": "function", "function": {"name": "cat", "parameters": {
        "type": "object", "properties": {"path": {"type": "string"}}}}}]
    text = SB + call("0", '{"path": "a"}') + call("functions.cat:1", '{"path": "b"}') + SE
    ev = run(tiny_tokenizer, text, tools=both)  # two tools fit: ambiguous
    assert calls_of(ev) == [("functions.cat:1", "cat")]
    assert any("2 declared tools" in e.message for e in ev if isinstance(e, ParseWarning))
    ev = run(tiny_tokenizer, SB + call("call_9", '{"nothing": 1}') + SE, tools=TOOLS)  # none fits
    assert calls_of(ev) == [] and any("dropped" in e.message for e in ev if isinstance(e, ParseWarning))
    ev = run(tiny_tokenizer, SB + call("0", '{"path": "a"}') + SE)  # no declared tools to map to
    assert calls_of(ev) == []


def test_undeclared_tools_become_text(tiny_tokenizer):
    text = "Sure." + SB + call("functions.rm_rf:0", '{"path":"/"}') + call("functions.get_weather:1", '{"city":"Rome"}') + SE
    ev = run(tiny_tokenizer, text, tools=TOOLS)
    assert calls_of(ev) == [("functions.get_weather:1", "get_weather")]
    assert TextDelta('functions.rm_rf:0{"path":"/"}') in ev
    assert any("undeclared" in e.message for e in ev if isinstance(e, ParseWarning))
    assert calls_of(run(tiny_tokenizer, text, tool_names=[])) == []  # nothing declared: no calls
    assert len(calls_of(run(tiny_tokenizer, text))) == 2  # declared tools unknown: any name


# ---- chunking ---------------------------------------------------------------------------------
CORPUS = [
    "Let me check." + SB + "\n" + call("functions.get_weather:0", '{"city": "Zürich"}') + "\n  \n"
    + call("functions.read_file:1", ' {"path": "ü.txt"}\n') + "\n" + SE + "Done.",
    SB + call("functions.get_weather:0", "{}") + " and also, in between: " + call("functions.read_file:1", "{}")
    + " tail" + SE,
    "x" + SB + "\n " + call("functions.invalid.0", '{"a": 1}') + "\n" + call("0", '{"path": "p"}') + SE,
    "<think>先想 🤔 a < b <| not a marker</think>ok <|tool" + SB + call("functions.get_weather:0", '"{\\"city\\": \\"東京\\"}"') + SE,
    "a<b <|im_start|> <|tool_calls_section_begin 🌧️ no markers " + CE + " stray end",
    SB + call("functions.get_weather:0", '{"city": "Rome"') + "   ",  # never closed
]


def feed_chunks(tok, data, sizes, **kw):
    """Feed token ids (a list) or output bytes in chunks of sizes() items."""
    p, out, i = StreamParser(tok, **kw), [], 0
    feed = p.feed_bytes if isinstance(data, bytes) else p.feed_many
    while i < len(data):
        n = sizes()
        out += feed(data[i : i + n])
        i += n
    return out + p.finish()


@pytest.mark.parametrize("k", range(len(CORPUS)))
@pytest.mark.parametrize("kw", [{"tools": TOOLS}, {"buffer_arguments": True, "tools": TOOLS}, {}])
def test_identical_events_for_every_chunking(think_tok, k, kw):
    text = CORPUS[k]
    ids = think_tok.encode(text)  # markers become their special ids
    whole = feed_chunks(think_tok, ids, lambda: len(ids), **kw)
    ref = collapse(whole)
    check_invariants(ref)
    assert feed_chunks(think_tok, ids, lambda: 1, **kw) == whole  # per token: the very same list
    data = text.encode()
    assert collapse(feed_chunks(think_tok, data, lambda: 1, **kw)) == ref  # one byte at a time
    assert collapse(feed_chunks(think_tok, data, lambda: len(data), **kw)) == ref
    # markers written as ordinary text tokens rather than special ids
    spelled = think_tok.encode(text, allow_special=False)
    assert collapse(feed_chunks(think_tok, spelled, lambda: 1, **kw)) == ref
    rng = random.Random(k)
    for _ in range(10):
        assert collapse(feed_chunks(think_tok, data, lambda: rng.randint(1, 7), **kw)) == ref
        assert collapse(feed_chunks(think_tok, ids, lambda: rng.randint(1, 4), **kw)) == ref
        assert not any("\ufffd" in getattr(e, "text", "") for e in feed_chunks(think_tok, data, lambda: rng.randint(1, 3), **kw))


def test_stray_text_inside_a_section_is_kept_and_whitespace_dropped(think_tok):
    ev = run(think_tok, CORPUS[0], tools=TOOLS)
    # whitespace between the markers is section formatting: gone, with no warning
    assert [e.text for e in ev if isinstance(e, TextDelta)] == ["Let me check.", "Done."]
    assert not [e for e in ev if isinstance(e, ParseWarning)]
    assert ends_of(ev)[1].arguments == ' {"path": "ü.txt"}\n'
    ev = run(think_tok, CORPUS[1], tools=TOOLS)
    assert [e.text for e in ev if isinstance(e, TextDelta)] == [" and also, in between: ", " tail"]
    assert sum("kept as text" in e.message for e in ev if isinstance(e, ParseWarning)) == 2
    assert [e.index for e in ends_of(ev)] == [0, 1]


def test_marker_prefixes_that_are_not_markers_stay_text(think_tok):
    ev = run(think_tok, CORPUS[3], tools=TOOLS)
    assert ev[0] == ReasoningDelta("先想 🤔 a < b <| not a marker")
    assert ev[1] == TextDelta("ok <|tool")
    ev = run(think_tok, CORPUS[4])
    assert ev[0] == TextDelta("a<b <|im_start|> <|tool_calls_section_begin 🌧️ no markers ")


# ---- variants ---------------------------------------------------------------------------------
def test_both_spellings_of_the_section_markers(tiny_tokenizer):
    for begin, end in ((SB, SE), ("<|tool_call_section_begin|>", "<|tool_call_section_end|>"),
                       ("<|tool_call_section_begin|>", SE)):
        ev = run(tiny_tokenizer, "Hi." + begin + call("functions.get_weather:0", '{"city":"Rome"}') + end + "Bye.")
        assert ev == [TextDelta("Hi."), ToolCallBegin(0, "functions.get_weather:0", "get_weather"),
                      ToolCallArgsDelta(0, '{"city":"Rome"}'), ToolCallEnd(0, '{"city":"Rome"}', True),
                      TextDelta("Bye.")], begin


def test_arguments_as_a_json_encoded_string(tiny_tokenizer):
    inner = {"city": "Rome", "days": [1, 2]}
    encoded = json.dumps(json.dumps(inner))
    for kw in ({}, {"buffer_arguments": True}, {"tools": TOOLS}):
        ev = run(tiny_tokenizer, SB + call("functions.get_weather:0", "\n" + encoded) + SE, **kw)
        (end,) = ends_of(ev)
        assert json.loads(end.arguments) == inner and end.valid_json
        check_invariants(ev)
    # a plain JSON string that holds no JSON is left as it is
    ev = run(tiny_tokenizer, SB + call("functions.get_weather:0", '"Rome"') + SE)
    assert ends_of(ev) == [ToolCallEnd(0, '"Rome"', True)]


def test_marker_text_inside_argument_strings_is_content(think_tok):
    """An agent writing a file that mentions K2's markers: the spelled-out markers inside the JSON
    string stay in the arguments, for tokens and bytes alike; the real token still ends the call."""
    content = f'x = "{CE}{SE}" \\" {CB}'
    args = json.dumps({"path": "p.py", "content": content})
    text = SB + call("functions.write_file:0", args) + SE
    ids = think_tok.encode(SB + CB + "functions.write_file:0" + AB) + think_tok.encode(args, allow_special=False) \
        + think_tok.encode(CE + SE)
    ev = collapse(parse_all(think_tok, ids))
    assert [e.arguments for e in ev if isinstance(e, ToolCallEnd)] == [args]
    assert json.loads(args)["content"] == content
    assert collapse(feed_chunks(think_tok, text.encode(), lambda: 1)) == ev
    assert collapse(feed_chunks(think_tok, ids, lambda: 1)) == ev
