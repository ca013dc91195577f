"""Streaming parser: generated K2 token ids -> typed events (k2mlx/events.py).

K2 marks structure with special tokens, which the model emits as single ids, so the parser is a
small state machine over ids; text between markers goes through an incremental UTF-8 decoder
(a token may end inside a character), so deltas are exact whatever the chunking.

    <think> reasoning </think> text <|tool_calls_section_begin|>
      <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> {json} <|tool_call_end|>
      ... <|tool_calls_section_end|>

Never raises on model output: a malformed section (a garbage call id, a call or section never
closed, stray markers) degrades to text or is closed as well as it can be, and a ParseWarning
says what happened. Arguments that are not JSON end with `ToolCallEnd(valid_json=False)`.
"""
from __future__ import annotations

import codecs
import json
import re
from typing import Iterable

from k2mlx.events import (
    ParseWarning,
    ReasoningDelta,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallBegin,
    ToolCallEnd,
)

SECTION_BEGIN = "<|tool_calls_section_begin|>"
SECTION_END = "<|tool_calls_section_end|>"
CALL_BEGIN = "<|tool_call_begin|>"
ARG_BEGIN = "<|tool_call_argument_begin|>"
CALL_END = "<|tool_call_end|>"
THINK = "<think>"
END_THINK = "</think>"

# `functions.NAME:IDX` (the native form); also accepts `NAME:IDX` and a bare `NAME`. The name is
# the last dot-separated part before the colon, as vLLM reads it.
_ID = re.compile(r"^(?P<path>(?:[\w\-]+\.)*(?P<name>[\w\-]+))(?::(?P<idx>\d+))?$")

TEXT, REASONING, SECTION, CALL_ID, ARGS, BAD_CALL = "text", "reasoning", "section", "call_id", "args", "bad_call"


