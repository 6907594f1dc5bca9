"""The pipelined Redis connection, against a redis-server of the test's own: concurrent calls get
their own replies, one error reply fails only its call, scripts come back after the script cache is
emptied, and a restarted server is reconnected to on the next call."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from gateway.state.base import StateUnavailable
from gateway.state.redis import connect
from gateway.state.redis_link import RedisSettings, pack, script
from tests.e2e.redis_helpers import RedisServer

pytestmark = pytest.mark.redis

# how long a test waits, beyond the link's own deadline, for a call that must end: generous, since
# it bounds only a failing run's time (CI load can stretch a 0.5 s deadline, never to this)
MARGIN_S = 15.0


def test_pack_matches_redis_py() -> None:
    from redis.asyncio.connection import Connection

    commands = [
        ("SET", "k", b"\x00bin\r\n\xff", "PX", 1500),
        ("EVALSHA", "ab12", 2, "ns:é", "x", -7, 12345678901234567),
    ]
    assert pack(commands) == b"".join(Connection().pack_commands(commands))


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.stop()


async def test_concurrent_calls_get_their_own_replies(server: RedisServer) -> None:
    link = connect(RedisSettings(server.url, "t"))
    try:
        await asyncio.gather(*(link.call("SET", f"k{i}", i) for i in range(300)))
        values = await asyncio.gather(*(link.call("GET", f"k{i}") for i in range(300)))
        assert values == [str(i).encode() for i in range(300)]
        await link.call("SET", "text", "x")
        out = await asyncio.gather(
            link.call("GET", "k1"), link.call("INCR", "text"), link.call("GET", "k2"), return_exceptions=True
        )
        assert out[0] == b"1" and isinstance(out[1], ResponseError) and out[2] == b"2"
    finally:
        await link.close()


async def test_scripts_are_loaded_again_when_the_cache_is_empty(server: RedisServer) -> None:
    link = connect(RedisSettings(server.url, "t"))
    try:
        echo = script("return ARGV[1]")
        assert await link.run(echo, [], ["a"]) == b"a"
        await link.call("SCRIPT", "FLUSH")  # what a restart does
        assert await link.run(echo, [], ["b"]) == b"b"
    finally:
        await link.close()


async def test_a_restarted_server_is_reconnected_to(server: RedisServer) -> None:
    link = connect(RedisSettings(server.url, "t", None, 0.2, 0.2))
    try:
        assert await link.call("PING") == b"PONG"
        server.stop()
        with pytest.raises(StateUnavailable):
            await link.call("PING")
        server.start()
        assert await link.call("PING") == b"PONG"
    finally:
        await link.close()


async def test_key_value_state_skips_a_hung_redis_after_one_deadline(server: RedisServer) -> None:
    """A hung Redis (stopped process: connections accepted, never answered) costs one deadline; later
    reads are misses without asking Redis until the cool-down ends, then Redis is asked again.

    Checked by behaviour, not by wall time, so that a loaded machine cannot fail it: the hung calls
    must end (a stopped Redis never answers, so without the link's deadline they would wait for as
    long as it stays stopped; ``MARGIN_S`` is only a bound on how long the test waits for that), and
    reads in the cool-down must not reach the link at all."""
    import signal

    import redis

    from gateway.state.redis import RedisKeyValueState

    link = connect(RedisSettings(server.url, "t", None, 0.1, 0.1))
    kv = RedisKeyValueState(link, cooldown_s=1.0)
    asked: list[str] = []
    call = link.call

    async def counted(*args: object) -> object:
        asked.append(str(args[0]))
        return await call(*args)

    link.call = counted  # type: ignore[method-assign]
    direct = redis.Redis.from_url(server.url, socket_timeout=10)
    try:
        direct.set("t:kv:a", b"1")  # not through the link: its 0.1 s timeouts are for the hung part
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(StateUnavailable):  # the link gives up on its own
                await asyncio.wait_for(link.call("PING"), link.deadline_s + MARGIN_S)
            asked.clear()
            assert await asyncio.wait_for(kv.get("a"), link.deadline_s + MARGIN_S) is None
            assert asked == ["GET"]  # Redis was asked once and the read became a miss
            assert await kv.get_many(["a", "b"]) == [None, None]
            assert await kv.get("a") is None
            assert asked == ["GET"]  # in the cool-down: misses without a call
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # after the cool-down Redis is asked again; under load one answer may still miss the 0.1 s
        # timeouts (and start another cool-down), so try until a bound that load cannot reach
        deadline = asyncio.get_running_loop().time() + MARGIN_S
        while await kv.get("a") != b"1":
            assert asyncio.get_running_loop().time() < deadline, "Redis was not asked again after the cool-down"
            await asyncio.sleep(0.2)
        assert asked.count("GET") >= 2
    finally:
        direct.close()
        await link.close()
