"""Plain data of a conversation: small dataclasses, no Textual, no HTTP.

The app keeps a list of `ChatMessage`s; `to_openai()` gives the wire form the server
takes, and the session store saves the same fields."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # raw JSON text exactly as the model produced it

    def parsed_arguments(self) -> dict:
        """Arguments as a dict; raises ValueError with a readable reason when not a JSON object."""
        try:
            value = json.loads(self.arguments or "{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"arguments are not valid JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(value, dict):
            raise ValueError("arguments must be a JSON object")
        return value


@dataclass
class ChatMessage:
    role: str  # system | user | assistant | tool
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: Optional[str] = None
    name: Optional[str] = None  # tool name for role=tool
    finish_reason: Optional[str] = None  # assistant only: stop, length, tool_calls, cancelled, error

    def to_openai(self) -> dict:
        msg: dict = {"role": self.role, "content": self.content}
        if self.role == "assistant" and self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.role == "tool":
            msg["tool_call_id"] = self.tool_call_id or ""
            if self.name:
                msg["name"] = self.name
        return msg


@dataclass
class ToolResult:
    """What a tool call came to. `status`: ok | error | refused (confinement) | denied (by the user)."""

    status: str
    output: str
    duration_s: Optional[float] = None  # None: not timed here (a result loaded from history)
    diff: Optional[str] = None  # unified diff for file edits

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class ReplyStats:
    """Numbers of the last reply, for the status bar."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    measured: str = "server"  # server: from the reply's timings; client: timed here
    constrained: bool = False  # the server held the reply to a grammar (tool schemas, JSON)

    @property
    def context_used(self) -> int:
        return self.prompt_tokens + self.completion_tokens
