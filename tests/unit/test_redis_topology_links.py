"""The request path's link on each Redis form, against servers of the test's own: key-value entries
spread over a cluster's masters, writes that no replica confirms fail like an unreachable Redis
(reads do not), and TLS that needs the client certificate the server asks for."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import RedisCluster

from gateway.state.base import Limit, StateUnavailable
from gateway.state.redis import RedisBudgetState, RedisKeyValueState, connect
from gateway.state.redis_link import RedisSettings
from tests.e2e.redis_helpers import RedisServer
from tests.redis_servers import TLSServer

pytestmark = pytest.mark.redis


async def test_a_cluster_spreads_entries_over_its_masters_and_reads_them_in_one_call(redis_cluster: str) -> None:
    link = connect(RedisSettings(redis_cluster, "kgspread", timeout_s=1.0))
    kv = RedisKeyValueState(link)
    try:
        keys = [f"affinity:acme:{i:04x}" for i in range(24)]
        for i, key in enumerate(keys):
            await kv.put(key, b"v%d" % i, 60)
        assert await kv.get_many([*keys, "affinity:acme:absent"]) == [b"v%d" % i for i in range(24)] + [None]
        client: RedisCluster = link.client
        holders = set()
        for key in keys:
            node = client.get_node_from_key(f"kgspread:kv:{key}")
            assert node is not None
            holders.add(node.port)
        assert len(holders) >= 2  # spread, not pinned to one master
    finally:
        for key in [k async for k in link.client.scan_iter(match="kgspread:*")]:
            await link.client.delete(key)
        await link.close()


@pytest.fixture
def lone_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_writes_no_replica_confirms_fail_as_unavailable_and_reads_still_answer(lone_server: RedisServer) -> None:
    """wait_replicas 1 on a master without replicas: every write batch ends with an unconfirmed WAIT."""
    link = connect(RedisSettings(lone_server.url, "kgwait", timeout_s=0.1, wait_replicas=1))
    budgets = RedisBudgetState(link, 60)
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable, match="0 of 1 replicas confirmed"):
            await budgets.reserve("r1", [Limit("budget:t:tenant:d1", 1000, 3600)], 10)
        assert time.monotonic() - started < link.deadline_s + 0.5  # bounded by the batch deadline
        assert await link.call("GET", "kgwait:absent") is None  # a read-only batch waits for nothing
    finally:
        await link.close()


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSServer]:
    server = TLSServer(tmp_path_factory.mktemp("tls-link")).start()
    try:
        yield server
    finally:
        server.stop()


def tls_settings(server: TLSServer, with_client_cert: bool) -> RedisSettings:
    return RedisSettings(
        server.url,
        server.NAMESPACE,
        password=server.PASSWORD,
        timeout_s=0.5,
        tls_ca_file=str(server.ca),
        tls_cert_file=str(server.cert) if with_client_cert else None,
        tls_key_file=str(server.key) if with_client_cert else None,
    )


async def test_tls_with_the_client_certificate_runs_scripts_as_the_acl_user(tls_server: TLSServer) -> None:
    link = connect(tls_settings(tls_server, with_client_cert=True))
    budgets = RedisBudgetState(link, 60)
    try:
        assert await budgets.reserve("r1", [Limit("budget:t:tenant:d1", 1000, 3600)], 10) is None
        await budgets.settle("r1", 7)
        assert await budgets.used("budget:t:tenant:d1") == 7
        assert await link.call("ACL", "WHOAMI") == b"gw"
    finally:
        await link.close()


async def test_tls_without_the_client_certificate_is_refused_as_unavailable(tls_server: TLSServer) -> None:
    link = connect(tls_settings(tls_server, with_client_cert=False))
    try:
        with pytest.raises(StateUnavailable):
            await link.call("PING")
    finally:
        await link.close()
