"""Small raw-ASGI helpers: the ASGI types, request reading and response writing the front ends and
the pipeline share.

They sit below ``api/`` and ``pipeline.py`` so that the pipeline can write to the client without
importing a front end. The front ends are plain ASGI rather than framework routes. bench/frontends.py
serves the same handler this way, on Starlette and on FastAPI (bench/RESULTS.md, "Front end"):
Starlette needs 18-30 % more server CPU per non-stream request at 64 connections and 42-67 % more
per stream; FastAPI 18-102 % more per non-stream request (1 or 64 connections) and 72-100 % more
per stream. The exception is a lone non-stream request: Starlette then costs only 4-11 % more
CPU, under the 10 % line and within the noise of the runs.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from gateway.errors import GatewayError, payload_too_large, unsupported_media_type

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
CT_JSON = (b"content-type", JSON)
CT_SSE = (b"content-type", b"text/event-stream")
NO_CACHE = (b"cache-control", b"no-cache")


_ID_PREFIX = "req_" + os.urandom(6).hex()
_ids = itertools.count(1)


def new_request_id() -> str:
    """Unique across processes (a random per-process prefix) without a system call per request."""
    return f"{_ID_PREFIX}{next(_ids):010x}"


def header_map(scope: Scope) -> dict[bytes, bytes]:
    """Request headers by lower-case name (ASGI servers already lower-case them)."""
    return dict(scope["headers"])


def check_json_content_type(headers: dict[bytes, bytes]) -> None:
    """Accept application/json (any parameters) or no content type; refuse anything else with 415."""
    value = headers.get(b"content-type")
    if value is None:
        return
    media = value.split(b";", 1)[0].strip().lower()
    if media != JSON and not (media.startswith(b"application/") and media.endswith(b"+json")):
        raise unsupported_media_type(value.decode("latin-1"))


class ClientGone(asyncio.CancelledError):
    """The client closed the connection before its request body was in: nothing to answer, nothing
    went wrong in the gateway. A cancellation (``except Exception`` does not catch it, and it unwinds
    what is running); the app logs one info line for it, no traceback."""


async def read_body(receive: Receive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The whole request body, refusing more than ``limit`` bytes (413) before reading it all."""
    declared = headers.get(b"content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise payload_too_large(limit)
        except ValueError:
            raise GatewayError(400, "Content-Length is not a number.", code="bad_content_length") from None
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone("the client went away before sending its body")
    body = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > limit:
            raise payload_too_large(limit)
        return body
    parts = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone(f"the client went away after {size} bytes of its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise payload_too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], content_type: bytes = JSON
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def send_json(send: Send, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_bytes(send, status, orjson.dumps(payload), headers or [])


async def send_error(send: Send, error: GatewayError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_bytes(send, error.status, error.body(), [*(headers or []), *error.headers])


class DisconnectWatch:
    """Cancels the handling task when the client disconnects.

    uvicorn silently drops writes after a disconnect, so a stream relay would otherwise keep
    the upstream generating (and billing) for nobody. One pending ``receive()`` per request, armed
    after the body is read, notices the disconnect and cancels the task at once.
    """

    __slots__ = ("_finished", "_task", "_watcher", "disconnected")

    def __init__(self, receive: Receive) -> None:
        self._task = asyncio.current_task()
        self._finished = False
        self.disconnected = False
        self._watcher = asyncio.ensure_future(receive())
        self._watcher.add_done_callback(self._on_message)

    def _on_message(self, fut: asyncio.Future[Message]) -> None:
        if self._finished or fut.cancelled() or fut.exception() is not None:
            return
        if fut.result().get("type") == "http.disconnect" and self._task is not None:
            self.disconnected = True
            self._task.cancel()

    def finish(self) -> None:
        """Call before the last write: from here on a completed response is not a disconnect."""
        self._finished = True
        if not self._watcher.done():
            self._watcher.cancel()
