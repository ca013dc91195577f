"""Per-request samplers and logits processors on top of mlx-lm's sampling helpers.

mlx-lm samples from the process-wide random state, so two requests decoding in one batch would
disturb each other's draws. Each sampler here owns its own PRNG key, split once per token: the
same seed gives the same tokens whether the request decodes alone or beside others."""
from __future__ import annotations

import random

import mlx.core as mx
from k2mlx.engine.request import SamplingParams
from k2mlx.mlxlm_adapter import apply_min_p, apply_top_k, apply_top_p, greedy_sampler, logit_bias_processors


def make_sampler(params: SamplingParams, vocab_size: int):
    """A callable logprobs [1, V] -> token [1]. Greedy when temperature is 0."""
    if params.temperature == 0:
        return greedy_sampler
    methods = []
    if 0 < params.top_p < 1.0:
        methods.append(lambda x: apply_top_p(x, params.top_p))
    if params.min_p > 0:
        methods.append(lambda x: apply_min_p(x, params.min_p))
    if 0 < params.top_k < vocab_size:
        methods.append(lambda x: apply_top_k(x, params.top_k))
    seed = params.seed if params.seed is not None else random.getrandbits(63)
    state = {"key": mx.random.key(seed)}
    inv_temp = 1.0 / params.temperature

    def sampler(logprobs: mx.array) -> mx.array:
        for m in methods:
            logprobs = m(logprobs)
        key, sub = mx.random.split(state["key"])
        state["key"] = key
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sampler


def make_processors(params: SamplingParams, banned: list[int] | None = None):
    """mlx-lm's logit-bias processor, plus token bans (tool_choice none) as a -inf bias."""
    bias = dict(params.logit_bias)
    for t in banned or ():
        bias[t] = -float("inf")
    return logit_bias_processors(bias or None)


def token_logprobs(logprobs: mx.array, token: int, top: int, id_to_text) -> tuple:
    """(token_text, logprob, [(text, logprob), ...]) for one generated token; logprobs is [V]."""
    lp = logprobs[token].item()
    tops = []
    if top > 0:
        idx = mx.argpartition(-logprobs, kth=top - 1)[:top]
        vals = logprobs[idx]
        order = mx.argsort(-vals)
        idx, vals = idx[order].tolist(), vals[order].tolist()
        tops = [(id_to_text(i), v) for i, v in zip(idx, vals)]
    return (id_to_text(token), lp, tuple(tops))
