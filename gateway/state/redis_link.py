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

With ``wait_replicas`` (Sentinel, or a master with replicas), a batch that writes ends with
``WAIT n``: its calls succeed only once ``n`` replicas hold their writes, so a failover to one of them
cannot lose a reservation or a settlement; unconfirmed, they fail like an unreachable Redis. One
``WAIT`` covers the whole batch, so under load its cost is shared by many requests.

The pool (``client``) stays for everything that is not on the request path (start-up ping, tests).
The same link talks to one server, to the master Sentinel names (the pipelined connection is
redis-py's ``SentinelManagedConnection``: it asks the sentinels where the master is on every
connect), and through :mod:`gateway.state.redis_cluster` to a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ClusterDownError, NoScriptError, ReadOnlyError, RedisError, ResponseError, TryAgainError

from gateway.state.base import StateUnavailable
from gateway.state.redis_connect import RedisSettings, connection_pool, sentinel_master

__all__ = ["Batcher", "RedisLink", "RedisSettings", "Script", "connection_pool", "pack", "script"]

# commands that change nothing: a batch of only these needs no WAIT, and an unconfirmed WAIT does
# not fail them
READS = frozenset({"GET", "MGET", "PING", "PTTL", "TTL", "EXISTS"})
# error replies that say "not now" rather than "wrong call": a replica answering (after a failover),
# a cluster without a master for the slot, a slot being moved
UNAVAILABLE_REPLIES = (ReadOnlyError, ClusterDownError, TryAgainError)


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


Batch = list[tuple[tuple[Any, ...], "asyncio.Future[Any]"]]


class Batcher(ABC):
    """Auto-pipelining: calls that arrive while a batch is on the wire go out together as the next.
    Subclasses say how a batch is sent (:meth:`_send`, which resolves every future of the batch)."""

    settings: RedisSettings
    client: Any
    cluster = False  # a multi-key command (MGET) must stay within one slot

    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        # connect (tried twice) + write + read, with the retry's backoff: no batch takes longer
        self.deadline_s = 2 * settings.connect_timeout_s + 2 * settings.timeout_s + 0.1
        self._queue: Batch = []
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
        """Run a script by SHA; when the server does not know it (restarted, or a cluster node that
        never ran it) send its source once with EVAL, which also caches it there."""
        try:
            return await self.call("EVALSHA", s.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.call("EVAL", s.source, len(keys), *keys, *args)

    async def _flush(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._send(batch)
        finally:
            self._flushing = False

    @abstractmethod
    async def _send(self, batch: Batch) -> None:
        """Send ``batch`` and resolve every one of its futures, within ``deadline_s``."""

    async def close(self) -> None:
        await self.client.aclose()


def resolve(batch: Batch, replies: list[Any], unconfirmed: StateUnavailable | None = None) -> None:
    """Hand each call its reply: a value, its own error reply, or StateUnavailable (a "not now"
    reply, or writes that the replicas did not confirm)."""
    for (args, future), reply in zip(batch, replies, strict=True):
        if future.done():  # its caller gave up (cancelled)
            continue
        if isinstance(reply, BaseException):
            future.set_exception(reply)
        elif unconfirmed is not None and str(args[0]).upper() not in READS:
            future.set_exception(unconfirmed)
        else:
            future.set_result(reply)


def fail(batch: Batch, failure: StateUnavailable) -> None:
    for _, future in batch:
        if not future.done():
            future.set_exception(failure)


def as_unavailable(reply: ResponseError) -> StateUnavailable:
    return StateUnavailable(f"Redis cannot serve this now ({type(reply).__name__}: {reply})", maybe_ran=False)


class RedisLink(Batcher):
    """One per process (one server or Sentinel): the pool, and the pipelined connection the request
    path uses."""

    def __init__(self, settings: RedisSettings) -> None:
        super().__init__(settings)
        if settings.resolved.topology == "sentinel":
            self.client = sentinel_master(settings)
            pool = self.client.connection_pool
        else:
            pool = connection_pool(settings)
            self.client = Redis(connection_pool=pool)
        # no per-read socket timeout on the pipelined connection: each batch has one deadline instead
        # (redis-py would otherwise wrap every write in a task and every read in a timer)
        self._conn: AbstractConnection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self._wait = settings.wait_replicas
        if self._wait:
            self.deadline_s += settings.timeout_s  # the replicas' confirmation

    async def _send(self, batch: Batch) -> None:
        conn = self._conn
        connected = conn.is_connected
        commands = [args for args, _ in batch]
        wait = self._wait and any(str(args[0]).upper() not in READS for args in commands)
        if wait:
            commands.append(("WAIT", self._wait, max(1, int(self.settings.timeout_s * 1000))))
        replies: list[Any] = []
        stale = False
        try:
            async with asyncio.timeout(self.deadline_s):
                if not connected:
                    await conn.connect()
                    connected = True
                await conn.send_packed_command(pack(commands))
                for _ in batch:
                    try:
                        reply = await conn.read_response()
                    except UNAVAILABLE_REPLIES as exc:
                        reply, stale = as_unavailable(exc), True
                    except ResponseError as exc:  # an error reply: this call's, the others go on
                        reply = exc
                    replies.append(reply)
                acked = int(await conn.read_response()) if wait else self._wait
        except (RedisError, OSError, TimeoutError) as exc:
            await conn.disconnect(nowait=True)  # replies may be out of step: start afresh next batch
            fail(batch, StateUnavailable(f"Redis did not answer ({type(exc).__name__}: {exc})", maybe_ran=connected))
            return
        except BaseException:
            await conn.disconnect(nowait=True)
            fail(batch, StateUnavailable("the Redis batch was interrupted"))
            raise
        unconfirmed = None
        if acked < self._wait:
            unconfirmed = StateUnavailable(f"only {acked} of {self._wait} replicas confirmed the writes in time")
            # a master that lost its replicas may be the old one after a failover (it accepts writes
            # until a sentinel demotes it): the next batch asks the sentinels again
            stale = True
        if stale:  # talking to a replica or a node without its slots: find the master again
            await conn.disconnect(nowait=True)
        resolve(batch, replies, unconfirmed)

    async def close(self) -> None:
        await self._conn.disconnect()
        await self.client.aclose()
