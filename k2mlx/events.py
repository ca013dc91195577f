"""Typed events of the one generation core. The CLI, the server and the TUI only consume these.

A leaf module (imports nothing from k2mlx): the chat parser produces these without importing
the engine or MLX.

Small frozen dataclasses; consumers map them to their own formats (SSE chunks, Anthropic
events, widgets). Tool-call events carry an `index` (0, 1, ... within one reply)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union


@dataclass(frozen=True)
class TextDelta:
    text: str
    # per generated token, when the request asked for logprobs: [(token_text, logprob, top)]
    logprobs: Optional[tuple] = None


@dataclass(frozen=True)
class ReasoningDelta:
    text: str


@dataclass(frozen=True)
class ToolCallBegin:
    index: int
    id: str  # native Kimi id: functions.NAME:IDX
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ToolCallEnd:
    index: int
    arguments: str  # the complete argument text (JSON when the model behaved)
    valid_json: bool = True


@dataclass(frozen=True)
class PrefillProgress:
    """The prompt is being read: `done` of `total` prompt tokens are in the cache (a cached prefix
    counts as done), `eta_s` the estimated seconds left (None until a rate is known). Sent after
    every prefill chunk, before the first token; consumers may ignore it."""

    done: int
    total: int
    eta_s: Optional[float] = None


@dataclass(frozen=True)
class ParseWarning:
    """Malformed model output that was degraded to text (never an exception)."""

    message: str


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    peak_memory_bytes: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        # the first token comes out of prefill; decode speed counts the rest
        n = max(self.generated_tokens - 1, 0)
        return n / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" | "length" | "tool_calls" | "cancelled" | "error"
    usage: Usage
    timings: Timings = field(default_factory=Timings)
    error: Optional[str] = None
    stop_sequence: Optional[str] = None  # the stop string that ended the reply, if one did
    # decoding was held to a grammar (response_format, or the declared tools' schemas)
    constrained: bool = False


Event = Union[TextDelta, ReasoningDelta, ToolCallBegin, ToolCallArgsDelta, ToolCallEnd, ParseWarning,
              PrefillProgress, Done]

__all__ = ["TextDelta", "ReasoningDelta", "ToolCallBegin", "ToolCallArgsDelta", "ToolCallEnd", "ParseWarning",
           "PrefillProgress", "Usage", "Timings", "Done", "Event"]
