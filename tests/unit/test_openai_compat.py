"""The aiohttp upstream adapter against a precise local HTTP server: bytes, keys, timeouts, cuts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import UpstreamConfig
from gateway.upstreams.base import UpstreamFailure
from gateway.upstreams.openai_compat import OpenAICompatUpstream

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture()
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    servers: list[TestServer] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}/v1"

    yield start
    for server in servers:
        await server.close()


def upstream(base_url: str, **timeouts: float) -> OpenAICompatUpstream:
    cfg = UpstreamConfig(
        kind="openai",
        base_url=base_url,
        models={"m": "m"},
        headers={"x-extra": "1"},
        timeouts={"connect_s": 1, "first_byte_s": 0.5, "idle_s": 0.5, "total_s": 5, **timeouts},
    )
    return OpenAICompatUpstream("up", cfg, "sk-upstream")


async def test_non_stream_bytes_and_headers_pass_unchanged(serve) -> None:
    seen: dict[str, object] = {}

    async def handler(request: web.Request) -> web.Response:
        seen["body"] = await request.read()
        seen["auth"] = request.headers.get("Authorization")
        seen["extra"] = request.headers.get("x-extra")
        seen["encoding"] = request.headers.get("Accept-Encoding")
        return web.Response(body=b'{"id":"x","extra_field":1}', content_type="application/json")

    up = upstream(await serve(handler))
    await up.start()
    try:
        body = b'{"model":"m","zeta":1,"messages":[]}'
        reply = await up.send(body, stream=False)
        assert reply.status == 200
        assert await reply.read() == b'{"id":"x","extra_field":1}'
        await reply.aclose()
    finally:
        await up.close()
    assert seen == {"body": body, "auth": "Bearer sk-upstream", "extra": "1", "encoding": "identity"}


async def test_stream_chunks_arrive_as_sent(serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    up = upstream(await serve(handler))
    await up.start()
    try:
        reply = await up.send(b"{}", stream=True)
        data = b"".join([c async for c in reply.chunks()])
        await reply.aclose()
    finally:
        await up.close()
    assert data == b"data: 0\n\ndata: 1\n\ndata: 2\n\ndata: [DONE]\n\n"


async def test_error_status_and_retry_after_are_kept(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": {"message": "slow down", "type": "rate_limit_reached_error"}},
            status=429,
            headers={"Retry-After": "7"},
        )

    up = upstream(await serve(handler))
    await up.start()
    try:
        reply = await up.send(b"{}", stream=True)
        assert (reply.status, reply.retry_after) == (429, "7")
        assert b"slow down" in await reply.read()
        await reply.aclose()
    finally:
        await up.close()


async def test_connection_refused_is_a_connect_failure() -> None:
    up = upstream("http://127.0.0.1:9/v1")
    await up.start()
    try:
        with pytest.raises(UpstreamFailure) as info:
            await up.send(b"{}", stream=False)
    finally:
        await up.close()
    assert info.value.kind == "connect"


async def test_silent_stream_is_a_first_byte_timeout(serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(3)
        return resp

    up = upstream(await serve(handler), first_byte_s=0.3)
    await up.start()
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(UpstreamFailure) as info:
            await up.send(b"{}", stream=True)
    finally:
        await up.close()
    assert info.value.kind == "first_byte_timeout"
    assert loop.time() - started < 1.5


async def test_stall_mid_stream_is_an_idle_timeout(serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(3)
        return resp

    up = upstream(await serve(handler), idle_s=0.3)
    await up.start()
    try:
        reply = await up.send(b"{}", stream=True)
        got = []
        with pytest.raises(UpstreamFailure) as info:
            async for chunk in reply.chunks():
                got.append(chunk)
        await reply.aclose(abort=True)
    finally:
        await up.close()
    assert got == [b"data: 1\n\n"]
    assert info.value.kind == "idle_timeout"


async def test_cut_stream_is_reported(serve) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # no terminating chunk: a broken stream
        return resp

    up = upstream(await serve(handler))
    await up.start()
    try:
        reply = await up.send(b"{}", stream=True)
        with pytest.raises(UpstreamFailure) as info:
            async for _ in reply.chunks():
                pass
        await reply.aclose(abort=True)
    finally:
        await up.close()
    assert info.value.kind == "cut"


async def test_non_stream_total_timeout(serve) -> None:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return web.json_response({})

    up = upstream(await serve(handler), first_byte_s=0.2, total_s=0.4)
    await up.start()
    try:
        with pytest.raises(UpstreamFailure) as info:
            await up.send(b"{}", stream=False)
    finally:
        await up.close()
    assert info.value.kind == "total_timeout"


async def test_abort_closes_the_upstream_connection(serve) -> None:
    closed = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for i in range(100):
                await resp.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(0.02)
        except (ConnectionResetError, asyncio.CancelledError):
            closed.set()
            raise
        return resp

    up = upstream(await serve(handler))
    await up.start()
    try:
        reply = await up.send(b"{}", stream=True)
        await reply.aclose(abort=True)
        await asyncio.wait_for(closed.wait(), 2)
    finally:
        await up.close()
    assert closed.is_set()
