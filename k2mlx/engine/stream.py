"""The consumer side of one request: an async iterator (server, TUI) or a plain iterator (CLI).

The model thread pushes events through `sink`; these classes only queue them. Closing either
iterator, or dropping it, cancels the request so its batch slot is freed at the next step."""
from __future__ import annotations

import asyncio
import logging
import queue

from k2mlx.events import Done

log = logging.getLogger("k2mlx.engine")


class _Base:
    def __init__(self, engine, rid: int, prompt_tokens: int):
        self._engine, self.rid, self.prompt_tokens = engine, rid, prompt_tokens
        self.done: Done | None = None
        self._closed = False

    def cancel(self) -> None:
        if not self._closed:
            self._closed = True
            if self.done is None:
                self._engine.cancel(self.rid)

    def __del__(self):
        try:
            self.cancel()
        except Exception:  # at interpreter exit the engine may be gone; nothing is left to free
            log.debug("cancel from __del__ failed", exc_info=True)


class AsyncRequestStream(_Base):
    """`async for event in stream`; ends after the `Done` event."""

    def __init__(self, engine, rid, prompt_tokens, loop: asyncio.AbstractEventLoop):
        super().__init__(engine, rid, prompt_tokens)
        self._loop = loop
        self._q: asyncio.Queue = asyncio.Queue()

    def sink(self, event) -> None:  # called on the model thread
        try:
            self._loop.call_soon_threadsafe(self._q.put_nowait, event)
        except RuntimeError:  # loop closed: nobody is listening any more
            self._engine.cancel(self.rid)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.done is not None or self._closed:
            raise StopAsyncIteration
        try:
            event = await self._q.get()
        except BaseException:  # task cancelled (client went away): free the slot
            self.cancel()
            raise
        if isinstance(event, Done):
            self.done = event
        return event

    async def aclose(self) -> None:
        self.cancel()


class SyncRequestStream(_Base):
    """`for event in stream`; for the CLI and tests that own no event loop."""

    def __init__(self, engine, rid, prompt_tokens):
        super().__init__(engine, rid, prompt_tokens)
        self._q: queue.Queue = queue.Queue()
        self.sink = self._q.put

    def __iter__(self):
        return self

    def __next__(self):
        if self.done is not None or self._closed:
            raise StopIteration
        event = self._q.get()
        if isinstance(event, Done):
            self.done = event
        return event

    def close(self) -> None:
        self.cancel()
