"""The streaming output parser driven with real token streams from the tiny K2 tokenizers."""
from __future__ import annotations

import json
import random

import pytest

from k2mlx.chat.parser import StreamParser, parse_all
from k2mlx.engine.events import (
    ParseWarning,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallBegin,
    ToolCallEnd,
)

SB, SE = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CB, AB, CE = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"


@pytest.fixture(scope="module")
def think_tok(tiny_thinking_checkpoint):
    from k2mlx.tokenizer import load_tokenizer

    return load_tokenizer(tiny_thinking_checkpoint)


def call(cid, args):
    return f"{CB}{cid}{AB}{args}{CE}"


def collapse(events):
    """Merge consecutive deltas of the same kind (and call) so chunking does not matter."""
    out = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, (TextDelta, ReasoningDelta)):
            out[-1] = type(e)(out[-1].text + e.text)
        elif out and isinstance(e, ToolCallArgsDelta) and isinstance(out[-1], ToolCallArgsDelta) \
                and e.index == out[-1].index:
            out[-1] = ToolCallArgsDelta(e.index, out[-1].text + e.text)
        else:
            out.append(e)
    return out


def run(tok, text, **kw):
    return collapse(parse_all(tok, tok.encode(text), **kw))


def warnings(events):
    return [e for e in events if isinstance(e, ParseWarning)]


def check_invariants(events):
    """What every consumer relies on, whatever the model emitted."""
    open_calls, seen_ids, args = {}, set(), {}
    for e in events:
        if isinstance(e, ToolCallBegin):
            assert e.index not in open_calls and e.id not in seen_ids
            assert e.id.startswith("functions.") and e.id.split(":")[0].endswith(e.name)
            open_calls[e.index], args[e.index] = e, ""
            seen_ids.add(e.id)
        elif isinstance(e, ToolCallArgsDelta):
            assert e.index in open_calls
            args[e.index] += e.text
        elif isinstance(e, ToolCallEnd):
            assert e.index in open_calls
            del open_calls[e.index]
            assert args[e.index] == e.arguments
            if e.valid_json:
                json.loads(e.arguments)
    assert not open_calls, "a call was left open"
    return seen_ids


def test_text_only(tiny_tokenizer):
    text = "Hello! Plain answer with 你好 and émoji 🤖,\nover two lines."
    ev = run(tiny_tokenizer, text + "<|im_end|>")
    assert ev == [TextDelta(text)]


def test_one_call(tiny_tokenizer):
    ev = run(tiny_tokenizer, "Let me check." + SB + call("functions.get_weather:0", '{"city": "Rome"}') + SE)
    assert ev == [
        TextDelta("Let me check."),
        ToolCallBegin(0, "functions.get_weather:0", "get_weather"),
        ToolCallArgsDelta(0, '{"city": "Rome"}'),
        ToolCallEnd(0, '{"city": "Rome"}', True),
    ]


def test_two_parallel_calls(tiny_tokenizer):
    text = SB + call("functions.get_weather:0", '{"city":"Rome"}') + call("functions.read_file:1", '{"path":"a.txt"}') + SE
    p = StreamParser(tiny_tokenizer)
    ev = collapse(p.feed_many(tiny_tokenizer.encode(text)) + p.finish())
    assert p.has_tool_calls and p.calls == 2
    assert ev == [
        ToolCallBegin(0, "functions.get_weather:0", "get_weather"), ToolCallArgsDelta(0, '{"city":"Rome"}'),
        ToolCallEnd(0, '{"city":"Rome"}', True),
        ToolCallBegin(1, "functions.read_file:1", "read_file"), ToolCallArgsDelta(1, '{"path":"a.txt"}'),
        ToolCallEnd(1, '{"path":"a.txt"}', True),
    ]


