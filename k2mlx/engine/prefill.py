"""Pipelined prefill: a long prompt's chunks flow through the pipeline's stages back to back.

mlx-lm's BatchGenerator reads a prompt in chunks of `prefill_step_size` tokens, calling the
model once per chunk and throwing the logits of those calls away (only the last prompt token,
fed as the first decode step, yields logits that are used; mlx-lm 0.32
`PromptProcessingBatch.prompt`). On a pipeline the plain call waits for the logits, so each stage
idles while the others work: rank 0 computes chunk i, then waits while rank 1 computes it.

`Ahead.settle` removes the wait: a multi-token call returns as soon as rank 0 has computed its
own layers and sent the hidden state on (`PipelineModel.submit`), so rank 0 starts chunk i+1 while
rank 1 works on chunk i. Exact: causal attention means a stage needs only its own layers' cache of
the earlier chunks, which it already has. The discarded logits are a lazy array that is never
evaluated. At most `depth` chunks are in flight (one per stage); older results are collected in
order, which bounds what waits on the wire. A single-token call (decode) collects everything
before it, so its logits are the real ones.

Used where the engine runs a model with `submit`: by `PrefillAhead` when one group runs, and by
the micro-batch groups' `GroupModel` (overlap.py)."""
from __future__ import annotations

from collections import deque


def discarded_logits(tokens, vocab: int):
    """[B, L, vocab] zeros for a call whose logits BatchGenerator drops: lazy, so never allocated."""
    import mlx.core as mx

    B, L = tokens.shape
    return mx.zeros((B, L, vocab))


def vocab_of(model) -> int | None:
    return getattr(getattr(model, "args", None), "vocab_size", None)


class Ahead:
    """Prefill chunks submitted but not yet collected, at most `depth` of them."""

    def __init__(self, depth: int, vocab: int | None):
        self.depth, self.vocab = max(1, int(depth)), vocab  # vocab None: always wait
        self._pending: deque = deque()
        self.max_seen = 0  # most chunks in flight at once (tests and benchmarks read it)

    def settle(self, pending, tokens):
        """The logits to return for a call that submitted `pending`."""
        if tokens.shape[1] > 1 and self.vocab:  # a prefill chunk: nothing reads its logits
            self._pending.append(pending)
            self.max_seen = max(self.max_seen, len(self._pending))
            while len(self._pending) > self.depth:
                self._pending.popleft().result()
            return discarded_logits(tokens, self.vocab)
        self._pending.clear()  # the pipeline returns results in submit order: these come first
        return pending.result()


class PrefillAhead:
    """The model one BatchGenerator sees on a pipeline when the engine runs a single group."""

    def __init__(self, pipe, depth: int | None = None):
        self._pipe = pipe
        self.ahead = Ahead(depth or int(getattr(pipe, "stages", 2)), vocab_of(pipe))

    def __getattr__(self, name):  # args, layers, stages ... come from the pipeline
        return getattr(self._pipe, name)

    def make_cache(self):
        return self._pipe.make_cache()

    def __call__(self, tokens, cache=None):
        return self.ahead.settle(self._pipe.submit(tokens, cache), tokens)


def default_chunk(args, stages: int = 1, max_buffer: int | None = None, context: int | None = None) -> int:
    """Prefill chunk size in tokens: 512 (mlx-lm's measured choice on one machine), 256 on a
    pipeline (more chunks keep the stages busy longer: with n equal chunks and s stages the
    speed-up is at most s*n/(n+s-1)), and never so large that one layer's attention scores
    [heads, chunk, context] in float32 exceed a quarter of the largest buffer the device takes,
    with context the model's limit up to 32K tokens (an agent's long prompt; chunks of a longer
    prompt's tail are the rare case)."""
    chunk = 256 if stages > 1 else 512
    if max_buffer and context:
        context = min(int(context), 32768)
        heads = int(getattr(args, "num_attention_heads", 64))
        while chunk > 32 and 4 * heads * chunk * context > max_buffer // 4:
            chunk //= 2
    return chunk
