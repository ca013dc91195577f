"""The OpenAI- and Anthropic-compatible HTTP app. `create_app(engine)` is all a caller needs: the
`serve` command runs it under uvicorn, the TUI can run it in-process.

Handlers never touch MLX: they validate, tokenize (in a worker thread), hand the request to the
engine and map its events to the client's format. A client that disconnects mid-stream cancels
its request, which frees its batch slot at the engine's next step."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2mlx.engine.events import Done, ParseWarning, TextDelta
from k2mlx.errors import K2Error
from k2mlx.server import convert, metrics, sse
from k2mlx.server.errors import HTTPError, error_body, error_response

log = logging.getLogger("k2mlx.server")
MAX_BODY = 32 << 20


class _CountRequests:
    """ASGI middleware counting responses by route and status (for /metrics) without wrapping
    streaming bodies (a BaseHTTPMiddleware would hide client disconnects from them)."""

    def __init__(self, app, counters: metrics.HttpCounters):
        self.app, self.counters = app, counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")

        async def send_(message):
            if message["type"] == "http.response.start":
                self.counters.note(path if len(path) < 64 else path[:64], message["status"])
            await send(message)

        await self.app(scope, receive, send_)


def create_app(engine, model_name: str | None = None, api_key: str | None = None) -> FastAPI:
    name = model_name or engine.model_name
    app = FastAPI(title="k2mlx", docs_url=None, redoc_url=None, openapi_url=None)
    counters = metrics.HttpCounters()
    app.add_middleware(_CountRequests, counters=counters)
    app.state.engine = engine

    def is_anthropic(request: Request) -> bool:
        return request.url.path.startswith("/v1/messages")

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return error_response(exc, anthropic=is_anthropic(request))

    @app.exception_handler(K2Error)  # RequestError, ContextOverflowError, ClusterError, ...
    async def _k2_error(request: Request, exc: K2Error):
        return error_response(exc, anthropic=is_anthropic(request))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind, str(exc.status_code), anthropic=is_anthropic(request)),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _any_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error_response(exc, anthropic=is_anthropic(request))

    def check_auth(request: Request) -> None:
        if not api_key:
            return  # no key configured: any bearer token is accepted
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                            type_="authentication_error", code="invalid_api_key")

    async def body_of(request: Request) -> dict:
        check_auth(request)
        if engine.failure is not None:
            raise HTTPError(503, f"the model is unavailable: {engine.failure}", type_="service_unavailable",
                            code="cluster_failure")
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > MAX_BODY:
            raise HTTPError(413, f"request body over {MAX_BODY >> 20} MiB", code="body_too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise HTTPError(413, f"request body over {MAX_BODY >> 20} MiB", code="body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise HTTPError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object", code="invalid_json")
        return body

    async def start(req):
        prep = await run_in_threadpool(engine.prepare, req)
        return prep, engine.submit(prep)

    async def collect(stream, request: Request, on_event) -> Done | None:
        """Run a non-streaming request to its end, cancelling it if the client goes away
        (Starlette cancels only streaming handlers on disconnect)."""
        async def watch():
            while True:
                await asyncio.sleep(0.25)
                if await request.is_disconnected():
                    stream.cancel()
                    return

        watcher = asyncio.create_task(watch())
        try:
            async for ev in stream:
                on_event(ev)
        finally:
            watcher.cancel()
            stream.cancel()
        if stream.done is None or stream.done.finish_reason == "cancelled":
            raise HTTPError(400, "the client disconnected", code="client_disconnected")
        return stream.done

    def streaming(gen) -> StreamingResponse:
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def done_error(done: Done) -> dict | None:
        if done.finish_reason != "error":
            return None
        status = 503 if engine.failure is not None else 500
        return error_body(done.error or "generation failed", "service_unavailable" if status == 503 else "server_error",
                          "generation_failed")

    def failed(done: Done | None, anthropic: bool = False) -> JSONResponse | None:
        """The error reply of a non-streaming request whose generation failed, else None."""
        if done is None or (err := done_error(done)) is None:
            return None
        if anthropic:
            err["type"] = "error"
        return JSONResponse(err, status_code=503 if engine.failure else 500)

    def relay(stream, head, map_event, on_error, tail=()) -> StreamingResponse:
        """One SSE reply for every route: the `head` strings, each engine event through `map_event`,
        `on_error(err)` in place of a failed end, then the `tail` strings; the generation is
        cancelled however the client leaves."""
        async def gen():
            try:
                for s in head:
                    yield s
                async for ev in stream:
                    if isinstance(ev, Done) and (err := done_error(ev)) is not None:
                        yield on_error(err)
                        break
                    if isinstance(ev, ParseWarning):
                        log.warning("model output: %s", ev.message)
                    for s in map_event(ev):
                        yield s
                for s in tail:
                    yield s
            finally:
                stream.cancel()

        return streaming(gen())

    # ---------------------------------------------------------------- info
    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSONResponse({"status": "error", "error": str(engine.failure)}, status_code=503)
        return {"status": "ok", "model": name, "active": engine.stats.active, "queued": max(0, engine.stats.queue_depth)}

    @app.get("/v1/cluster")
    async def cluster(request: Request):
        """Hosts, ranks, layers, memory and health when serving a pipeline (the TUI's cluster panel)."""
        check_auth(request)
        status = getattr(engine, "cluster_status", None)
        if status is None:
            raise HTTPError(404, "this server does not run on a cluster", type_="not_found_error",
                            code="not_a_cluster")
        return await run_in_threadpool(status)

    @app.get("/metrics")
    async def get_metrics(request: Request):
        check_auth(request)
        return PlainTextResponse(metrics.render(engine, counters), media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": name, "object": "model", "created": int(app.state.started), "owned_by": "k2mlx",
                "context_length": engine.context_length}

    app.state.started = time.time()

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_auth(request)
        if model_id != name:
            raise HTTPError(404, f"no model named {model_id!r}; this server serves {name!r}", type_="not_found_error",
                            code="model_not_found", param="model")
        return model_card()

    # ---------------------------------------------------------------- OpenAI chat
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await body_of(request)
        req, opts = convert.chat_request(body)
        _, stream = await start(req)
        if not opts["stream"]:
            col = sse.ChatCollector(name, req.logprobs)
            await collect(stream, request, col.add)
            if (err := failed(stream.done)) is not None:
                return err
            for w in col.warnings:
                log.warning("model output: %s", w)
            return col.body(stream.done)

        mapper = sse.ChatStream(name, opts["include_usage"], req.logprobs)
        return relay(stream, [sse.sse(mapper.first())], lambda ev: map(sse.sse, mapper.map(ev)), sse.sse,
                     ["data: [DONE]\n\n"])

    # ---------------------------------------------------------------- OpenAI completions
    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await body_of(request)
        req, opts = convert.completion_request(body)
        _, stream = await start(req)
        mapper = sse.CompletionStream(name, opts["include_usage"])
        echo = opts["prompt"] if opts["echo"] else ""
        if not opts["stream"]:
            text, lps = [echo], []

            def add(ev):
                if isinstance(ev, TextDelta):
                    text.append(ev.text)
                    lps.extend(ev.logprobs or ())

            done = await collect(stream, request, add)
            if (err := failed(done)) is not None:
                return err
            lp = sse.completion_logprobs(lps, len(echo)) if req.logprobs else None
            return {"id": mapper.id, "object": "text_completion", "created": mapper.created, "model": name,
                    "choices": [{"index": 0, "text": "".join(text), "logprobs": lp,
                                 "finish_reason": sse.finish_reason(done)}],
                    "usage": sse.usage_dict(done.usage)}

        return relay(stream, [sse.sse(mapper.chunk(echo))] if echo else [],
                     lambda ev: map(sse.sse, mapper.map(ev)), sse.sse, ["data: [DONE]\n\n"])

    # ---------------------------------------------------------------- Anthropic
    @app.post("/v1/messages")
    async def messages(request: Request):
        body = await body_of(request)
        req, opts = convert.messages_request(body)
        prep, stream = await start(req)
        if not opts["stream"]:
            events = []
            await collect(stream, request, events.append)
            if (err := failed(stream.done, anthropic=True)) is not None:
                return err
            return sse.anthropic_body(name, events, stream.done)

        mapper = sse.AnthropicStream(name, len(prep.prompt))
        return relay(stream, mapper.start(), mapper.map,
                     lambda err: sse.anthropic_event("error", {**err, "type": "error"}))

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        body = await body_of(request)
        body = dict(body, max_tokens=body.get("max_tokens") or 1)
        req, _ = convert.messages_request(body)
        from k2mlx.engine.prompting import build_prompt

        def count():
            req.validate(engine.vocab_size)
            return len(build_prompt(engine.tokenizer, req)[0])

        return {"input_tokens": await run_in_threadpool(count)}

    return app
