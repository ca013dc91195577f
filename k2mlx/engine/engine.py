"""The one generation core: requests in, typed events out.

One model thread owns MLX. It runs mlx-lm's `BatchGenerator` (continuous batching: new requests
are prefilled in chunks between decode steps, then join the decode batch, so every active
request advances in one forward pass per step). Callers on any thread or event loop only queue:
`submit()` validates and tokenizes, then hands the request over; events come back through a
per-request queue. Cancelling (closing the iterator, a client disconnecting) removes the
sequence from the batch at the next step.

The model is anything with `__call__(tokens [B, L], cache) -> logits [B, L, V]` and
`make_cache()`, so a pipelined multi-host model plugs in unchanged. A model that can also
`submit(tokens, cache) -> pending` (`pending.result()` -> logits), like `PipelineModel`, gets its
sequences split into one micro-batch group per pipeline stage, stepped in turn so every stage
computes at once (see `overlap.py`)."""
from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field

from k2mlx import mlxlm_adapter as adapter
from k2mlx.engine.detok import StopStrings
from k2mlx.events import Done, PrefillProgress, TextDelta, Timings, ToolCallEnd, Usage
from k2mlx.engine.prefix_cache import PrefixCache
from k2mlx.engine.prompting import build_prompt, make_parser
from k2mlx.engine.request import DEFAULT_MAX_TOKENS, GenerationRequest
from k2mlx.engine.stream import AsyncRequestStream, SyncRequestStream
from k2mlx.errors import ClusterError, ContextOverflowError, K2Error

log = logging.getLogger("k2mlx.engine")

@dataclass
class Prepared:
    """A validated, tokenized request (built off the model thread)."""

    request: GenerationRequest
    prompt: list[int]
    forced: list[int]
    banned: list[int]
    max_tokens: int
    constraint: object = None  # k2mlx.grammar's per-sequence mask (a logits processor), or None


@dataclass
class _Slot:
    rid: int
    prep: Prepared
    sink: object
    parser: object = None
    stops: StopStrings = None
    uid: int | None = None
    cached: int = 0
    generated: int = 0
    t_admit: float = 0.0
    t_first: float | None = None
    tool_calls: int = 0
    finish: str | None = None  # set when the engine itself decides to stop (stop string, tools)
    pending_lp: list = field(default_factory=list)
    prefill: tuple = (0, 0)  # prompt tokens in the cache / in the prompt, while reading it

    def prefill_eta(self, now: float) -> float | None:
        """Seconds left reading the prompt, at the rate of the tokens read so far (not cached)."""
        done, total = self.prefill
        fresh, spent = done - self.cached, now - self.t_admit
        return (total - done) * spent / fresh if fresh > 0 and spent > 0 else None


@dataclass
class _Group:
    """Sequences decoding together: one BatchGenerator (uids are per generator)."""

    bg: object
    runner: object = None  # GroupRunner when pipelined; None: bg.next() runs on the model thread
    slots: dict = field(default_factory=dict)  # BatchGenerator uid -> slot
    deferred: list = field(default_factory=list)  # uids to remove once the running step ends

    @property
    def busy(self) -> bool:
        return bool(self.slots) or (self.runner is not None and self.runner.paused)


class EngineStats:
    """Counters read by /metrics (written on the model thread, except the queue depth)."""

    def __init__(self):
        self.requests = 0
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.queue_depth = 0  # submitted, not yet in the batch
        self.active = 0
        self._lock = threading.Lock()
        self.steps = 0
        self._recent: deque = deque()  # (time, tokens) of recent decode steps

    def add_queued(self, n: int) -> None:
        with self._lock:  # changed from caller threads and the model thread
            self.queue_depth += n

    def note_tokens(self, n: int) -> None:
        now = time.perf_counter()
        self.generated_tokens += n
        self._recent.append((now, n))
        while self._recent and now - self._recent[0][0] > 5.0:
            self._recent.popleft()

    @property
    def tokens_per_second(self) -> float:
        if len(self._recent) < 2:
            return 0.0
        span = self._recent[-1][0] - self._recent[0][0]
        return sum(n for _, n in list(self._recent)[1:]) / span if span > 0 else 0.0


