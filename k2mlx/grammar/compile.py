"""llguidance plumbing: the tokenizer adapter, compiling a grammar once (cached, bounded in
time and size), and turning llguidance's complaints into 400s that name the schema keyword.

Nothing here imports MLX. llguidance is imported on first use, so the CLI and requests that
are not constrained never load it."""
from __future__ import annotations

import logging
import re
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from k2mlx.errors import RequestError

log = logging.getLogger("k2mlx.grammar")

COMPILE_TIMEOUT_S = 5.0  # a schema that takes longer than this to compile is refused (400)
CACHE_ENTRIES = 64  # compiled grammars kept per process (LRU)

_tokenizers: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_tok_lock = threading.Lock()
_cache: OrderedDict = OrderedDict()  # (id of LLTokenizer, grammar text) -> (LLTokenizer, prototype LLMatcher)
_slow: OrderedDict = OrderedDict()  # grammars that hit the timeout: refused again without compiling
_cache_lock = threading.Lock()
_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="k2mlx-grammar")


def _limits():
    import llguidance

    # bounds on the work one grammar may cost; the compile timeout is the second line of defence
    return llguidance.LLParserLimits(max_grammar_size=200_000, initial_lexer_fuel=1_000_000,
                                     step_lexer_fuel=200_000, max_lexer_states=100_000, verbose_errors=False)


class _Vocabulary:
    """k2mlx's tokenizer contract (`id_to_bytes`, `encode`, `special_tokens`) in the shape
    llguidance's TokenizerWrapper reads. Special tokens keep their names, so grammars can name
    K2's markers (`<|tool_call_begin|>`)."""

    def __init__(self, tokenizer):
        self.tokens = [tokenizer.id_to_bytes(i) for i in range(tokenizer.vocab_size)]
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(tokenizer.special_tokens.values())
        self._encode = tokenizer.encode

    def __call__(self, s):
        if isinstance(s, bytes):
            s = s.decode("utf-8", errors="replace")
        return self._encode(s, allow_special=False)


def ll_tokenizer(tokenizer):
    """The llguidance tokenizer for a k2mlx tokenizer, built once per tokenizer object (about a
    second for K2's 163,840 ids)."""
    with _tok_lock:
        lt = _tokenizers.get(tokenizer)
        if lt is None:
            import llguidance

            eos = sorted(getattr(tokenizer, "eos_token_ids", None) or {tokenizer.eos_token_id})
            lt = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tokenizer)), eos_token=eos)
            _tokenizers[tokenizer] = lt
        return lt


_UNIMPLEMENTED = re.compile(r"Unimplemented keys: \[(.*?)\]")


def describe_error(message: str) -> str:
    """llguidance's error text -> one line for a client, naming the keyword when there is one."""
    m = _UNIMPLEMENTED.search(message)
    if m:
        keys = ", ".join(k.strip().strip('"') for k in m.group(1).split(","))
        return f"the schema uses a keyword this server cannot enforce: {keys}"
    lines = message.strip().splitlines() or ["unknown error"]
    line = re.sub(r"^.*?failed to compile JSON schema:\s*", "", lines[0])
    return f"the schema cannot be enforced: {line.strip()[:200]}"


def _build(lt, grammar: str):
    import llguidance

    return llguidance.LLMatcher(lt, grammar, log_level=0, limits=_limits())


def compile_grammar(tokenizer, lark: str, param: str, timeout: float | None = None):
    """A prototype matcher for `lark` (deep-copy it per request). Cached per grammar text.
    Raises RequestError(param) when the grammar is invalid or takes longer than the timeout."""
    lt = ll_tokenizer(tokenizer)
    key = (id(lt), lark)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is lt:  # (an id can be reused once a tokenizer is gone)
            _cache.move_to_end(key)
            return hit[1]
        slow = key in _slow
    limit = COMPILE_TIMEOUT_S if timeout is None else timeout
    too_slow = RequestError(f"the schema is too complex: compiling it took longer than {limit:g} s", param=param)
    if slow:
        raise too_slow
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    fut = _pool.submit(_build, lt, grammar)
    try:
        proto = fut.result(timeout=limit)
    except FutureTimeout:
        # the worker keeps running until llguidance's own limits stop it; the request does not wait
        log.warning("grammar compile took over %.1fs; refused (%d chars)", limit, len(lark))
        with _cache_lock:
            _slow[key] = True
            while len(_slow) > CACHE_ENTRIES:
                _slow.popitem(last=False)
        raise too_slow from None
    if proto.is_error():
        msg = proto.get_error()
        log.info("grammar refused: %s", msg[:500])
        raise RequestError(describe_error(msg), param=param)
    for w in proto.get_grammar_warnings():  # lenient schemas: what was not enforced
        log.info("grammar warning: %s", w[:300])
    with _cache_lock:
        _cache[key] = (lt, proto)
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    return proto


def cache_size() -> int:
    with _cache_lock:
        return len(_cache)
