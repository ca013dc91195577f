"""What a caller asks the engine for. Plain data: no MLX, so the server can build and validate it
on the asyncio side before anything reaches the model thread."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from k2mlx.errors import RequestError

DEFAULT_MAX_TOKENS = 512


@dataclass
class SamplingParams:
    temperature: float = 0.6  # K2's recommended value for Instruct checkpoints
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self, vocab_size: int | None = None) -> None:
        def num(name, v, lo, hi):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RequestError(f"'{name}' must be a number, got {v!r}", param=name)
            if not lo <= v <= hi:
                raise RequestError(f"'{name}' must be between {lo} and {hi}, got {v}", param=name)

        num("temperature", self.temperature, 0.0, 2.0)
        num("top_p", self.top_p, 0.0, 1.0)
        num("min_p", self.min_p, 0.0, 1.0)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise RequestError(f"'top_k' must be a non-negative integer, got {self.top_k!r}", param="top_k")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise RequestError(f"'seed' must be an integer, got {self.seed!r}", param="seed")
        for k, v in self.logit_bias.items():
            if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (vocab_size and k >= vocab_size):
                raise RequestError(f"'logit_bias' key {k!r} is not a token id", param="logit_bias")
            num("logit_bias", v, -100.0, 100.0)


@dataclass
class GenerationRequest:
    """One generation. Give `messages` (chat-formatted with the checkpoint's template),
    `prompt` (raw text, no template) or `prompt_tokens` (already tokenized)."""

    messages: Optional[list[dict]] = None
    prompt: Optional[str] = None
    prompt_tokens: Optional[list[int]] = None
    tools: Optional[list[dict]] = None
    tool_choice: Any = "auto"  # "auto" | "none" | "required" | {"type": "function", "function": {"name"}}
    parallel_tool_calls: bool = True
    max_tokens: Optional[int] = None  # None: up to DEFAULT_MAX_TOKENS, clamped to the context
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    # tool-call / reasoning parsing; False streams raw text (completions, `generate --raw`)
    parse: bool = True
    progress: bool = False  # send PrefillProgress events while the prompt is read (long prompts)
    chat_kwargs: dict = field(default_factory=dict)  # passed to the chat template (e.g. thinking)
    # OpenAI response_format / Anthropic output_format; enforced while decoding (k2mlx/grammar)
    response_format: Optional[dict] = None

    def validate(self, vocab_size: int | None = None) -> None:
        if sum(x is not None for x in (self.messages, self.prompt, self.prompt_tokens)) != 1:
            raise RequestError("give exactly one of messages, prompt or prompt_tokens", param="messages")
        mt = self.max_tokens
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise RequestError(f"'max_tokens' must be a positive integer, got {mt!r}", param="max_tokens")
        if not isinstance(self.top_logprobs, int) or not 0 <= self.top_logprobs <= 20:
            raise RequestError("'top_logprobs' must be an integer between 0 and 20", param="top_logprobs")
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s for s in self.stop):
            raise RequestError("'stop' must be up to 16 non-empty strings", param="stop")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size and t >= vocab_size):
                raise RequestError(f"stop token id {t!r} is not a token id", param="stop_token_ids")
        if self.prompt_tokens is not None:
            for t in self.prompt_tokens:
                if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size and t >= vocab_size):
                    raise RequestError(f"prompt token {t!r} is not a token id", param="prompt")
        self.sampling.validate(vocab_size)
