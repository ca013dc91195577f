"""Prefix cache reused across requests: mlx-lm's LRU prompt cache (a token trie of extracted
per-sequence caches), bounded in bytes, plus the hit/miss counters the server reports; behind it,
optionally, the persistent block cache on disk (`disk_cache.py`)."""
from __future__ import annotations

from k2mlx.mlxlm_adapter import prompt_cache_lru, trim_prompt_cache


class PrefixCache:
    def __init__(self, max_bytes: int = 2 << 30, max_entries: int = 64, disk=None):
        self.max_bytes = max_bytes
        self.disk = disk  # a DiskPrefixCache (k2mlx.engine.disk_cache) or None
        self.disk_tokens = 0
        self._lru = prompt_cache_lru(max_entries, max_bytes) if max_bytes > 0 else None
        self.hits = 0
        self.misses = 0
        self.cached_tokens = 0

    @property
    def nbytes(self) -> int:
        return self._lru.nbytes if self._lru is not None else 0

    def __len__(self) -> int:
        return len(self._lru) if self._lru is not None else 0

    def fetch(self, tokens: list[int]):
        """-> (cache or None, number of leading tokens the cache already holds).

        At least one token is always left to run, since the model must produce logits. On a
        memory miss, or when the disk holds a longer prefix, the persistent cache is read."""
        cache, n = None, 0
        if self._lru is not None:
            cache, rest = self._lru.fetch_nearest_cache("k2", tokens)
            if cache is not None and not rest:
                trim_prompt_cache(cache, 1)
                rest = tokens[-1:]
            n = len(tokens) - len(rest) if cache is not None else 0
        if self.disk is not None and len(tokens) - 1 - n >= self.disk.block:
            copies = 2 if self._lru is not None else 1  # the second one: the next turn finds it in memory
            m, restored = self.disk.restore(tokens, beyond=n, limit=len(tokens) - 1, copies=copies)
            if restored:
                cache, n = restored[0], m
                self.disk_tokens += m
                if self._lru is not None:
                    self._lru.insert_cache("k2", list(tokens[:m]), restored[1])
        if n > 0:
            self.hits += 1
            self.cached_tokens += n
        else:
            self.misses += 1
            cache = None
        return cache, n

    def insert(self, tokens: list[int], cache) -> None:
        if self.disk is not None and tokens:
            # first: on a pipeline this logs the other ranks' save ops before any op of the LRU's
            self.disk.save_cache(list(tokens), cache)
        if self._lru is not None and tokens:
            self._lru.insert_cache("k2", list(tokens), cache)

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

    def trim_to(self, n_bytes: int) -> None:
        if self._lru is not None:
            self._lru.trim_to(n_bytes=max(0, n_bytes))