def _held_to_grammar(slot) -> bool:
    """The reply followed a grammar: a response_format, or tool calls made under the tools'
    schemas (under tool_choice "auto" free text is not restricted, so text alone does not count)."""
    if slot.prep.constraint is None:
        return False
    return slot.prep.request.response_format is not None or slot.tool_calls > 0


def final_finish_reason(reason: str, tool_calls: int) -> str:
    """A reply that called tools ends with "tool_calls" unless it was cut off by max_tokens."""
    return "tool_calls" if tool_calls and reason in ("stop", "tool_calls") else reason


_compile_lock = threading.Lock()
_compile_holders = 0
_LIVE: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    """Engines still open at exit are closed before the interpreter finalizes (atexit runs
    first), so their threads never end during finalization (see threads.py)."""
    for eng in list(_LIVE):
        eng.close()


def _hold_compile_off(on: bool) -> None:
    """Compilation off while an engine lives, only where its threads' exit cannot be waited for
    (off Metal, without /proc; see threads.py): there a process that ran compiled code on the
    model thread could abort at exit. Everywhere else `close()` waits for the threads instead."""
    global _compile_holders
    import mlx.core as mx

    with _compile_lock:
        _compile_holders += 1 if on else -1
        if on and _compile_holders == 1:
            mx.disable_compile()
        elif not on and _compile_holders == 0:
            mx.enable_compile()