def test_reasoning_then_text_then_calls(think_tok):
    text = "<think>The user wants weather. 先想一想.</think>Checking now." + SB + call("functions.get_weather:0", '{"city":"Oslo"}') + SE
    ev = run(think_tok, text)
    assert ev == [
        ReasoningDelta("The user wants weather. 先想一想."),
        TextDelta("Checking now."),
        ToolCallBegin(0, "functions.get_weather:0", "get_weather"),
        ToolCallArgsDelta(0, '{"city":"Oslo"}'),
        ToolCallEnd(0, '{"city":"Oslo"}', True),
    ]
    # reasoning straight into a call (no </think>) is still a call
    ev = run(think_tok, "<think>just call it" + SB + call("functions.f:0", "{}") + SE)
    assert ev[0] == ReasoningDelta("just call it") and ToolCallEnd(0, "{}", True) in ev


def test_prompt_ending_in_think(think_tok):
    ev = run(think_tok, "deep thoughts</think>answer", start_in_reasoning=True)
    assert ev == [ReasoningDelta("deep thoughts"), TextDelta("answer")]


STREAMS = [
    "Sure — 我来查一下 🌧️." + SB + call("functions.get_weather:0", '{"city": "Zürich", "unit": "°C"}')
    + call("functions.get_weather:1", '{"city": "東京"}') + SE,
    "<think>先想 🤔 then act</think>ok" + SB + call("functions.read_file:0", '{"path": "/tmp/ü.txt"}') + SE,
    "no markers at all, just ünïcödé text ✓",
]


@pytest.mark.parametrize("text", STREAMS)
def test_any_chunking_gives_the_same_events(think_tok, text):
    ids = think_tok.encode(text)
    whole = collapse(parse_all(think_tok, ids))
    assert not warnings(whole)
    rng = random.Random(0)
    for _ in range(30):
        p, events, i = StreamParser(think_tok), [], 0
        while i < len(ids):
            n = rng.randint(1, 5)
            events += p.feed_many(ids[i : i + n])
            i += n
        events += p.finish()
        # no delta ever carries half a character
        assert not any("\ufffd" in getattr(e, "text", "") for e in events)
        assert collapse(events) == whole
    check_invariants(whole)


def test_forced_prefix_from_the_engine(tiny_tokenizer):
    """tool_choice=named: the engine feeds section+call+id+argument markers before generation."""
    forced = tiny_tokenizer.encode(f"{SB}{CB}functions.get_weather:0{AB}")
    generated = tiny_tokenizer.encode('{"city":"Lima"}' + CE + SE)
    ev = collapse(parse_all(tiny_tokenizer, forced + generated))
    assert ev[0] == ToolCallBegin(0, "functions.get_weather:0", "get_weather")
    assert ev[-1] == ToolCallEnd(0, '{"city":"Lima"}', True)


# ---- malformed output -------------------------------------------------------------------------
def test_section_never_closed(tiny_tokenizer):
    ev = run(tiny_tokenizer, "x" + SB + CB + "functions.f:0" + AB + '{"a": 1')
    assert ev[0] == TextDelta("x") and ev[1] == ToolCallBegin(0, "functions.f:0", "f")
    assert ToolCallEnd(0, '{"a": 1', False) in ev
    assert any("not closed" in w.message for w in warnings(ev))
    check_invariants(ev)


def test_arguments_not_json(tiny_tokenizer):
    text = SB + call("functions.f:0", "city=Rome") + SE
    ev = run(tiny_tokenizer, text)
    assert ToolCallEnd(0, "city=Rome", False) in ev and warnings(ev)
    check_invariants(ev)
    # buffered: the broken call becomes text and no call is announced
    p = StreamParser(tiny_tokenizer, buffer_arguments=True)
    ev = collapse(p.feed_many(tiny_tokenizer.encode(text)) + p.finish())
    assert not any(isinstance(e, (ToolCallBegin, ToolCallEnd)) for e in ev)
    assert TextDelta("city=Rome") in ev and warnings(ev) and not p.has_tool_calls
    ok = collapse(parse_all(tiny_tokenizer, tiny_tokenizer.encode(SB + call("functions.f:0", '{"x":1}') + SE),
                            buffer_arguments=True))
    assert ok == [ToolCallBegin(0, "functions.f:0", "f"), ToolCallArgsDelta(0, '{"x":1}'), ToolCallEnd(0, '{"x":1}', True)]


