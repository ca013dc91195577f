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
from fastapi.responses import PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from k2mlx.engine.events import Done, ParseWarning, PrefillProgress, TextDelta
from k2mlx.errors import K2Error
from k2mlx.server import convert, metrics, sse
from k2mlx.server.errors import JSON, HTTPError, error_body, error_response, internal_error, request_id
from k2mlx.server.guard import Guard
from k2mlx.server.limits import MAX_DEPTH, check_body, deep_path, prompt_byte_limit

log = logging.getLogger("k2mlx.server")
MAX_BODY = 32 << 20  # the most any body may be, whatever the context length
PARSE_INLINE = 64 << 10  # bodies above this are parsed and checked in a worker thread
BIG_PROMPT = 1 << 20  # prompts above this are tokenized one at a time (tokenizing holds the GIL)
KEEPALIVE_S = 1.5  # under the 2 s that clients and proxies should ever wait for a byte


def create_app(engine, model_name: str | None = None, api_key: str | None = None,
               allow_origins: tuple[str, ...] = (), keepalive_s: float = KEEPALIVE_S) -> FastAPI:
    """`allow_origins`: web origins (`https://app.example`, or `*`) allowed besides loopback ones;
    `keepalive_s`: the longest silence on a stream before a keep-alive is sent."""
    name = model_name or engine.model_name
    app = FastAPI(title="k2mlx", docs_url=None, redoc_url=None, openapi_url=None, default_response_class=JSON)
    counters = metrics.HttpCounters()
    app.add_middleware(Guard, routes=app.router.routes, counters=counters, api_key=api_key,
                       allow_origins=allow_origins)
    app.state.engine = engine
    prompt_limit = prompt_byte_limit(engine.context_length, engine.tokenizer)
    body_limit = min(MAX_BODY, 4 * prompt_limit + (1 << 20))  # JSON escapes and non-prompt fields
    big_prompts = asyncio.Semaphore(1)

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
        return JSON(error_body(str(exc.detail), kind, str(exc.status_code), anthropic=is_anthropic(request)),
                    status_code=exc.status_code, headers=exc.headers)  # a 405 keeps its Allow header

    # any other exception reaches the Guard middleware: logged once, a generic 500 with the request id

    def check_auth(request: Request) -> None:
        if not api_key:
            return  # no key configured: any bearer token is accepted
        got = request.headers.get("authorization", "")
        token = got[7:].strip() if got.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise HTTPError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                            type_="authentication_error", code="invalid_api_key")

    def too_large() -> HTTPError:
        return HTTPError(413, f"the request body is over {body_limit} bytes, more than a prompt for this model's "
                         f"{engine.context_length}-token context can need", code="body_too_large",
                         headers={"Connection": "close"})

    def parse(raw: bytes) -> tuple[dict, int]:
        try:
            body = json.loads(raw)
        except RecursionError:  # json.loads's own limit (~900 levels), past the cap below
            where = deep_path(raw) or "body"
            raise HTTPError(400, f"{where} is nested more than {MAX_DEPTH} levels deep", code="nesting_too_deep",
                            param=where.split(".")[0].split("[")[0]) from None
        except ValueError as e:
            raise HTTPError(400, f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the request body must be a JSON object", code="invalid_json")
        body, prompt_bytes = check_body(body)  # depth cap, lone surrogates: before anything recursive
        if prompt_bytes > prompt_limit:
            raise HTTPError(400, f"the prompt is {prompt_bytes} bytes, more than this model's context of "
                            f"{engine.context_length} tokens can hold (at most {prompt_limit} bytes); shorten it",
                            code="context_length_exceeded", param="prompt" if "prompt" in body else "messages")
        return body, prompt_bytes

    async def body_of(request: Request) -> dict:
        """The checked JSON body; `request.state.prompt_bytes` is the size of its prompt text."""
        check_auth(request)
        if engine.failure is not None:
            raise HTTPError(503, f"the model is unavailable: {engine.failure}", type_="service_unavailable",
                            code="cluster_failure")
        size = request.headers.get("content-length")
        if size and size.isdigit() and int(size) > body_limit:
            raise too_large()
        chunks, n = [], 0
        async for chunk in request.stream():  # counted as it arrives: a chunked body has no length
            n += len(chunk)
            if n > body_limit:
                raise too_large()
            chunks.append(chunk)
        raw = b"".join(chunks)
        body, request.state.prompt_bytes = parse(raw) if n <= PARSE_INLINE else await run_in_threadpool(parse, raw)
        return body

    async def prepare(request: Request, fn, *args):
        """Tokenizing runs in a worker thread; big prompts one at a time, so a few huge requests
        cannot starve the event loop (and every other client) of the GIL."""
        if getattr(request.state, "prompt_bytes", 0) <= BIG_PROMPT:
            return await run_in_threadpool(fn, *args)
        async with big_prompts:
            return await run_in_threadpool(fn, *args)

    async def start(request: Request, req):
        prep = await prepare(request, engine.prepare, req)
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
        if engine.failure is not None:  # the cluster's own message: which host and rank were lost
            return error_body(done.error or "generation failed", "service_unavailable", "generation_failed")
        log.error("request %s: generation failed: %s", request_id.get(), done.error)
        e = internal_error()
        return error_body(e.message, e.type, "generation_failed")

    def failed(done: Done | None, anthropic: bool = False) -> JSON | None:
        """The error reply of a non-streaming request whose generation failed, else None."""
        if done is None or (err := done_error(done)) is None:
            return None
        if anthropic:
            err["type"] = "error"
        return JSON(err, status_code=503 if engine.failure else 500)

    def relay(stream, head, map_event, on_error, tail=(), ping: str = sse.KEEPALIVE,
              progress=sse.progress_comment) -> StreamingResponse:
        """One SSE reply for every route: the `head` strings, each engine event through `map_event`,
        `on_error(err)` in place of a failed end, then the `tail` strings; the generation is
        cancelled however the client leaves. Every stream ends with the tail or an error event:
        any exception while mapping or encoding (not just a failed generation) becomes one.
        `ping` is sent at once when there is no head, then after every `keepalive_s` without an
        event (waiting for a slot, prefill), so clients and proxies never see a silent stream;
        `progress(event)` after each prefill chunk."""
        def wire(s: str) -> bytes:  # a lone surrogate can only sit inside a JSON string: escape it
            return s.encode("utf-8", "backslashreplace")

        async def gen():
            try:
                for s in head or [ping]:
                    yield wire(s)
                async for ev in sse.paced(stream, keepalive_s):
                    if ev is None:
                        yield wire(ping)
                        continue
                    if isinstance(ev, PrefillProgress):
                        yield wire(progress(ev))
                        continue
                    if isinstance(ev, Done) and (err := done_error(ev)) is not None:
                        yield wire(on_error(err))
                        return
                    if isinstance(ev, ParseWarning):
                        log.warning("model output: %s", ev.message)
                    for s in map_event(ev):
                        yield wire(s)
                for s in tail:
                    yield wire(s)
            except Exception:
                log.exception("request %s: stream failed", request_id.get())
                e = internal_error()
                yield wire(on_error(error_body(e.message, e.type, e.code)))
            finally:
                stream.cancel()

        return streaming(gen())

    # ---------------------------------------------------------------- info
    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSON({"status": "error", "error": str(engine.failure)}, status_code=503)
        return {"status": "ok", "model": name, "active": engine.stats.active, "queued": max(0, engine.stats.queue_depth),
                "prefill": prefill()}

    def prefill() -> list[dict]:
        """Requests reading their prompts: tokens done / total and an ETA (the engine's own view)."""
        status = getattr(engine, "prefill_status", None)
        return status() if status is not None else []

    @app.get("/v1/cluster")
    async def cluster(request: Request):
        """Hosts, ranks, layers, memory and health when serving a pipeline (the TUI's cluster panel)."""
        check_auth(request)
        status = getattr(engine, "cluster_status", None)
        if status is None:
            raise HTTPError(404, "this server does not run on a cluster", type_="not_found_error",
                            code="not_a_cluster")
        snapshot = await run_in_threadpool(status)
        return {**snapshot, "prefill": prefill()} if isinstance(snapshot, dict) else snapshot

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
        req.progress = opts["stream"]  # PrefillProgress events: progress lines while the prompt is read
        _, stream = await start(request, req)
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
        req.progress = opts["stream"]  # PrefillProgress events: progress lines while the prompt is read
        _, stream = await start(request, req)
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
        req.progress = opts["stream"]  # PrefillProgress events: progress lines while the prompt is read
        prep, stream = await start(request, req)
        if not opts["stream"]:
            events = []
            await collect(stream, request, events.append)
            if (err := failed(stream.done, anthropic=True)) is not None:
                return err
            return sse.anthropic_body(name, events, stream.done)

        mapper = sse.AnthropicStream(name, len(prep.prompt))
        return relay(stream, mapper.start(), mapper.map,
                     lambda err: sse.anthropic_event("error", {**err, "type": "error"}),
                     ping=(ping := sse.anthropic_event("ping", {"type": "ping"})), progress=lambda ev: ping)

    @app.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request):
        body = await body_of(request)
        body = dict(body, max_tokens=body.get("max_tokens") or 1)
        req, _ = convert.messages_request(body)
        from k2mlx.engine.prompting import build_prompt

        def count():
            req.validate(engine.vocab_size)
            return len(build_prompt(engine.tokenizer, req)[0])

        return {"input_tokens": await prepare(request, count)}

    return app
