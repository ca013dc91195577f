"""Streaming parser: generated K2 token ids -> typed events (k2mlx/events.py).

K2 marks structure with special tokens, which the model normally emits as single ids:

    <think> reasoning </think> text <|tool_calls_section_begin|>
      <|tool_call_begin|> functions.NAME:IDX <|tool_call_argument_begin|> {json} <|tool_call_end|>
      ... <|tool_calls_section_end|>

The same markers spelled out as text (a fine-tune or a quantized model writing them as ordinary
BPE pieces, or text fed with `feed_bytes`) are recognised too, and so is the singular spelling
`<|tool_call_section_begin|>` / `<|tool_call_section_end|>` that some K2 derivatives use; inside a
JSON string of a call's arguments only the special token counts (a file that mentions the
markers stays content). Text is
decoded incrementally (a token may end inside a character) and text that could still become a
marker is held back until it is decided, so the events, once consecutive deltas are merged, are
identical for every chunking: whole, one token at a time, or one byte at a time.

Rules for what is inside a tool-call section (decided once here, tested in tests/chat):
- Text between calls: whitespace-only stretches (K2 sometimes writes newlines between markers)
  are dropped; any other stray text is kept as content (a `TextDelta`, with a `ParseWarning`),
  so nothing the model said is lost. Each stretch between two markers is decided as a whole.
- Call ids: `functions.NAME:IDX` (native), `NAME:IDX`, or a bare `NAME`. A dotted id without
  `:IDX` (`functions.invalid.0`) or any other garbage is malformed: that call is dropped (with a
  warning) and the calls around it are kept. A bare counter (`0`) or a client-style id
  (`call_3`, `toolu_…`) is mapped to the declared tool whose parameters its arguments fit, when
  exactly one fits; otherwise the call is dropped.
- Declared tools (`tools` / `tool_names` given): a call to a tool that was not declared becomes
  text plus a warning. With neither given, any name is accepted.
- Arguments: empty means `{}`; a JSON-encoded string holding a JSON object or array
  (`"{\\"city\\": \\"Rome\\"}"`) is unwrapped to that JSON; other non-JSON ends with
  `ToolCallEnd(valid_json=False)` (or becomes text with `buffer_arguments`).

Never raises on model output: a call or section never closed, stray markers and the like are
closed as well as they can be, and a ParseWarning says what happened.
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
# other spellings of a marker -> the canonical one
VARIANTS = {"<|tool_call_section_begin|>": SECTION_BEGIN, "<|tool_call_section_end|>": SECTION_END}
TOOL_MARKERS = (SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END)

# `[functions.]PATH:IDX`; the name is PATH when declared, else its last dot-separated part (as vLLM)
_NATIVE = re.compile(r"(?:functions\.)?(?P<path>[\w\-]+(?:\.[\w\-]+)*):(?P<idx>\d+)")
_BARE_NAME = re.compile(r"[A-Za-z_][\w\-]*")
# ids that carry no name: a bare counter, or an id in a client's style (OpenAI, Anthropic)
_NAMELESS = re.compile(r"\d+|(?:call|toolu|fc|tool)[_\-][\w\-]+")

TEXT, REASONING, SECTION, CALL_ID, ARGS = "text", "reasoning", "section", "call_id", "args"
# what happens to the open call's arguments: streamed, held until the end, or not a call at all
STREAM, HOLD, MAP, DROP, UNDECLARED = "stream", "hold", "map", "drop", "undeclared"


def _tool_fn(tool) -> dict:
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return fn if isinstance(fn, dict) else {}


def arguments_fit(args: object, parameters: object) -> bool:
    """Whether an arguments object plausibly belongs to a tool with this `parameters` schema:
    every required key present, and no key the schema does not list (when it lists any)."""
    if not isinstance(args, dict):
        return False
    if not isinstance(parameters, dict):
        return True
    required = parameters.get("required") or []
    props = parameters.get("properties")
    if not isinstance(required, list) or not all(k in args for k in required if isinstance(k, str)):
        return False
    if isinstance(props, dict) and props:
        return all(k in props for k in args)
    return True


def unwrap_arguments(args: str) -> tuple[str, bool]:
    """(arguments, valid_json). Empty -> "{}"; a JSON string that itself holds a JSON object or
    array (double-encoded arguments) -> the inner JSON."""
    if not args.strip():
        return "{}", True
    try:
        value = json.loads(args)
    except ValueError:
        return args, False
    if isinstance(value, str):
        try:
            inner = json.loads(value)
        except ValueError:
            return args, True
        if isinstance(inner, (dict, list)):
            return value, True
    return args, True


class StreamParser:
    """Feed generated token ids one at a time (`feed`) or in chunks (`feed_many`), or output text
    as bytes (`feed_bytes`); each call returns the events completed so far. Call `finish()` at
    the end of generation.

    `start_in_reasoning`: the prompt itself ended with `<think>` (K2.5-style), so output starts
    as reasoning. `buffer_arguments`: hold each call's arguments until `<|tool_call_end|>`, so a
    call whose arguments are not JSON degrades to text instead of being streamed. `tools` (OpenAI
    tool objects) or `tool_names`: the declared tools (see the module docstring)."""

    def __init__(self, tokenizer, start_in_reasoning: bool = False, buffer_arguments: bool = False,
                 tool_names: Iterable[str] | None = None, tools: Iterable[dict] | None = None):
        sp = tokenizer.special_tokens
        self._id_to_bytes = tokenizer.id_to_bytes
        thinking = THINK in sp and END_THINK in sp
        names = TOOL_MARKERS + ((THINK, END_THINK) if thinking else ())
        self._by_id = {sp[n]: n for n in names if n in sp}
        self._by_id.update({sp[v]: c for v, c in VARIANTS.items() if v in sp})
        self._special = set(sp.values())
        # marker spellings recognised inside text; think tags only where the tokenizer has them
        self._text_markers = {n: n for n in names} | dict(VARIANTS)
        self._marker_re = re.compile("|".join(map(re.escape, sorted(self._text_markers, key=len, reverse=True))))
        self._prefixes = {m[:i] for m in self._text_markers for i in range(1, len(m))}
        self.buffer_arguments = buffer_arguments
        self.tools: dict[str, dict] = {}
        for t in tools or ():
            fn = _tool_fn(t)
            if isinstance(fn.get("name"), str):
                self.tools[fn["name"]] = fn.get("parameters")
        if tool_names is not None or tools is not None:
            self.tool_names: set[str] | None = set(self.tools) | set(tool_names or ())
        else:
            self.tool_names = None  # unknown: accept any name
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.state = REASONING if start_in_reasoning else TEXT
        self.calls = 0  # completed or open tool calls so far
        self._used_ids: set[str] = set()
        self._pend = ""  # decoded text that may still turn out to be the start of a marker
        self._stray = ""  # text between calls, decided at the next marker
        self._buf = ""  # the current call's id text, then its arguments
        self._id = ""  # the current call's raw id
        self._mode = STREAM
        self._begun = False  # ToolCallBegin of the open call already sent
        self._announced = False  # argument text of the open call already streamed
        self._in_string = self._escaped = False  # where the open call's JSON arguments are
        self._call: tuple[int, str, str] | None = None  # (index, id, name) of an announced call
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
            self._scan(self._dec.decode(self._id_to_bytes(token)), out)
        return out

    def feed_many(self, tokens: Iterable[int]) -> list:
        out: list = []
        for t in tokens:
            out += self.feed(int(t))
        return out

    def feed_bytes(self, data: bytes) -> list:
        """Output as raw bytes (markers spelled as text), in any chunking."""
        out: list = []
        self._scan(self._dec.decode(data), out)
        return out

    def finish(self) -> list:
        """Flush at the end of generation; closes whatever the model left open."""
        out: list = []
        self._flush_text(out)
        if self.state == SECTION:
            self._flush_stray(out)
            if self._raw:
                out.append(ParseWarning("the tool-call section was not closed"))
        elif self.state == CALL_ID:
            self._degrade(out, "a tool call was cut off before its arguments")
        elif self.state == ARGS:
            self._end_call(out, closed=False)
        self.state = TEXT
        return out

    # ---- text -----------------------------------------------------------------------------
    def _flush_text(self, out: list) -> None:
        """A special token ends any partial UTF-8 character and any held marker prefix."""
        self._scan(self._dec.decode(b"", final=True), out)
        self._dec.reset()
        pend, self._pend = self._pend, ""
        self._text(pend, out)

    def _scan(self, s: str, out: list) -> None:
        if not s:
            return
        s = self._pend + s
        self._pend = ""
        while True:
            m = self._marker_re.search(s) if "<" in s else None
            if m is None:
                break
            self._text(s[: m.start()], out)
            if self.state == ARGS and self._in_string:
                # marker text inside a JSON string of the arguments (a file that mentions K2's
                # markers) is content; only the special token itself would end the call there
                self._text(m.group(0), out)
            else:
                self._marker(self._text_markers[m.group(0)], out)
            s = s[m.end() :]
        # hold back the longest tail that could still grow into a marker
        cut = s.rfind("<", max(0, len(s) - 32))
        while cut != -1 and s[cut:] not in self._prefixes:
            cut = s.rfind("<", max(0, len(s) - 32), cut)
        if cut != -1:
            s, self._pend = s[:cut], s[cut:]
        self._text(s, out)

    def _text(self, s: str, out: list) -> None:
        if not s:
            return
        st = self.state
        if st == TEXT:
            out.append(TextDelta(s))
        elif st == REASONING:
            out.append(ReasoningDelta(s))
        elif st == SECTION:
            self._stray += s
            self._raw.append(s)
        elif st == CALL_ID:
            self._buf += s
            self._raw.append(s)
        elif st == ARGS:
            self._args_text(s, out)

    def _args_text(self, s: str, out: list) -> None:
        self._buf += s
        if '"' in s or "\\" in s or self._escaped:
            for ch in s:  # track whether the arguments are inside a JSON string
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = self._in_string
                elif ch == '"':
                    self._in_string = not self._in_string
        if self._mode == STREAM and not self._announced:
            # decide at the first non-blank character: a JSON-encoded string is held to unwrap it
            body = self._buf.lstrip()
            if not body:
                return
            if body[0] == '"':
                self._mode = HOLD
                return
            self._announced = True
            out.append(ToolCallArgsDelta(self._call[0], self._buf))
        elif self._mode == STREAM:
            out.append(ToolCallArgsDelta(self._call[0], s))

    def _flush_stray(self, out: list) -> None:
        stray, self._stray = self._stray, ""
        if stray.strip():
            out.append(ParseWarning(f"text inside a tool-call section kept as text: {stray[:80]!r}"))
            out.append(TextDelta(stray))

    # ---- markers --------------------------------------------------------------------------
    def _marker(self, m: str, out: list) -> None:
        st = self.state
        if st == SECTION:
            self._flush_stray(out)
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
                self._raw = [SECTION_BEGIN]
            elif st == ARGS:  # the previous call was never closed
                self._end_call(out, closed=False)
            elif st == CALL_ID:
                self._degrade(out, "a tool call was interrupted by the next one")
            self.state, self._buf = CALL_ID, ""
            self._raw.append(CALL_BEGIN)
            return
        if m == ARG_BEGIN:
            if st == CALL_ID:
                self._begin_call(out)
            else:
                out.append(ParseWarning(f"stray {ARG_BEGIN} ignored"))
            return
        if m == CALL_END:
            if st == ARGS:
                self._end_call(out)
                self.state = SECTION
            elif st == CALL_ID:
                self._degrade(out, "malformed tool call (no arguments)")
                self.state = SECTION
            else:
                out.append(ParseWarning(f"stray {CALL_END} ignored"))
            return
        if m == SECTION_END:
            if st == ARGS:
                self._end_call(out, closed=False)
            elif st == CALL_ID:
                self._degrade(out, "malformed tool call at the section end")
            elif st != SECTION:
                out.append(ParseWarning(f"stray {SECTION_END} ignored"))
                return
            self.state, self._raw = TEXT, []

    # ---- calls ----------------------------------------------------------------------------
    def _begin_call(self, out: list) -> None:
        raw_id = self._buf.strip()
        self._id, self._buf, self.state = raw_id, "", ARGS
        self._announced = self._begun = self._in_string = self._escaped = False
        self._raw.append(ARG_BEGIN)
        self._call = None
        name = self._name_of(raw_id)
        if name is None:
            self._mode = MAP if _NAMELESS.fullmatch(raw_id) and self.tools else DROP
            return
        if self.tool_names is not None and name not in self.tool_names:
            self._mode = UNDECLARED
            return
        self._mode = HOLD if self.buffer_arguments else STREAM
        m = _NATIVE.fullmatch(raw_id)
        self._announce(name, raw_id if m is not None and raw_id.startswith("functions.") else None)
        if self._mode == STREAM:
            self._begun = True
            out.append(ToolCallBegin(*self._call))

    def _name_of(self, raw_id: str) -> str | None:
        m = _NATIVE.fullmatch(raw_id)
        if m is not None:
            path = m.group("path")
            if self.tool_names is not None and path in self.tool_names:
                return path
            return path.rsplit(".", 1)[-1]
        if _NAMELESS.fullmatch(raw_id):
            return None
        if _BARE_NAME.fullmatch(raw_id):
            return raw_id
        return None

    def _announce(self, name: str, cid: str | None) -> None:
        index = self.calls
        if cid is None or cid in self._used_ids:  # ids must be unique within a reply
            k = index
            cid = f"functions.{name}:{k}"
            while cid in self._used_ids:
                k += 1
                cid = f"functions.{name}:{k}"
        self._used_ids.add(cid)
        self.calls += 1
        self._call = (index, cid, name)

    def _end_call(self, out: list, closed: bool = True) -> None:
        mode, raw_args, raw_id = self._mode, self._buf, self._id
        self._buf, self._mode = "", STREAM
        if not closed:
            what = f"tool call {raw_id!r} was not closed"
            out.append(ParseWarning(f"{what}; closing it here"))
        if mode == DROP:
            out.append(ParseWarning(f"tool call with a malformed id {raw_id[:60]!r} dropped"))
            return
        if mode == UNDECLARED:
            out.append(ParseWarning(f"call to the undeclared tool {raw_id[:60]!r} kept as text"))
            out.append(TextDelta(raw_id + raw_args))
            return
        args, valid = unwrap_arguments(raw_args)
        if mode == MAP:
            fits = []
            if valid:
                value = json.loads(args)
                fits = [n for n, params in self.tools.items() if arguments_fit(value, params)]
            if len(fits) != 1:
                why = "no declared tool" if not fits else f"{len(fits)} declared tools"
                out.append(ParseWarning(f"tool call id {raw_id[:60]!r} names no tool and its arguments fit "
                                        f"{why}; dropped"))
                return
            self._announce(fits[0], None)
        index, cid, name = self._call
        if mode == STREAM:
            if not self._announced:  # nothing streamed yet (blank arguments)
                out.append(ToolCallArgsDelta(index, args))
        else:  # held: the arguments go out in one piece
            if not valid and self.buffer_arguments and not self._begun:
                self.calls -= 1
                self._used_ids.discard(cid)
                out.append(ParseWarning(f"arguments of {cid} are not JSON; kept as text: {args[:80]!r}"))
                out.append(TextDelta(args))
                self._call = None
                return
            if not self._begun:
                out.append(ToolCallBegin(index, cid, name))
            out.append(ToolCallArgsDelta(index, args))
        if not valid:
            out.append(ParseWarning(f"arguments of {cid} are not valid JSON: {args[:80]!r}"))
        out.append(ToolCallEnd(index, args, valid))
        self._call = None

    def _degrade(self, out: list, why: str) -> None:
        """Turn the text of a call cut off in its id into plain text, with a warning showing the raw form."""
        raw = "".join(self._raw)
        out.append(ParseWarning(f"{why}; kept as text: {raw[-120:]!r}"))
        if self._buf:
            out.append(TextDelta(self._buf))
        self._buf = ""


def parse_all(tokenizer, tokens: Iterable[int], **kwargs) -> list:
    """Parse a whole generation at once (non-streaming replies, tests)."""
    p = StreamParser(tokenizer, **kwargs)
    return p.feed_many(tokens) + p.finish()
