"""The process's connection to Redis: every state call of every concurrent request, pipelined.

redis-py spends most of a command's cost in Python around it (taking a pooled connection, retries,
timeouts, response callbacks). bench/redis_link.py (bench/RESULTS.md, "Redis link") runs a request's
four state scripts (rate hit, reserve, settle, adjust) both ways: through a redis.asyncio pool they
cost 255-327 µs of client CPU per request at 64-256 concurrent requests (64-82 µs per call), through
this link 34-36 µs (about 9 µs per call), and a lone request 260 against 108 µs; requests/s were
4.5-5.8 times as high at 64-256 and 1.7 times at 1. A gateway request makes a few state calls, so
the request path sends them through one dedicated connection instead: calls that arrive while a
batch is on the wire wait and go out together as the next batch, written at once and read back in
order (auto-pipelining). Under load a batch carries the calls of many requests; a lone request
still makes one round trip.

Every batch is bounded by a deadline (connect + command timeouts, one reconnect attempt); a batch
that fails fails its calls with :class:`StateUnavailable`, the connection is dropped, and the next
batch connects afresh: a restarted Redis is picked up without any action. Lua scripts run by SHA and
are loaded again when Redis answers NOSCRIPT (after a restart its script cache is empty).

The pool (``client``) stays for everything that is not on the request path (start-up ping, tests).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from gateway.state.base import StateUnavailable


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    namespace: str
    password: str | None = None
    connect_timeout_s: float = 0.25
    timeout_s: float = 0.25
    max_connections: int = 64
    health_check_interval_s: float = 10.0


@dataclass(frozen=True, slots=True)
class Script:
    source: str
    sha: str


def pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP for a batch of commands (bytes, str and int arguments: all the state code sends).

    Kept instead of redis-py's ``Connection.pack_commands`` (byte-identical output, checked by
    ``test_pack_matches_redis_py``) because it costs materially less: on typical state calls (a
    budget EVALSHA of 14 arguments, an affinity MGET, a 600-byte SET) this is 1.8 µs per command
    against 6.9 µs for redis-py 8.2's packer, which encodes every argument through its encoder and
    splits buffers (bench/redis_link.py, bench/RESULTS.md "Redis link"); at ~9 µs of CPU per
    pipelined call under load, the difference would be half as much again."""
    out: list[bytes] = []
    for args in commands:
        out.append(b"*%d\r\n" % len(args))
        for arg in args:
            if isinstance(arg, str):
                arg = arg.encode()
            elif not isinstance(arg, bytes):
                arg = str(arg).encode()
            out.append(b"$%d\r\n%b\r\n" % (len(arg), arg))
    return b"".join(out)


def script(source: str) -> Script:
    return Script(source, hashlib.sha1(source.encode()).hexdigest())


def connection_pool(
    settings: RedisSettings, *, max_connections: int | None = None, wait_s: float | None = None
) -> BlockingConnectionPool:
    """The redis-py pool for ``settings``: bounded calls, one retry on a connection error.
    ``max_connections`` and ``wait_s`` (for a free connection) default to the settings' own."""
    return BlockingConnectionPool.from_url(
        settings.url,
        password=settings.password,
        max_connections=settings.max_connections if max_connections is None else max_connections,
        timeout=settings.timeout_s if wait_s is None else wait_s,
        socket_timeout=settings.timeout_s,
        socket_connect_timeout=settings.connect_timeout_s,
        socket_keepalive=True,
        # idle connections are pinged before reuse
        health_check_interval=settings.health_check_interval_s,
        # a connection that cannot be made is tried once more; a timeout is not retried (Redis is
        # slow or hung, and waiting twice would only delay the fail mode)
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1),
        retry_on_error=[RedisConnectionError],
    )


class RedisLink:
    """One per process: the pool, and the pipelined connection the request path uses."""

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        pool = connection_pool(settings)
        self.client = Redis(connection_pool=pool)
        # no per-read socket timeout on the pipelined connection: each batch has one deadline instead
        # (redis-py would otherwise wrap every write in a task and every read in a timer)
        self._conn: AbstractConnection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        # connect (tried twice) + write + read, with the retry's backoff: no batch takes longer
        self.deadline_s = 2 * settings.connect_timeout_s + 2 * settings.timeout_s + 0.1
        self._queue: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._flushing = False
        self._flusher: asyncio.Task[None] | None = None

    async def call(self, *args: Any) -> Any:
        """Run one command (raw RESP reply: bytes, int, list, None); StateUnavailable on failure."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, future))
        if not self._flushing:
            # nothing on the wire: send this batch from here (no task, no extra loop turn), and hand
            # whatever queued up meanwhile to a flusher task
            self._flushing = True
            batch, self._queue = self._queue, []
            try:
                await self._send(batch)
            finally:
                if self._queue:
                    self._flusher = loop.create_task(self._flush())
                else:
                    self._flushing = False
        # resolved by its batch within the batch's deadline (after at most one batch ahead of it)
        return await future

    async def run(self, s: Script, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.call("EVALSHA", s.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.call("SCRIPT", "LOAD", s.source)
            return await self.call("EVALSHA", s.sha, len(keys), *keys, *args)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._flushing = False

    async def _send(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        conn = self._conn
        connected = conn.is_connected
        answered = 0
        try:
            async with asyncio.timeout(self.deadline_s):
                if not connected:
                    await conn.connect()
                    connected = True
                await conn.send_packed_command(pack([args for args, _ in batch]))
                for _, future in batch:
                    try:
                        reply = await conn.read_response()
                    except ResponseError as exc:  # an error reply: this call's, the others go on
                        reply = exc
                    answered += 1
                    if future.done():  # its caller gave up (cancelled)
                        continue
                    if isinstance(reply, ResponseError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except (RedisError, OSError, TimeoutError) as exc:
            await conn.disconnect(nowait=True)  # replies may be out of step: start afresh next batch
            failure = StateUnavailable(f"Redis did not answer ({type(exc).__name__}: {exc})", maybe_ran=connected)
            for _, future in batch[answered:]:
                if not future.done():
                    future.set_exception(failure)
        except BaseException:
            await conn.disconnect(nowait=True)
            for _, future in batch[answered:]:
                if not future.done():
                    future.set_exception(StateUnavailable("the Redis batch was interrupted"))
            raise

    async def close(self) -> None:
        await self._conn.disconnect()
        await self.client.aclose()


def connect(settings: RedisSettings) -> RedisLink:
    return RedisLink(settings)
