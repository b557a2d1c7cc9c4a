"""The OpenAI-compatible HTTP front (FastAPI on uvicorn), on the same engine as gRPC.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events or
whole), GET /v1/models, and, open without the API key, /health (503 while warming up,
draining or failed), /metrics (the engine's Prometheus registry) and /version.

The engine hands each request's token events to a thread-safe queue; an event loop must not
block on it, so a handle wakes its stream through ``loop.call_soon_threadsafe`` (no thread per
stream; one wake-up in flight per stream, however many tokens arrive meanwhile). A client
that disconnects cancels its generation, which frees its KV blocks.

Bounds (serve/request_limits.py, serve/http_request.py): a body over ``--max-request-bytes``
is 413 before it is read; tokenizing and chat templates run on a bounded pool (429 when full).
A request whose step failed on the device gets 503 (out of memory: retry) or 500, and the
server serves on; only a dead engine turns it not serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import metadata

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from brownout_jax.engine.requests import (
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    RequestError,
    RequestHandle,
    TokenEvent,
)
from brownout_jax.serve.http_request import PreparePool, parse_body, validation_error
from brownout_jax.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    error_body,
)
from brownout_jax.serve.openai_requests import (
    PreparedRequest,
    client_error,
    prepare_chat,
    prepare_completion,
    step_error,
)
from brownout_jax.serve.openai_responses import (
    ChunkWriter,
    Collected,
    chat_response,
    completion_response,
    to_json,
)
from brownout_jax.serve.request_limits import RequestLimits
from brownout_jax.serve.serving_state import ServingState

_ENGINE_CHECK_S = 1.0  # how often a waiting stream checks that the engine is still alive


async def engine_events(handle: RequestHandle, engine) -> AsyncIterator[TokenEvent]:
    """The handle's events, awaited on the running loop, up to the finishing one."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    # At most one wake-up in flight: call_soon_threadsafe is a write to the loop's self-pipe,
    # a system call on the engine thread for every token of every stream otherwise. Only the
    # engine thread sets the flag and only the loop clears it, before the events are read:
    # an event pushed after that read finds it clear and schedules a new wake-up.
    scheduled = False

    def woken() -> None:  # event loop
        nonlocal scheduled
        scheduled = False
        wake.set()

    def on_event() -> None:  # engine thread
        nonlocal scheduled
        if scheduled:
            return
        scheduled = True
        # A closed loop (server stopping) has nobody waiting for this event.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(woken)

    handle.notify(on_event)
    engine_gone = False
    while True:
        wake.clear()
        ready = handle.ready_events()
        for event in ready:
            yield event
            if event.finish_reason is not None:
                return
        if ready:
            continue
        if engine_gone:  # and its last events were read: none will come
            raise EngineDeadError("the engine loop stopped before this request finished")
        try:
            await asyncio.wait_for(wake.wait(), _ENGINE_CHECK_S)
        except TimeoutError:
            engine_gone = not engine.alive


