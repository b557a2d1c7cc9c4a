"""The engine's token events on the HTTP front's event loop: one request's samples (engine
requests) merged into one stream of (sample, event), gathered whole or streamed as
server-sent events, and cancelled together when the client goes away.

The engine hands each request's token events to a thread-safe queue; an event loop must not
block on it, so a handle wakes its stream through ``loop.call_soon_threadsafe`` (no thread per
stream; one wake-up in flight per stream, however many tokens of however many samples arrive
meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from fastapi import Request
from fastapi.responses import StreamingResponse

from brownout_jax.engine.requests import EngineDeadError, RequestHandle, TokenEvent

_ENGINE_CHECK_S = 1.0  # how often a waiting stream checks that the engine is still alive


async def engine_events(
    handles: Sequence[RequestHandle], engine
) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(index into ``handles``, event) as the events arrive, awaited on the running loop, up
    to every handle's finishing event."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    # At most one wake-up in flight: call_soon_threadsafe is a write to the loop's self-pipe,
    # a system call on the engine thread for every token of every stream otherwise. Only the
    # engine thread sets the flag (every handle's events come from it) and only the loop
    # clears it, before the events are read: an event pushed after that read finds it clear
    # and schedules a new wake-up.
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

    for handle in handles:
        handle.notify(on_event)
    running = list(range(len(handles)))
    engine_gone = False
    while running:
        wake.clear()
        arrived = False
        for index in list(running):
            for event in handles[index].ready_events():
                arrived = True
                yield index, event
                if event.finish_reason is not None:  # the last event it will ever have
                    running.remove(index)
                    break
        if arrived:
            continue
        if engine_gone:  # and its last events were read: none will come
            raise EngineDeadError("the engine loop stopped before this request finished")
        try:
            await asyncio.wait_for(wake.wait(), _ENGINE_CHECK_S)
        except TimeoutError:
            engine_gone = not engine.alive


async def gather_events(
    request: Request, handles: Sequence[RequestHandle], engine
) -> list[list[TokenEvent]]:
    """Every handle's events, whole; a client gone before the end cancels them all (raises
    asyncio.CancelledError)."""
    events: list[list[TokenEvent]] = [[] for _ in handles]

    async def gather():
        async for index, event in engine_events(handles, engine):
            events[index].append(event)

    gathering = asyncio.ensure_future(gather())
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({gathering, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not gathering.done():
            cancel_all(handles)
            gathering.cancel()
        gone.cancel()
    gathering.result()
    return events


async def disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def cancel_all(handles: Sequence[RequestHandle]) -> None:
    """Cancels the handles still generating (a finished one has nothing to free)."""
    for handle in handles:
        if not handle.done:
            handle.cancel()


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
