"""OpenAI-compatible upstreams (Moonshot, aggregators, self-hosted vLLM): the fast path.

One pooled aiohttp session per upstream. aiohttp is the client because it measured fastest here
(the shared harness's bench/RESULTS.md, "raw ASGI, upstream via ..." rows: 177 µs of proxy CPU
per request with aiohttp, 471 µs with httpx on an aiohttp transport, 2,958 µs with plain httpx).
Bytes go out as given and come back as received: this module never parses bodies.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
from yarl import URL

from gateway import __version__
from gateway.config import UpstreamConfig
from gateway.upstream_keys import ResolvedKey
from gateway.upstreams.base import Upstream, UpstreamFailure, UpstreamReply
from gateway.upstreams.rate_headers import parse_rate_headers

_CONNECT_ERRORS = (aiohttp.ClientConnectorError, aiohttp.ClientOSError, aiohttp.ServerDisconnectedError)


class _AiohttpReply(UpstreamReply):
    def __init__(self, resp: aiohttp.ClientResponse, first: bytes, idle_s: float, pooled: bool = False) -> None:
        self._resp = resp
        self._first = first
        self._idle_s = idle_s
        self._closed = False
        self.status = resp.status
        self.retry_after = resp.headers.get("Retry-After")
        self.content_type = resp.headers.get("Content-Type", "")
        if pooled:  # the provider's view of the key's quota corrects the pool's count
            self.rate = parse_rate_headers(resp.headers.get)

    async def read(self) -> bytes:
        try:
            rest = await self._resp.read()
        except (TimeoutError, aiohttp.ServerTimeoutError):
            raise UpstreamFailure("total_timeout", "upstream did not finish its answer in time") from None
        except (aiohttp.ClientPayloadError, *_CONNECT_ERRORS) as exc:
            raise UpstreamFailure("cut", f"upstream connection broke while sending the body: {exc}") from None
        return self._first + rest if self._first else rest

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._first:
            yield self._first
            self._first = b""
        content = self._resp.content
        try:
            while True:
                chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        except aiohttp.ServerTimeoutError:
            raise UpstreamFailure(
                "idle_timeout", f"upstream sent nothing for {self._idle_s:g} s in the middle of a stream"
            ) from None
        except TimeoutError:
            raise UpstreamFailure("total_timeout", "upstream stream exceeded its total time limit") from None
        except (aiohttp.ClientPayloadError, *_CONNECT_ERRORS) as exc:
            raise UpstreamFailure("cut", f"upstream stream was cut: {exc}") from None

    async def aclose(self, *, abort: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        if abort or not self._resp.content.at_eof():
            self._resp.close()  # drops the connection: the upstream sees the cancel at once
        else:
            self._resp.release()


class OpenAICompatUpstream(Upstream):
    """chat/completions over HTTP with keep-alive and explicit timeouts."""

    def __init__(
        self, name: str, config: UpstreamConfig, api_key: str | None, pool: list[ResolvedKey] | None = None
    ) -> None:
        self.name = name
        self.config = config
        self.reasoning_field = config.reasoning_field
        self.tool_call_markers = config.tool_call_markers
        self.url = URL(f"{config.base_url}/chat/completions")  # parsed once, not per request
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": f"kimi-gateway/{__version__}",
            **config.headers,
        }
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers = headers
        # a key pool: the Authorization header of each key, by label, sent per request
        self._key_headers = {k.label: {"Authorization": f"Bearer {k.secret}"} for k in pool or ()}
        t = config.timeouts
        # A non-stream answer arrives whole after the model finished: only total bounds it.
        self._timeout_whole = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s)
        self._timeout_stream = aiohttp.ClientTimeout(total=t.total_s, sock_connect=t.connect_s, sock_read=t.idle_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections, keepalive_timeout=self.config.keepalive_s, ttl_dns_cache=300
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            # no skip_auto_headers: it takes aiohttp's slow path on every request, and the explicit
            # Accept-Encoding and User-Agent above already win over its automatic ones
            read_bufsize=1 << 16,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _post(
        self,
        session: aiohttp.ClientSession,
        body: bytes,
        limits: aiohttp.ClientTimeout,
        headers: dict[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """POST once; again once if a pooled keep-alive connection turned out to be closed already.

        A server may close an idle connection just as the pool hands it out; the request then never
        reached it, and a second try on a fresh connection is safe.
        """
        try:
            return await session.post(self.url, data=body, timeout=limits, headers=headers)
        except aiohttp.ServerDisconnectedError:
            return await session.post(self.url, data=body, timeout=limits, headers=headers)

    def _timed_out(self, exc: TimeoutError, stream: bool) -> UpstreamFailure:
        """The failure naming the limit that fired: several run at once while the answer starts (the
        connect limit, the silence limit between reads, the first-byte limit of a stream, the total)."""
        t = self.config.timeouts
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return UpstreamFailure(
                "connect", f"could not connect to upstream '{self.name}' within {t.connect_s:g} s (timeouts.connect_s)"
            )
        if isinstance(exc, aiohttp.SocketTimeoutError):  # sock_read: only streams set it
            return UpstreamFailure(
                "first_byte_timeout",
                f"upstream '{self.name}' sent nothing for {t.idle_s:g} s (timeouts.idle_s) before its first byte",
            )
        if stream and t.first_byte_s <= t.total_s:
            return UpstreamFailure(
                "first_byte_timeout",
                f"upstream '{self.name}' sent no first byte within {t.first_byte_s:g} s (timeouts.first_byte_s)",
            )
        return UpstreamFailure(
            "total_timeout", f"upstream '{self.name}' did not answer within {t.total_s:g} s (timeouts.total_s)"
        )

    async def send(self, body: bytes, *, stream: bool, key: str | None = None) -> UpstreamReply:
        session = self._session
        if session is None:
            raise UpstreamFailure("connect", f"upstream '{self.name}' is not started")
        t = self.config.timeouts
        headers = self._key_headers[key] if key is not None else None
        resp: aiohttp.ClientResponse | None = None
        try:
            if not stream:
                resp = await self._post(session, body, self._timeout_whole, headers)
                return _AiohttpReply(resp, b"", t.idle_s, headers is not None)
            async with asyncio.timeout(t.first_byte_s):
                resp = await self._post(session, body, self._timeout_stream, headers)
                first = b"" if resp.status >= 400 else await resp.content.readany()
            return _AiohttpReply(resp, first, t.idle_s, headers is not None)
        except TimeoutError as exc:
            if resp is not None:
                resp.close()
            raise self._timed_out(exc, stream) from None
        except _CONNECT_ERRORS as exc:
            if resp is not None:
                resp.close()
            raise UpstreamFailure("connect", f"could not reach upstream '{self.name}': {exc}") from None
        except aiohttp.ClientPayloadError as exc:
            if resp is not None:
                resp.close()
            raise UpstreamFailure("cut", f"upstream '{self.name}' cut the response: {exc}") from None
        except aiohttp.ClientError as exc:
            if resp is not None:
                resp.close()
            raise UpstreamFailure("protocol", f"upstream '{self.name}' answered unreadably: {exc}") from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