class EventStreamResponse(StreamingResponse):
    """Server-sent events that run ``on_close`` however the response ends (a client that
    disconnects mid-stream included: starlette then cancels the stream)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


def _error_response(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


class HttpApi:
    """The routes, over the state both fronts share."""

    def __init__(self, state: ServingState, limits: RequestLimits, pool: PreparePool):
        self.state = state
        self.limits = limits
        self.pool = pool

    def engine(self):
        if self.state.engine is None:
            raise OpenAIError(
                503,
                "the server is warming up",
                code="warming_up",
                error_type="service_unavailable",
                retry_after_s=5,
            )
        return self.state.engine

    def check_model(self, model: str | None) -> str:
        served = self.state.model_name
        if model is not None and model != served:
            raise OpenAIError(
                404,
                f"the model {model!r} does not exist; this server serves {served!r}",
                param="model",
                code="model_not_found",
            )
        return served

    def require_key(self, request: Request) -> None:
        key = self.state.api_key
        if key is not None and not key.accepts(request.headers.get("authorization")):
            raise OpenAIError(
                401,
                "missing or wrong API key: send the header Authorization: Bearer KEY",
                code="invalid_api_key",
            )

    async def submit(self, engine, prepare: Callable[[], PreparedRequest]):
        """Prepares (chat template, tokenizer) and submits off the event loop, on the bounded
        pool; a client gone meanwhile cancels what was submitted."""

        def run():
            prepared = prepare()
            try:
                return prepared, engine.submit(prepared.generation)
            except RequestError as err:
                raise client_error(err, prepared) from None

        try:
            return await self.pool.run(run, on_abandoned=lambda done: done[1].cancel())
        except EngineOverloadedError as err:
            raise OpenAIError(
                429,
                f"{err}; retry later",
                code="queue_full",
                error_type="rate_limit_error",
                retry_after_s=1,
            ) from None
        except EngineClosedError as err:
            raise OpenAIError(
                503,
                str(err),
                code="draining",
                error_type="service_unavailable",
                retry_after_s=5,
            ) from None
        except EngineDeadError:
            raise self.engine_failed() from None

    def engine_failed(self, detail: str | None = None) -> OpenAIError:
        self.state.set_serving(False)
        message = "the engine failed; the server no longer serves"
        return OpenAIError(
            500,
            message if detail is None else f"{message} ({detail})",
            code="engine_failure",
            error_type="internal_error",
        )

    def failed(self, event: TokenEvent) -> OpenAIError:
        """The error of a request that finished with ERROR: its step's, or the engine's."""
        if event.step_failure is not None:
            return step_error(event.error, event.step_failure)
        return self.engine_failed(event.error)

    async def generate(self, request: Request, model_type, chat: bool):
        engine = self.engine()  # warming up: 503 before the body is read
        body = await parse_body(request, model_type, self.limits.max_request_bytes)
        model = self.check_model(body.model)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        if chat:

            def prepare():
                return prepare_chat(
                    body, engine.tokenizer, engine.max_model_len, request_id, engine.longest_token
                )
        else:

            def prepare():
                return prepare_completion(body, request_id)

        prepared, handle = await self.submit(engine, prepare)
        writer = ChunkWriter(chat, request_id, model, prepared, engine.tokenizer)
        if prepared.stream:
            return EventStreamResponse(
                self._stream(handle, engine, writer), on_close=_canceller(handle)
            )
        events = await self._collect(request, handle, engine)
        if events[-1].finish_reason is FinishReason.ERROR:
            raise self.failed(events[-1])
        done = Collected.from_events(events)
        build = chat_response if chat else completion_response
        return JSONResponse(
            to_json(build(request_id, model, prepared, done, handle.metrics, engine.tokenizer))
        )

    async def _stream(self, handle, engine, writer: ChunkWriter) -> AsyncIterator[str]:
        try:
            async for event in engine_events(handle, engine):
                if event.finish_reason is FinishReason.ERROR:
                    yield _sse(self.failed(event).body())
                    break
                yield _sse(to_json(writer.event(event, handle.metrics)))
            else:
                if writer.prepared.include_usage:
                    yield _sse(to_json(writer.usage(handle.metrics)))
        except EngineDeadError:
            yield _sse(self.engine_failed().body())
        yield _sse("[DONE]")

    async def _collect(self, request: Request, handle, engine) -> list[TokenEvent]:
        """All events; a client gone before the end cancels the generation."""
        events: list[TokenEvent] = []

        async def gather():
            async for event in engine_events(handle, engine):
                events.append(event)

        gathering = asyncio.ensure_future(gather())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({gathering, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not gathering.done():
                handle.cancel()
                gathering.cancel()
            gone.cancel()
        try:
            gathering.result()
        except EngineDeadError:
            raise self.engine_failed() from None
        except asyncio.CancelledError:
            raise OpenAIError(499, "the client disconnected") from None
        return events


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _canceller(handle: RequestHandle) -> Callable[[], None]:
    def cancel() -> None:
        if not handle.done:
            handle.cancel()

    return cancel


def _version() -> str:
    try:
        return metadata.version("brownout-jax")
    except metadata.PackageNotFoundError:
        return "unknown"


def create_app(state: ServingState, limits: RequestLimits, pool: PreparePool) -> FastAPI:
    api = HttpApi(state, limits, pool)
    app = FastAPI(title="brownout-jax", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def _openai_error(request, err: OpenAIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        return _error_response(validation_error(err.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return JSONResponse(
            error_body(f"{request.method} {request.url.path}: {err.detail}", kind),
            status_code=err.status_code,
        )

    @app.exception_handler(Exception)
    async def _unexpected(request, err: Exception):
        # The traceback goes to the server's log, never to the client.
        traceback.print_exception(err, file=sys.stderr)
        return JSONResponse(error_body("internal server error", "internal_error"), status_code=500)

    @app.get("/health")
    async def health():
        if state.serving:
            return Response(status_code=200)
        reason = (
            "draining" if state.draining else "warming up" if state.engine is None else "failed"
        )
        return JSONResponse(error_body(f"not serving: {reason}", "service_unavailable"), 503)

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        engine = api.engine()
        engine.stats()  # refreshes the gauges (running, waiting, KV blocks)
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version():
        return {"version": _version()}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(api.require_key)])

    @v1.get("/models")
    async def models():
        engine = api.engine()
        card = ModelCard(id=state.model_name, max_model_len=engine.max_model_len)
        return to_json(ModelList(data=[card]))

    @v1.post("/completions")
    async def completions(request: Request):
        return await api.generate(request, CompletionRequest, chat=False)

    @v1.post("/chat/completions")
    async def chat_completions(request: Request):
        return await api.generate(request, ChatCompletionRequest, chat=True)

    app.include_router(v1)
    return app


class HttpFront:
    """uvicorn on a thread of the server process, on a socket bound up front (so port 0
    resolves to its port before anything is announced)."""

    def __init__(
        self,
        state: ServingState,
        host: str,
        port: int,
        limits: RequestLimits = RequestLimits(),  # noqa: B008 (frozen)
    ):
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        self._socket = socket.socket(family, kind, proto)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind(address)
        except OSError as err:
            self._socket.close()
            raise OSError(f"HTTP: cannot bind {host}:{port} ({err})") from None
        self.port = self._socket.getsockname()[1]
        self.prepare_pool = PreparePool(limits.prepare_threads, limits.prepare_queue)
        config = uvicorn.Config(
            create_app(state, limits, self.prepare_pool),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=10,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="brownout-http", daemon=True)
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as err:  # surfaced by start()/stop() in the main thread
            self._error = err

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        deadline = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self._server.started or not self._thread.is_alive():
                break
            deadline.wait(0.02)
        if not self._server.started:
            raise RuntimeError(f"the HTTP front did not start: {self._error!r}")

    def stop(self, timeout: float = 15.0) -> None:
        """Stops accepting, lets open responses finish (they already have their last token
        after a drain), then closes."""
        self._server.should_exit = True
        if self._thread.ident is not None:  # started
            self._thread.join(timeout)
        self._socket.close()
        self.prepare_pool.close()
