"""The OpenAI-compatible HTTP front (FastAPI on uvicorn), on the same engine as gRPC.

Routes: POST /v1/completions and /v1/chat/completions (streamed as server-sent events or
whole), GET /v1/models, POST /tokenize and /detokenize (vLLM's), and, open without the API
key, /health (503 while warming up, draining or failed), /metrics (the engine's Prometheus
registry) and /version.

One OpenAI request is one or more engine requests (its prompts × best_of samples), submitted
all or none and gathered or streamed together (serve/http_events.py: no thread per stream). A
client that disconnects cancels them all, which frees their KV blocks.

Bounds (serve/request_limits.py, serve/http_request.py): a body over ``--max-request-bytes``
is 413 before it is read; tokenizing and chat templates run on a bounded pool (429 when full).
A request whose step failed on the device gets 503 (out of memory: retry) or 500, and the
server serves on; only a dead engine turns it not serving.
"""

from __future__ import annotations

import asyncio
import dataclasses
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
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from brownout_jax.engine.requests import (
    EngineClosedError,
    EngineDeadError,
    EngineOverloadedError,
    FinishReason,
    GenerationRequest,
    RequestError,
    RequestHandle,
    TokenEvent,
)
from brownout_jax.serve import http_tokenize
from brownout_jax.serve.http_events import (
    EventStreamResponse,
    cancel_all,
    engine_events,
    gather_events,
)
from brownout_jax.serve.http_request import PreparePool, parse_body, validation_error
from brownout_jax.serve.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    TokenizeRequest,
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
        """Prepares (chat template, tokenizer) and submits every sample off the event loop,
        on the bounded pool; all or none: a sample refused cancels those submitted before it,
        and a client gone meanwhile cancels them all."""

        def run():
            prepared = prepare()
            handles: list[RequestHandle] = []
            try:
                for sample, generation in enumerate(prepared.samples):
                    first = sample - sample % prepared.best_of  # this prompt's first sample
                    source = handles[first] if first != sample else None
                    handles.append(
                        engine.submit(_tokenized_once(generation, source), share_prefix_with=source)
                    )
            except RequestError as err:
                cancel_all(handles)
                raise client_error(err, prepared, len(handles)) from None
            except BaseException:
                cancel_all(handles)
                raise
            return prepared, handles

        try:
            return await self.pool.run(run, on_abandoned=lambda done: cancel_all(done[1]))
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

    async def tokenizing(self, request: Request, model_type, work):
        """/tokenize or /detokenize: ``work(engine, body)`` on the preparing pool."""
        engine = self.engine()
        body = await parse_body(request, model_type, self.limits.max_request_bytes)
        self.check_model(body.model)
        return await self.pool.run(lambda: work(engine, body), on_abandoned=lambda _: None)

    async def generate(self, request: Request, model_type, chat: bool):
        engine = self.engine()  # warming up: 503 before the body is read
        body = await parse_body(request, model_type, self.limits.max_request_bytes)
        model = self.check_model(body.model)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        max_samples = engine.config.max_queue
        if chat:

            def prepare():
                return prepare_chat(
                    body,
                    engine.tokenizer,
                    engine.max_model_len,
                    request_id,
                    engine.longest_token,
                    max_samples,
                )
        else:

            def prepare():
                return prepare_completion(body, request_id, max_samples)

        prepared, handles = await self.submit(engine, prepare)
        writer = ChunkWriter(chat, request_id, model, prepared, engine.tokenizer)
        if prepared.stream:
            return EventStreamResponse(
                self._stream(handles, engine, writer), on_close=lambda: cancel_all(handles)
            )
        try:
            events = await gather_events(request, handles, engine)
        except EngineDeadError:
            raise self.engine_failed() from None
        except asyncio.CancelledError:
            raise OpenAIError(499, "the client disconnected") from None
        for sample in events:
            if sample[-1].finish_reason is FinishReason.ERROR:
                cancel_all(handles)
                raise self.failed(sample[-1])
        samples = [
            Collected.from_events(
                sample, handle.metrics, handle.request.prompt_token_ids, prepared.echo_only
            )
            for sample, handle in zip(events, handles, strict=True)
        ]
        build = chat_response if chat else completion_response
        return JSONResponse(to_json(build(request_id, model, prepared, samples, engine.tokenizer)))

    async def _stream(self, handles, engine, writer: ChunkWriter) -> AsyncIterator[str]:
        try:
            async for sample, event in engine_events(handles, engine):
                if event.finish_reason is FinishReason.ERROR:
                    yield _sse(self.failed(event).body())
                    break
                handle = handles[sample]
                chunk = writer.event(sample, event, handle.metrics, handle.request.prompt_token_ids)
                yield _sse(to_json(chunk))
            else:
                if writer.prepared.include_usage:
                    yield _sse(to_json(writer.usage([h.metrics for h in handles])))
        except EngineDeadError:
            yield _sse(self.engine_failed().body())
        except OpenAIError as err:  # a response the engine's events cannot make (logprobs)
            yield _sse(err.body())
        yield _sse("[DONE]")


def _tokenized_once(
    generation: GenerationRequest, source: RequestHandle | None
) -> GenerationRequest:
    """A later sample of a text prompt takes the ids the engine made of it for the prompt's
    first sample (``source``), rather than tokenizing the same text again."""
    if generation.prompt is None or source is None or not source.request.prompt_token_ids:
        return generation
    ids = source.request.prompt_token_ids
    return dataclasses.replace(generation, prompt=None, prompt_token_ids=ids)


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

    # vLLM serves these beside /v1; they take the API key like /v1 (they run the tokenizer).
    keyed = APIRouter(dependencies=[Depends(api.require_key)])

    @keyed.post("/tokenize")
    async def tokenize(request: Request):
        return await api.tokenizing(request, TokenizeRequest, http_tokenize.tokenize)

    @keyed.post("/detokenize")
    async def detokenize(request: Request):
        return await api.tokenizing(request, DetokenizeRequest, http_tokenize.detokenize)

    app.include_router(keyed)

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