class StreamParser:
    """Feed generated token ids one at a time (`feed`) or in chunks (`feed_many`); each call
    returns the events completed so far. Call `finish()` at the end of generation.

    `start_in_reasoning`: the prompt itself ended with `<think>` (K2.5-style), so output starts
    as reasoning. `buffer_arguments`: hold each call's arguments until `<|tool_call_end|>`, so a
    call whose arguments are not JSON degrades to text instead of being streamed."""

    def __init__(self, tokenizer, start_in_reasoning: bool = False, buffer_arguments: bool = False,
                 tool_names: Iterable[str] | None = None):
        sp = tokenizer.special_tokens
        self._id_to_bytes = tokenizer.id_to_bytes
        self._ids = {name: sp.get(name) for name in
                     (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END, THINK, END_THINK)}
        self._by_id = {v: k for k, v in self._ids.items() if v is not None}
        self._special = set(sp.values())
        self.buffer_arguments = buffer_arguments
        # declared tool names, so a name with dots (`functions.srv.tool:0`) is read whole
        self.tool_names = set(tool_names or ())
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.state = REASONING if start_in_reasoning else TEXT
        self.calls = 0  # completed or open tool calls so far
        self._used_ids: set[str] = set()
        self._buf = ""  # the current call's id text, arguments, or a bad call's text
        self._call: tuple[int, str, str] | None = None  # (index, id, name) of the open call
        self._raw: list[str] = []  # the open section's raw text, for warnings

    # ---- public ---------------------------------------------------------------------------
    @property
    def has_tool_calls(self) -> bool:
        return self.calls > 0

    def feed(self, token: int) -> list:
        out: list = []
        marker = self._by_id.get(token)
        if marker is not None:
            self._flush_text(out)
            self._marker(marker, out)
        elif token in self._special:
            # other specials (<|im_end|>, [EOS], reserved ...) are never content
            self._flush_text(out)
        else:
            self._text(self._dec.decode(self._id_to_bytes(token)), out)
        return out

    def feed_many(self, tokens: Iterable[int]) -> list:
        out: list = []
        for t in tokens:
            out += self.feed(int(t))
        return out

    def finish(self) -> list:
        """Flush at the end of generation; closes whatever the model left open."""
        out: list = []
        self._text(self._dec.decode(b"", final=True), out)
        if self.state == CALL_ID:
            self._degrade(out, "a tool call was cut off before its arguments")
        elif self.state == BAD_CALL:
            self._degrade(out, "a malformed tool call was never closed")
        elif self.state == ARGS:
            out.append(ParseWarning(f"tool call {self._call[1]} was not closed; closing it at the end of output"))
            self._end_call(out)
        elif self.state == SECTION and self._raw:
            out.append(ParseWarning("the tool-call section was not closed"))
        self.state = TEXT
        return out

    # ---- internals ------------------------------------------------------------------------
    def _flush_text(self, out: list) -> None:
        # a marker ends any partial UTF-8 character before it
        self._text(self._dec.decode(b"", final=True), out)
        self._dec.reset()

    def _text(self, s: str, out: list) -> None:
        if not s:
            return
        st = self.state
        if st == TEXT:
            out.append(TextDelta(s))
        elif st == REASONING:
            out.append(ReasoningDelta(s))
        elif st == ARGS:
            self._buf += s
            if not self.buffer_arguments:
                out.append(ToolCallArgsDelta(self._call[0], s))
        elif st in (CALL_ID, BAD_CALL):
            self._buf += s
            self._raw.append(s)
        elif st == SECTION:
            self._raw.append(s)
            if s.strip():  # K2 puts nothing between calls; keep stray text visible
                out.append(ParseWarning(f"text between tool calls kept as text: {s[:80]!r}"))
                out.append(TextDelta(s))

    def _marker(self, m: str, out: list) -> None:
        st = self.state
        if m == THINK:
            if st == TEXT:
                self.state = REASONING
            elif st != REASONING:
                out.append(ParseWarning(f"{THINK} inside a tool-call section ignored"))
            return
        if m == END_THINK:
            if st == REASONING:
                self.state = TEXT
            else:
                out.append(ParseWarning(f"{END_THINK} without {THINK} ignored"))
            return
        if m == SECTION_BEGIN:
            if st in (TEXT, REASONING):  # a call may follow reasoning directly
                self.state, self._raw = SECTION, [SECTION_BEGIN]
            else:
                out.append(ParseWarning(f"nested {SECTION_BEGIN} ignored"))
            return
        if m == CALL_BEGIN:
            if st in (TEXT, REASONING):
                out.append(ParseWarning(f"{CALL_BEGIN} outside a tool-call section; treated as one"))
                self.state, self._raw = SECTION, [SECTION_BEGIN]
                st = SECTION
            if st == SECTION:
                self.state, self._buf = CALL_ID, ""
                self._raw.append(CALL_BEGIN)
                return
            if st == ARGS:  # the previous call was never closed
                out.append(ParseWarning(f"tool call {self._call[1]} was not closed before the next one"))
                self._end_call(out)
            else:
                self._degrade(out, "a tool call was interrupted by the next one")
            self.state, self._buf = CALL_ID, ""
            self._raw.append(CALL_BEGIN)
            return
        if m == ARG_BEGIN:
            if st == CALL_ID:
                self._begin_call(out)
            elif st == BAD_CALL:
                self._raw.append(ARG_BEGIN)
            else:
                out.append(ParseWarning(f"stray {ARG_BEGIN} ignored"))
            return
        if m == CALL_END:
            if st == ARGS:
                self._end_call(out)
                self.state = SECTION
            elif st in (CALL_ID, BAD_CALL):
                self._degrade(out, "malformed tool call (no arguments)" if st == CALL_ID else "malformed tool call")
                self.state = SECTION
            else:
                out.append(ParseWarning(f"stray {CALL_END} ignored"))
            return
        if m == SECTION_END:
            if st == ARGS:
                out.append(ParseWarning(f"tool call {self._call[1]} was not closed before the section end"))
                self._end_call(out)
            elif st in (CALL_ID, BAD_CALL):
                self._degrade(out, "malformed tool call at the section end")
            elif st not in (SECTION,):
                out.append(ParseWarning(f"stray {SECTION_END} ignored"))
                return
            self.state, self._raw = TEXT, []

    def _begin_call(self, out: list) -> None:
        raw_id = self._buf.strip()
        m = _ID.match(raw_id)
        if m is None:
            self.state = BAD_CALL
            self._raw.append(ARG_BEGIN)
            return
        name, index = m.group("name"), self.calls
        path = m.group("path")
        path = path[len("functions."):] if path.startswith("functions.") else path
        if path in self.tool_names:
            name = path
        cid = raw_id if raw_id.startswith("functions.") and m.group("idx") is not None else f"functions.{name}:{index}"
        if cid in self._used_ids:  # ids must be unique within a reply
            cid = f"functions.{name}:{index}"
            k = index
            while cid in self._used_ids:
                k += 1
                cid = f"functions.{name}:{k}"
        self._used_ids.add(cid)
        self.calls += 1
        self._call = (index, cid, name)
        self.state, self._buf = ARGS, ""
        if not self.buffer_arguments:
            out.append(ToolCallBegin(index, cid, name))

    def _end_call(self, out: list) -> None:
        index, cid, name = self._call
        args = self._buf
        if not args.strip():  # a call without arguments: K2 means {}
            args = "{}"
            if not self.buffer_arguments:
                out.append(ToolCallArgsDelta(index, args))
        try:
            json.loads(args)
            valid = True
        except ValueError:
            valid = False
        if self.buffer_arguments:
            if not valid:
                self.calls -= 1
                self._used_ids.discard(cid)
                out.append(ParseWarning(f"arguments of {cid} are not JSON; kept as text: {args[:80]!r}"))
                out.append(TextDelta(args))
                self._call, self._buf = None, ""
                return
            out += [ToolCallBegin(index, cid, name), ToolCallArgsDelta(index, args)]
        elif not valid:
            out.append(ParseWarning(f"arguments of {cid} are not valid JSON: {args[:80]!r}"))
        out.append(ToolCallEnd(index, args, valid))
        self._call, self._buf = None, ""

    def _degrade(self, out: list, why: str) -> None:
        """Turn the text of a broken call into plain text, with a warning showing the raw form."""
        raw = "".join(self._raw)
        out.append(ParseWarning(f"{why}; kept as text: {raw[-120:]!r}"))
        if self._buf:
            out.append(TextDelta(self._buf))
        self._buf = ""


def parse_all(tokenizer, tokens: Iterable[int], **kwargs) -> list:
    """Parse a whole generation at once (non-streaming replies, tests)."""
    p = StreamParser(tokenizer, **kwargs)
    return p.feed_many(tokens) + p.finish()