def test_garbage_id_is_dropped(tiny_tokenizer):
    ev = run(tiny_tokenizer, SB + call("{not an id}", '{"a":1}') + call("functions.g:1", "{}") + SE)
    assert not any(isinstance(e, ToolCallBegin) and e.name != "g" for e in ev)
    assert not any(isinstance(e, TextDelta) for e in ev)  # a malformed call is dropped, not shown
    assert any("malformed" in w.message for w in warnings(ev))
    assert ToolCallBegin(0, "functions.g:1", "g") in ev  # the good call after it still works
    check_invariants(ev)


def test_ids_are_normalised_and_unique(tiny_tokenizer):
    ev = run(tiny_tokenizer, SB + call("functions.f:0", "{}") + call("functions.f:0", "{}") + call("g", "") + SE)
    begins = [e for e in ev if isinstance(e, ToolCallBegin)]
    assert [b.id for b in begins] == ["functions.f:0", "functions.f:1", "functions.g:2"]
    assert ToolCallEnd(2, "{}", True) in ev  # empty arguments mean {}
    check_invariants(ev)


def test_stray_markers_and_cut_offs(tiny_tokenizer):
    ev = run(tiny_tokenizer, f"a{CE}b{AB}c{SE}d")
    assert "".join(e.text for e in ev if isinstance(e, TextDelta)) == "abcd"
    assert len(warnings(ev)) == 3
    ev = run(tiny_tokenizer, f"{CB}functions.f:0{AB}{{}}{CE}")  # call without a section
    assert ToolCallEnd(0, "{}", True) in ev and warnings(ev)
    ev = run(tiny_tokenizer, f"{SB}{CB}functions.f:")  # cut off inside the id
    assert TextDelta("functions.f:") in ev and warnings(ev)
    ev = run(tiny_tokenizer, f"{SB}{CB}functions.f:0{AB}{{}}{CB}functions.g:1{AB}{{}}{CE}{SE}")
    assert [e.index for e in ev if isinstance(e, ToolCallEnd)] == [0, 1]
    check_invariants(ev)


def test_random_streams_never_raise(think_tok):
    """Random mixes of markers and text: no exception, and the invariants always hold."""
    sp = think_tok.special_tokens
    markers = [sp[m] for m in (SB, SE, CB, AB, CE, "<think>", "</think>", "<|im_end|>")]
    words = [think_tok.encode(w) for w in ("functions.f:0", '{"a": 1}', "{", "hi", " 你", "🤖", ":", "x.y")]
    rng = random.Random(1234)
    for _ in range(400):
        ids = []
        for _ in range(rng.randint(0, 25)):
            ids += [rng.choice(markers)] if rng.random() < 0.4 else rng.choice(words)
        ev = parse_all(think_tok, ids, buffer_arguments=rng.random() < 0.3)
        check_invariants(ev)


def test_declared_names_with_dots_and_digits(tiny_tokenizer):
    text = SB + call("functions.srv.read:0", "{}") + call("functions.3d_plot:1", "{}") + SE
    ev = run(tiny_tokenizer, text, tool_names=["srv.read", "3d_plot"])
    assert [(e.id, e.name) for e in ev if isinstance(e, ToolCallBegin)] == [
        ("functions.srv.read:0", "srv.read"), ("functions.3d_plot:1", "3d_plot")]
    ev = run(tiny_tokenizer, text)  # undeclared: the last dotted part, as vLLM reads it
    assert [e.name for e in ev if isinstance(e, ToolCallBegin)] == ["read", "3d_plot"]
