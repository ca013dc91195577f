"""The TUI's only way to the engine: the OpenAI-style HTTP interface editors use, through the
`openai` client (AsyncOpenAI), against a remote URL or the in-process server (`local.py`).

`Backend.stream()` maps the streamed chunks back to the engine's typed events
(k2mlx.engine.events), so the app handles a reply the same way whatever produced it."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import AsyncIterator, Optional

from k2mlx.engine.events import (Done, ReasoningDelta, TextDelta, Timings, ToolCallArgsDelta, ToolCallBegin,
                                 ToolCallEnd, Usage)

CONTEXT_KEYS = ("context_length", "max_model_len", "context_window", "max_context_length", "max_position_embeddings")


def _extra(obj, key):
    """A field the OpenAI types do not declare (the server's `timings`, `reasoning_content`)."""
    if obj is None:
        return None
    value = getattr(obj, key, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(key)
    return value


def timings_from(raw, usage: Usage) -> Optional[Timings]:
    """Accepts k2mlx's Timings fields, per-second rates, or llama.cpp-style names."""
    if not isinstance(raw, dict):
        raw = getattr(raw, "model_dump", lambda: None)() if raw is not None else None
        if not isinstance(raw, dict):
            return None
    pt = int(raw.get("prompt_tokens") or raw.get("prompt_n") or usage.prompt_tokens)
    gt = int(raw.get("generated_tokens") or raw.get("predicted_n") or usage.completion_tokens)
    pre, dec = raw.get("prefill_s"), raw.get("decode_s")
    if pre is None and raw.get("prompt_ms") is not None:
        pre, dec = raw["prompt_ms"] / 1000, (raw.get("predicted_ms") or 0) / 1000
    if pre is None:
        ptps = raw.get("prefill_tps") or raw.get("prompt_per_second") or raw.get("prompt_tps")
        dtps = raw.get("decode_tps") or raw.get("predicted_per_second") or raw.get("generation_tps")
        if ptps is None and dtps is None:
            return None
        pre = pt / ptps if ptps else 0.0
        dec = max(gt - 1, 0) / dtps if dtps else 0.0
    return Timings(prefill_s=float(pre or 0), decode_s=float(dec or 0), prompt_tokens=pt, generated_tokens=gt)


def local_cluster_snapshot(base_url: str) -> Optional[dict]:
    """When `k2mlx cluster up` runs on this machine and serves `base_url`, ask rank 0's health
    hub (what `k2mlx cluster status` shows). Blocking (a socket): call in a thread."""
    try:
        from k2mlx.distributed.health import query_status
        from k2mlx.distributed.state import find
    except ImportError:
        return None
    found = find(url=base_url)  # one state file per cluster; only the one serving base_url
    if not found or not found[0][1].get("heartbeat"):
        return None
    state = found[0][1]
    try:
        snap = query_status(state["heartbeat"], state.get("token", ""))
    except (OSError, ValueError, KeyError):
        return {"ranks": [], "error": "the cluster's health hub does not answer"}
    return snap if isinstance(snap, dict) else None


class Backend:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 *, context_limit: int | None = None, local=None):
        import httpx
        from openai import AsyncOpenAI

        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or "k2mlx"  # any token works against a server without --api-key
        self.client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key, max_retries=0,
                                  timeout=httpx.Timeout(900.0, connect=10.0))
        self.model = model
        self.context_limit = context_limit
        self.local = local  # a LocalServer when the engine runs in this process
        self.models: list[str] = []
        self.last_timings_source = "server"

    @property
    def display_name(self) -> str:
        return self.model or "?"

    async def refresh_models(self) -> list[str]:
        page = await self.client.models.list()
        self.models = [m.id for m in page.data]
        if self.models and (self.model is None or self.model not in self.models):
            self.model = self.models[0]
        for m in page.data:
            if m.id == self.model:
                for key in CONTEXT_KEYS:
                    value = _extra(m, key)
                    if isinstance(value, int) and value > 0:
                        self.context_limit = value
                        break
        return self.models

    async def cluster(self) -> Optional[dict]:
        """GET /v1/cluster when the server has it, else the health hub of a cluster started here with
        `k2mlx cluster up` for this URL; None when not attached to a cluster."""
        import httpx

        try:
            r = await self.client._client.get(f"{self.base_url}/cluster", timeout=3.0,
                                              headers={"Authorization": f"Bearer {self.api_key}"})
            data = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            data = None
        if isinstance(data, dict):
            return data
        if self.local is not None:
            return None  # the in-process server is never a cluster
        return await asyncio.to_thread(local_cluster_snapshot, self.base_url)

    async def prefill_status(self) -> list[dict]:
        """The prompts the server is reading now, from `GET /health` (`prefill`: tokens done,
        total and an ETA per request); [] when it has none or does not say."""
        import httpx

        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        try:
            r = await self.client._client.get(f"{root}/health", timeout=2.0,
                                              headers={"Authorization": f"Bearer {self.api_key}"})
            data = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return []
        rows = data.get("prefill") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            return []
        return [x for x in rows if isinstance(x, dict) and isinstance(x.get("done"), int)
                and isinstance(x.get("total"), int) and x["total"] > 0]

    async def stream(self, messages: list[dict], *, tools: list[dict] | None = None, temperature: float = 0.6,
                     max_tokens: int | None = None) -> AsyncIterator:
        """Yield TextDelta / ReasoningDelta / ToolCall* events and a final Done for one reply.

        A reader task takes chunks off the connection as they arrive and stamps their time, so the
        client-side tokens/s (when the server sends no timings) do not count the UI's drawing."""
        kwargs = dict(model=self.model or "default", messages=messages, stream=True, temperature=temperature,
                      stream_options={"include_usage": True})
        if tools:
            kwargs["tools"] = tools
        if max_tokens:
            kwargs["max_tokens"] = max_tokens
        t0 = time.perf_counter()
        stream = await self.client.chat.completions.create(**kwargs)
        queue: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async with stream:  # leaving early (Esc) closes the connection: the server frees the slot
                    async for chunk in stream:
                        queue.put_nowait((time.perf_counter(), chunk))
                queue.put_nowait((time.perf_counter(), None))
            except BaseException as e:  # handed to the consumer, raised there
                queue.put_nowait((time.perf_counter(), e))
                if isinstance(e, asyncio.CancelledError):
                    raise

        reader = asyncio.create_task(read())
        t_first = t_last = None
        finish, usage, raw_timings, constrained = "stop", None, None, False
        calls: dict[int, list] = {}  # index -> [id, name, args]
        n_chunks = 0
        try:
            while True:
                stamp, chunk = await queue.get()
                if chunk is None:
                    break
                if isinstance(chunk, BaseException):
                    raise chunk
                raw_timings = _extra(chunk, "timings") or raw_timings
                constrained = constrained or _extra(chunk, "constrained") is True
                if chunk.usage is not None:
                    usage = chunk.usage
                    raw_timings = _extra(chunk.usage, "timings") or raw_timings
                for choice in chunk.choices or []:
                    delta = choice.delta
                    reasoning = _extra(delta, "reasoning_content") or _extra(delta, "reasoning")
                    got = False
                    if reasoning:
                        got = True
                        yield ReasoningDelta(reasoning)
                    if delta.content:
                        got = True
                        yield TextDelta(delta.content)
                    for tc in delta.tool_calls or []:
                        got = True
                        idx = tc.index if tc.index is not None else len(calls)
                        fn = tc.function
                        if idx not in calls:
                            calls[idx] = [tc.id or f"call_{idx}", (fn.name if fn else None) or "", ""]
                            yield ToolCallBegin(idx, calls[idx][0], calls[idx][1])
                        if fn and fn.arguments:
                            calls[idx][2] += fn.arguments
                            yield ToolCallArgsDelta(idx, fn.arguments)
                    if got:
                        n_chunks += 1
                        t_first = t_first or stamp
                        t_last = stamp
                    if choice.finish_reason:
                        finish = choice.finish_reason
        finally:
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
        for idx in sorted(calls):
            args = calls[idx][2]
            try:
                json.loads(args or "{}")
                valid = True
            except json.JSONDecodeError:
                valid = False
            yield ToolCallEnd(idx, args, valid)
        u = Usage(usage.prompt_tokens, usage.completion_tokens,
                  getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", 0) or 0) \
            if usage is not None else Usage(0, n_chunks)
        timings = timings_from(raw_timings, u)
        if timings is None:  # the server sent none: time it here (the first chunk ends prefill)
            self.last_timings_source = "client"
            t_first = t_first or time.perf_counter()
            timings = Timings(prefill_s=t_first - t0, decode_s=(t_last or t_first) - t_first,
                              prompt_tokens=u.prompt_tokens, generated_tokens=u.completion_tokens)
        else:
            self.last_timings_source = "server"
        yield Done(finish, u, timings, constrained=constrained)

    async def aclose(self) -> None:
        await self.client.close()
        if self.local is not None:
            self.local.stop()
