"""The per-sequence mask inside mlx-lm's BatchGenerator: a logits processor.

mlx-lm calls each sequence's processors with that sequence's token context (prompt + generated
so far) and its logits row, so constrained and free sequences share one batch and every
constrained one carries its own matcher. The processor:
1. reads the token sampled at the previous step (already computed: it is this step's input)
   and advances the matcher with it;
2. starts the forward pass (`mx.async_eval` of the logits), then computes the next mask on the
   CPU while it runs, so mask time hides behind the model instead of adding to it;
3. returns the logits with every disallowed id at -inf.
It runs wherever sampling runs: on a pipeline that is rank 0."""
from __future__ import annotations

import logging
import time

import mlx.core as mx
import numpy as np

log = logging.getLogger("k2mlx.grammar")


class GrammarProcessor:
    def __init__(self, matcher, vocab_size: int, eos_ids):
        self._m = matcher
        self._vocab = vocab_size
        self._words = np.zeros(((vocab_size + 31) // 32,), dtype=np.int32)
        self._eos = sorted(eos_ids)
        self._base: int | None = None  # context length at the first call: the prompt
        self.failed: str | None = None
        self.mask_s = 0.0  # time spent computing masks, for benchmarks
        self.steps = 0

    def _advance(self, tokens: mx.array) -> None:
        n = tokens.shape[-1]
        if self._base is None:
            self._base = n
            return
        new = [int(t) for t in tokens[self._base:].tolist()]
        self._base = n
        # mlx-lm runs one step past a stop token before it reports it: EOS after a finished
        # grammar is the end, not a refused token
        if new and new[-1] in self._eos and self._m.is_accepting():
            new.pop()
        if self.failed is None and new and not self._m.consume_tokens(new):
            # cannot happen while the mask is applied; if it does, end the reply rather than emit junk
            self.failed = self._m.get_error() or "token refused"
            log.error("constrained decoding lost its grammar state: %s", self.failed)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        self._advance(tokens)
        mx.async_eval(logits)  # the forward pass runs while the mask is computed below
        t0 = time.perf_counter()
        if self.failed is None:
            self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
            allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self._vocab]
        else:
            allowed = np.zeros(self._vocab, dtype=np.uint8)
            allowed[self._eos] = 1
        width = logits.shape[-1]
        if width > self._vocab:  # the embedding may be padded past the tokenizer's ids
            allowed = np.pad(allowed, (0, width - self._vocab))
        elif width < self._vocab:
            allowed = allowed[:width]
        mask = mx.array(allowed.astype(np.bool_))
        self.mask_s += time.perf_counter() - t0
        self.steps += 1
        return mx.where(mask, logits, mx.array(-float("inf"), dtype=logits.dtype))
