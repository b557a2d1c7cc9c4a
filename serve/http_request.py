"""The HTTP request before the engine: its body read within ``--max-request-bytes`` and
parsed (errors naming the field), and the bounded pool that tokenizes it (see
serve/request_limits.py for the bounds)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from fastapi import Request
from pydantic import ValidationError

from brownout_jax.serve.openai_protocol import OpenAIError

T = TypeVar("T")


# ----------------------------------------------------------------------------- the body


def body_too_large(limit: int, declared: int | None = None) -> OpenAIError:
    size = "" if declared is None else f" ({declared} bytes)"
    return OpenAIError(
        413,
        f"the request body{size} exceeds this server's limit of {limit} bytes "
        "(--max-request-bytes)",
        code="request_too_large",
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The body, up to ``limit`` bytes: a Content-Length over it is refused before anything
    is read, a chunked body as soon as what arrived passes it (uvicorn discards the rest)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise OpenAIError(400, f"Content-Length: not a number ({declared!r})") from None
        if size > limit:
            raise body_too_large(limit, size)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model_type, limit: int):
    """The JSON body as ``model_type``, whatever Content-Type says (curl -d sends form
    encoding unless told otherwise); bounded first (``read_body``)."""
    body = await read_body(request, limit)
    try:
        return model_type.model_validate_json(body)
    except ValidationError as err:
        raise validation_error(err.errors()) from None


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_union_tag(part) -> bool:
    """pydantic names the union member a value failed in its error path (``prompt.list[int]``)."""
    return isinstance(part, str) and (part in _TYPE_NAMES or "[" in part)


def validation_error(errors: list) -> OpenAIError:
    """pydantic's first complaint, naming the field (a JSON path below the body); a value
    that fits no member of a union is told which forms it may take."""
    first = errors[0]
    if first.get("type") == "json_invalid":
        return OpenAIError(400, f"the request body is not valid JSON: {first.get('msg')}")
    loc = [part for part in first.get("loc", ()) if part != "body"]
    if not loc:
        return OpenAIError(400, f"the request body: {first.get('msg')}")
    tag_at = next((i for i, part in enumerate(loc) if _is_union_tag(part)), None)
    if tag_at is None:
        path = ".".join(map(str, loc))
        return OpenAIError(400, f"{path}: {first.get('msg')}", param=path)
    path = ".".join(map(str, loc[:tag_at]))
    forms = []
    for error in errors:
        tail = [p for p in error.get("loc", ()) if p != "body"]
        if tail[:tag_at] == loc[:tag_at] and len(tail) > tag_at and tail[tag_at] not in forms:
            forms.append(tail[tag_at])
    return OpenAIError(400, f"{path}: must be one of {', '.join(forms)}", param=path)


# ----------------------------------------------------------------------------- preparing


class PreparePool:
    """Tokenizing and chat templates off the event loop, on ``threads`` threads with at most
    ``queue`` more requests waiting (asyncio's default executor queues without bound: a burst
    of long prompts would pile up unseen). Full: 429 at once, like a full admission queue."""

    def __init__(self, threads: int, queue: int):
        self._executor = concurrent.futures.ThreadPoolExecutor(
            threads, thread_name_prefix="brownout-prepare"
        )
        self._capacity = threads + queue
        self._lock = threading.Lock()
        self._pending = 0  # submitted and not done: running or waiting for a thread

    @property
    def pending(self) -> int:
        return self._pending

    def _done(self, _future) -> None:  # any thread; also when cancelled before it ran
        with self._lock:
            self._pending -= 1

    async def run(self, work: Callable[[], T], on_abandoned: Callable[[T], None]) -> T:
        """``work()``'s result. If the caller goes away (its task cancelled) while ``work``
        runs, the result is handed to ``on_abandoned`` (a submitted request is cancelled
        rather than generated for nobody)."""
        with self._lock:
            if self._pending >= self._capacity:
                raise OpenAIError(
                    429,
                    f"{self._capacity} requests are already being tokenized or waiting to be; "
                    "retry later",
                    code="prepare_queue_full",
                    error_type="rate_limit_error",
                    retry_after_s=1,
                )
            self._pending += 1
        future = self._executor.submit(work)
        future.add_done_callback(self._done)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: _hand_over(f, on_abandoned))
            raise

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _hand_over(future: concurrent.futures.Future, on_abandoned: Callable) -> None:
    if not future.cancelled() and future.exception() is None:
        on_abandoned(future.result())
