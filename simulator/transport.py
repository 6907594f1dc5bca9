"""The simulator's side of a connection: read a body, stream events, notice a client leaving, abort.

Split from the app (`server.py`), which routes requests, because this is the part that knows how
uvicorn behaves underneath ASGI, and it is what the fault and disconnect tests exercise.

Connection faults.  ASGI has no "abort the connection" message, and an exception raised by the app
makes uvicorn answer 500 when no response has started.  uvicorn's `send` is a bound method of its
request cycle, which holds the connection's transport, so `transport_of` reaches it: `drop` aborts it
(the client gets a reset / "server disconnected without a response") and a cut stream closes it after
the events already written (the client sees a chunked body without its terminating chunk, never a
clean end).  On a server without that attribute, the app raises `SimulatedDisconnect` instead, which
every ASGI server turns into a closed connection once the response has started.

Client disconnects.  uvicorn's `send` silently drops writes after the client went away, so a stream
would run to its end unnoticed.  While a reply takes time, a watcher task waits on `receive()` for
`http.disconnect` and cancels the reply, which the engine counts as `cancelled`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from gateway.asgi import JSON, ClientGone, Receive, Send, read_body

from .render import DONE_EVENT

ABORT_SETTLE_S = 1.0  # how long to wait for the server to notice a connection we closed ourselves
MAX_BODY_BYTES = 1 << 40  # effectively none, as before: the gateway in front enforces max_body_bytes


class EncodedHeaders(NamedTuple):
    """A reply's headers as ASGI bytes: the content type apart (as ``gateway.asgi.send_bytes`` takes
    it), the others, and all of them in order (the start of a stream)."""

    content_type: bytes
    others: list[tuple[bytes, bytes]]
    all: list[tuple[bytes, bytes]]


_encoded_headers: dict[tuple[tuple[str, str], ...], EncodedHeaders] = {}


def encode_headers(headers: list[tuple[str, str]]) -> EncodedHeaders:
    """Reply headers as ASGI bytes pairs; the few distinct header sets are encoded once."""
    key = tuple(headers)
    encoded = _encoded_headers.get(key)
    if encoded is None:
        pairs = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        content_type = next((v for k, v in pairs if k.lower() == b"content-type"), JSON)
        others = [(k, v) for k, v in pairs if k.lower() != b"content-type"]
        encoded = EncodedHeaders(content_type, others, pairs)
        if len(_encoded_headers) < 256:
            _encoded_headers[key] = encoded
    return encoded


async def read_request(receive: Receive) -> bytes | None:
    """The whole request body (read by ``gateway.asgi.read_body``), or None when the client
    disconnected first, even before its first chunk: then there is nobody to answer."""
    try:
        return await read_body(receive, {}, MAX_BODY_BYTES)
    except ClientGone:
        return None


async def until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def transport_of(send: Send) -> Any:
    """The connection's transport behind uvicorn's bound `send`, or None on other servers."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is not None and hasattr(transport, "abort") and hasattr(transport, "close"):
        return transport
    return None


async def pump(events: AsyncIterator[bytes], send: Send, headers: list[tuple[bytes, bytes]]) -> None:
    """Send a stream's events, one body message each; headers go out with the first event.

    Holding the headers until the first event makes queueing, TTFT and stall faults visible as time to
    first byte, as behind a real upstream.
    """
    started = False
    try:
        async for event in events:
            if not started:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                started = True
            last = event == DONE_EVENT
            await send({"type": "http.response.body", "body": event, "more_body": not last})
            if last:
                return
        if not started:  # defensive: an iterator that ends without [DONE] still ends the response
            await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


async def race(work: asyncio.Future[None], receive: Receive) -> tuple[bool, asyncio.Future[None] | None]:
    """Run `work` until done or until the client disconnects (then cancel it).

    Returns (finished, watcher); the watcher is still running when `work` raised, so the caller can
    wait for the disconnect it causes.  (``gateway.asgi.DisconnectWatch`` cancels the handler
    instead, which suits a relay; here the handler must outlive the disconnect of a connection it
    aborted itself, to wait until uvicorn has seen it.)
    """
    watch = asyncio.ensure_future(until_disconnect(receive))
    try:
        await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        work.cancel()
        watch.cancel()
        raise
    if work.done():
        if work.cancelled() or work.exception() is None:
            watch.cancel()
            return True, None
        return True, watch
    work.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work
    return False, None