def _max_buffer() -> int | None:
    """The largest single buffer the GPU takes (Metal), or None."""
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            return int(mx.metal.device_info().get("max_buffer_length", 0)) or None
    except (AttributeError, RuntimeError):
        log.debug("no device buffer limit", exc_info=True)
    return None


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 8, context_length: int | None = None,
                 cache_bytes: int = 2 << 30, prefill_step_size: int | None = None,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS, model_name: str = "k2",
                 overlap: bool | None = None, prompt_cache=None):
        adapter.require()  # a renamed mlx-lm internal fails here, once, not in every request
        self.model, self.tokenizer = model, tokenizer
        # micro-batch groups: one per pipeline stage when the model can overlap steps
        can = hasattr(model, "submit") and max_batch > 1
        if overlap and not can:
            raise ValueError("overlap needs a model with submit()/result() and max_batch > 1")
        self.n_groups = max(2, int(getattr(model, "stages", 2))) if (can if overlap is None else overlap) else 1
        from k2mlx.engine.threads import compile_must_stay_off

        self._compile_off = compile_must_stay_off()
        self.model_name = model_name
        self.max_batch = max(1, int(max_batch))
        args = getattr(model, "args", None)
        self.context_length = int(context_length or getattr(args, "max_position_embeddings", 0) or 4096)
        self.default_max_tokens = default_max_tokens
        if prefill_step_size is None:  # from the model, its pipeline depth and the device's buffer limit
            from k2mlx.engine.prefill import default_chunk

            prefill_step_size = default_chunk(args, int(getattr(model, "stages", 1)), _max_buffer(), self.context_length)
        if prefill_step_size < 1:
            raise ValueError("prefill_step_size must be >= 1")
        self.prefill_step_size = int(prefill_step_size)
        self.vocab_size = getattr(tokenizer, "vocab_size", None)
        # prompt_cache: a DiskPrefixCache (disk_cache.py) behind the in-memory one, or None
        self.prefix_cache = PrefixCache(cache_bytes, disk=prompt_cache)
        self.stats = EngineStats()
        self.failure: K2Error | None = None  # a ClusterError makes the server answer 503
        self._ids = itertools.count(1)
        self._ctl: queue.Queue = queue.Queue()
        self._stop = False
        if self._compile_off:
            _hold_compile_off(True)
        self._thread = threading.Thread(target=self._run, name="k2mlx-model", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # ---------------------------------------------------------------- caller side (any thread)
    def prepare(self, request: GenerationRequest) -> Prepared:
        """Validate and tokenize. Raises RequestError / ContextOverflowError before anything runs."""
        request.validate(self.vocab_size)
        prompt, forced, banned = build_prompt(self.tokenizer, request)
        if not prompt:
            from k2mlx.errors import RequestError

            raise RequestError("the prompt is empty", param="prompt")
        n = len(prompt)
        if n >= self.context_length:
            raise ContextOverflowError(n, self.context_length)
        if request.max_tokens is not None:
            if n + request.max_tokens > self.context_length:
                raise ContextOverflowError(n, self.context_length, requested=request.max_tokens)
            max_tokens = request.max_tokens
        else:
            max_tokens = min(self.default_max_tokens, self.context_length - n)
        from k2mlx.grammar.plan import constraint_for  # structured output / tool calls (issue 15)

        return Prepared(request, prompt, forced, banned, max_tokens,
                        constraint_for(self.tokenizer, request, prompt, forced))

    def submit(self, request: GenerationRequest | Prepared, loop=None) -> AsyncRequestStream:
        """Start a request; `async for event in engine.submit(req)`. Call from the event loop
        (or pass `loop`)."""
        prep = request if isinstance(request, Prepared) else self.prepare(request)
        loop = loop or asyncio.get_running_loop()
        rid = next(self._ids)
        stream = AsyncRequestStream(self, rid, len(prep.prompt), loop)
        self._enqueue(rid, prep, stream.sink)
        return stream

    def generate(self, request: GenerationRequest | Prepared) -> SyncRequestStream:
        """Blocking variant for the CLI: `for event in engine.generate(req)`."""
        prep = request if isinstance(request, Prepared) else self.prepare(request)
        rid = next(self._ids)
        stream = SyncRequestStream(self, rid, len(prep.prompt))
        self._enqueue(rid, prep, stream.sink)
        return stream

    def cancel(self, rid: int) -> None:
        self._ctl.put(("cancel", rid))

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        self._ctl.put(("stop", None))
        from k2mlx.engine.threads import join_fully

        # the model thread ran compiled code: wait until its thread-local destructors are done,
        # so the interpreter may end right after this (see threads.py)
        if not join_fully(self._thread, timeout=30):
            log.warning("the model thread did not end within 30 s")
        _LIVE.discard(self)
        if self._compile_off:
            _hold_compile_off(False)

    def _enqueue(self, rid, prep, sink) -> None:
        slot = _Slot(rid, prep, sink, parser=make_parser(self.tokenizer, prep.request, prep.prompt, prep.forced),
                     stops=StopStrings(prep.request.stop))
        self.stats.add_queued(1)
        self._ctl.put(("add", slot))

    # ---------------------------------------------------------------- model thread
    def _new_batch_generator(self, model=None):
        return adapter.batch_generator(model or self.model, max_batch=self.max_batch,
                                       prefill_batch=min(8, self.max_batch),
                                       prefill_step_size=self.prefill_step_size)

    def _new_groups(self) -> list[_Group]:
        if self.n_groups == 1:
            if hasattr(self.model, "submit"):  # a pipeline: prompt chunks flow through its stages
                from k2mlx.engine.prefill import PrefillAhead

                return [_Group(self._new_batch_generator(PrefillAhead(self.model)))]
            return [_Group(self._new_batch_generator())]
        from k2mlx.engine.overlap import GroupModel, GroupRunner

        groups = []
        for i in range(self.n_groups):
            runner = GroupRunner(f"k2mlx-group-{i}")
            runner.bg = self._new_batch_generator(GroupModel(self.model, runner))
            groups.append(_Group(runner.bg, runner))
        return groups

    def _stop_groups(self, drain: bool = True) -> None:
        for g in self._groups:
            if g.runner is not None:
                g.runner.stop(drain)
        self._groups = []

    @property
    def _slots(self) -> dict:
        """Every active slot (read-only view across groups)."""
        return {(id(g), u): s for g in self._groups for u, s in g.slots.items()}

    def _run(self) -> None:
        self._groups = self._new_groups()
        self._waiting: deque[_Slot] = deque()
        while not self._stop:
            self._drain(block=not any(g.busy for g in self._groups) and not self._waiting)
            if self._stop:
                break
            try:
                if len(self._groups) == 1:
                    g = self._groups[0]
                    self._admit(g)
                    if g.slots:
                        prompt_out, gen_out = adapter.step(g.bg)
                        self._progress(g, prompt_out)
                        self._step(g, gen_out)
                else:
                    self._round()
            except Exception as e:  # a model or cluster failure ends the affected requests, not the thread
                log.exception("model step failed; ending %d active request(s)", len(self._slots))
                self._fail_all(e)
        for slot in list(self._slots.values()) + list(self._waiting):
            self._finish(slot, "cancelled")
        # MLX state is released on the thread that made it (freeing it at interpreter exit aborts)
        self._stop_groups()
        self.prefix_cache.close()  # queued disk blocks are written before the engine ends
        self.prefix_cache = PrefixCache(0)

    def _round(self) -> None:
        """One turn of every group: collect its step, hand out tokens, submit its next step.
        A group pauses right after submitting, so the next group's step is submitted before
        this one's logits are collected: the pipeline's stages work on different groups."""
        for g in list(self._groups):
            if g.runner.paused:
                kind, val = g.runner.resume()
            else:
                self._admit(g)
                if not g.slots:
                    continue
                kind, val = g.runner.step()
            while kind == "done":
                self._progress(g, val[0])
                self._step(g, val[1])
                if g.deferred:  # cancelled while its step was in flight
                    uids, g.deferred = list(g.deferred), []
                    g.runner.call(lambda: adapter.remove(g.bg, uids))
                self._admit(g)
                if not g.slots:
                    break
                kind, val = g.runner.step()
            if kind == "error":
                raise val

    def _drain(self, block: bool) -> None:
        while True:
            try:
                kind, arg = self._ctl.get(block=block)
            except queue.Empty:
                return
            block = False
            if kind == "stop":
                return
            if kind == "add":
                self._waiting.append(arg)
                self.stats.requests += 1
            elif kind == "cancel":
                self._cancel(arg)
            elif kind == "fail":
                self._fail_all(arg)

    def _cancel(self, rid: int) -> None:
        for slot in self._waiting:
            if slot.rid == rid:
                self._waiting.remove(slot)
                self.stats.add_queued(-1)
                self._finish(slot, "cancelled")
                return
        for g in self._groups:
            for uid, slot in list(g.slots.items()):
                if slot.rid == rid:
                    if g.runner is None:
                        adapter.remove(g.bg, [uid])
                    elif g.runner.paused:
                        g.deferred.append(uid)  # its generator is mid-step: remove it after
                    else:
                        g.runner.call(lambda: adapter.remove(g.bg, [uid]))
                    self._release(g, uid)
                    self._finish(slot, "cancelled")
                    return

    def _admit(self, g: _Group) -> None:
        """Waiting requests join group g (not mid-step) while it is no larger than the others."""
        from k2mlx.engine.sampling import make_processors, make_sampler

        def room() -> bool:
            if sum(len(o.slots) for o in self._groups) >= self.max_batch:
                return False
            return all(len(g.slots) <= len(o.slots) for o in self._groups if o is not g)

        while self._waiting and room():
            slot = self._waiting.popleft()
            self.stats.add_queued(-1)
            try:
                if g.runner is None:
                    self._insert(g, slot, make_processors, make_sampler)
                else:  # MLX objects of a group are made on its own thread
                    g.runner.call(lambda: self._insert(g, slot, make_processors, make_sampler))
            except Exception as e:  # this request only (a bad cache, an odd token): the batch goes on
                log.exception("request %d could not join the batch", slot.rid)
                self._finish(slot, "error", f"{type(e).__name__}: {e}")
        self.stats.active = len(self._slots)

    def _insert(self, g: _Group, slot: _Slot, make_processors, make_sampler) -> None:
        prep = slot.prep
        cache, cached = self.prefix_cache.fetch(prep.prompt)
        sampling = prep.request.sampling
        vocab = self.vocab_size or 1 << 30
        slot.cached, slot.t_admit = cached, time.perf_counter()
        for t in prep.forced:  # the forced tool-call prefix reaches the parser as if generated
            self._handle(slot, slot.parser.feed(t))
        stop_ids = set(self.tokenizer.eos_token_ids) | set(prep.request.stop_token_ids)

        uid = adapter.insert(g.bg, prep.prompt[cached:], max_tokens=prep.max_tokens, cache=cache,
                             prefix=prep.prompt[:cached], sampler=make_sampler(sampling, vocab),
                             processors=make_processors(sampling, prep.banned)
                             + ([prep.constraint] if prep.constraint is not None else []), stop_ids=stop_ids)
        slot.uid = uid
        g.slots[uid] = slot
        self.stats.prompt_tokens += len(prep.prompt)

    def _progress(self, g: _Group, prompt_responses) -> None:
        """Tell each request still reading its prompt how far it is (after every prefill chunk)."""
        now = time.perf_counter()
        for uid, done, total in adapter.prompt_progress(prompt_responses or ()):
            slot = g.slots.get(uid)
            if slot is None or slot.t_first is not None or total <= 0:
                continue
            slot.prefill = (slot.cached + done, slot.cached + total)
            if slot.prep.request.progress:
                slot.sink(PrefillProgress(*slot.prefill, slot.prefill_eta(now)))

    def prefill_status(self) -> list[dict]:
        """Requests reading their prompts: tokens done / total and an ETA (for /v1/cluster)."""
        out = []
        now = time.perf_counter()
        for _ in range(3):  # the model thread may change the batch while this reads it
            try:
                slots = list(self._slots.values()) if hasattr(self, "_groups") else []
                break
            except RuntimeError:
                continue
        else:
            return []
        for slot in slots:
            done, total = slot.prefill
            if slot.t_first is not None or total <= 0:
                continue
            eta = slot.prefill_eta(now)
            out.append({"request": slot.rid, "done": done, "total": total,
                        "eta_s": round(eta, 1) if eta is not None else None})
        return out

    def _step(self, g: _Group, responses) -> None:
        """Hand out the tokens of one finished `next()` of group g."""
        from k2mlx.engine.sampling import token_logprobs

        self.stats.steps += 1
        if responses:
            self.stats.note_tokens(len(responses))
        done_now = []
        for r in responses:
            slot = g.slots.get(r.uid)
            if slot is None:
                continue
            now = time.perf_counter()
            if slot.t_first is None:
                slot.t_first = now
            slot.generated += 1
            req = slot.prep.request
            if r.finish_reason != "stop":  # a stop token is never shown
                if req.logprobs:
                    slot.pending_lp.append(token_logprobs(r.logprobs, r.token, req.top_logprobs, self._tok_text))
                self._handle(slot, slot.parser.feed(r.token))
            if r.finish_reason is not None:
                self.prefix_cache.insert(r.all_tokens, r.prompt_cache)
                self._release(g, r.uid)
                self._finish(slot, slot.finish or r.finish_reason)
            elif slot.finish is not None:
                done_now.append(r.uid)
        if done_now:  # stopped by the engine (stop string, single tool call): free the slots
            caches = self._remove_keep_caches(g, done_now)
            for uid in done_now:
                slot = self._release(g, uid)
                if uid in caches:
                    cache, toks = caches[uid]
                    self.prefix_cache.insert(toks, cache)
                self._finish(slot, slot.finish)
        self.stats.active = len(self._slots)

    @staticmethod
    def _remove_keep_caches(g: _Group, uids: list[int]) -> dict:
        if g.runner is None:
            return adapter.remove(g.bg, uids, keep_caches=True)
        from k2mlx.engine.overlap import evaluate_cache

        def job():
            caches = adapter.remove(g.bg, uids, keep_caches=True)
            for cache, _ in caches.values():
                evaluate_cache(cache)
            return caches

        return g.runner.call(job)

    def _release(self, g: _Group, uid: int) -> _Slot:
        """Free a batch slot; the gauge changes before the request's Done goes out, so a client
        that saw its reply end never reads a stale count."""
        slot = g.slots.pop(uid)
        self.stats.active = sum(len(o.slots) for o in self._groups)
        return slot

    def _tok_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def _handle(self, slot: _Slot, events) -> None:
        """Apply stop strings to text, count tool calls, attach logprobs, pass events on."""
        req = slot.prep.request
        for ev in events:
            if slot.finish is not None:
                return
            if isinstance(ev, TextDelta):
                text = slot.stops.push(ev.text)
                if slot.stops.hit:
                    slot.finish = "stop"
                if not text and not slot.pending_lp:
                    continue
                lp, slot.pending_lp = (tuple(slot.pending_lp) or None), []
                ev = TextDelta(text, logprobs=lp)
            elif isinstance(ev, ToolCallEnd):
                slot.tool_calls += 1
                if not req.parallel_tool_calls:
                    slot.sink(ev)
                    slot.finish = "tool_calls"
                    return
            slot.sink(ev)

    def _finish(self, slot: _Slot, reason: str, error: str | None = None) -> None:
        if reason not in ("cancelled", "error"):
            if slot.finish is None:
                self._handle(slot, slot.parser.finish())
            tail = slot.stops.flush()
            if tail or slot.pending_lp:
                slot.sink(TextDelta(tail, logprobs=tuple(slot.pending_lp) or None))
            reason = final_finish_reason(reason, slot.tool_calls)
        end = time.perf_counter()
        first = slot.t_first or end
        import mlx.core as mx

        peak = mx.get_peak_memory()
        prompt_n = len(slot.prep.prompt)
        timings = Timings(prefill_s=first - slot.t_admit if slot.t_admit else 0.0,
                          decode_s=end - first, prompt_tokens=prompt_n - slot.cached,
                          generated_tokens=slot.generated, peak_memory_bytes=peak)
        usage = Usage(prompt_n, slot.generated, slot.cached)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        slot.sink(Done(reason, usage, timings, error, stop_sequence=slot.stops.matched,
                       constrained=_held_to_grammar(slot)))

    def fail(self, exc: Exception) -> None:
        """From any thread (a cluster health monitor): end every request with `exc`; a
        ClusterError also makes the server answer 503 from now on."""
        if isinstance(exc, ClusterError):
            self.failure = exc
        self._ctl.put(("fail", exc))

    def _fail_all(self, exc: Exception) -> None:
        if threading.current_thread() is not self._thread:  # only the model thread touches the batch
            return self.fail(exc)
        if isinstance(exc, ClusterError):
            self.failure = exc
        msg = f"{type(exc).__name__}: {exc}"
        log.error("ending every request: %s", msg, exc_info=exc)  # a failure handed in by fail()
        slots = list(self._slots.values())
        for g in self._groups:
            g.slots.clear()
        self.stats.active = 0
        for slot in slots:
            self._finish(slot, "error", msg)
        # paused groups collect their in-flight steps first, unless the cluster itself broke
        self._stop_groups(drain=not isinstance(exc, ClusterError))
        self._groups = self._new_groups()
