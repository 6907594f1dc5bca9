"""redis-py clients for every supported Redis: one server (optionally TLS), Sentinel, Cluster.

Only redis-py's own clients are used (``BlockingConnectionPool``/``SSLConnection`` for one server,
``redis.asyncio.sentinel.Sentinel`` for a monitored master, ``redis.asyncio.RedisCluster`` for a
cluster), so discovery, failover following, ``MOVED``/``ASK`` redirects and TLS are redis-py's well
tested code, not this project's. What this module adds is one set of connection settings for all
of them: the same timeouts, retry, keepalive, health checks, ACL user, password and TLS files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.redisurl import RedisTarget, parse_redis_url


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """Everything needed to reach the deployment's Redis. ``target`` is parsed from ``url`` when not
    given (``url`` then says the topology: ``redis+cluster://``, ``sentinel://``...)."""

    url: str
    namespace: str
    password: str | None = None
    connect_timeout_s: float = 0.25
    timeout_s: float = 0.25
    max_connections: int = 64
    health_check_interval_s: float = 10.0
    target: RedisTarget | None = None
    username: str | None = None
    sentinel_password: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    tls_check_hostname: bool = True
    wait_replicas: int = 0

    @property
    def resolved(self) -> RedisTarget:
        return self.target if self.target is not None else parse_redis_url(self.url)


def retry() -> Retry:
    """A connection that cannot be made is tried once more; a timeout is not retried (Redis is slow
    or hung, and waiting twice would only delay the fail mode)."""
    return Retry(ExponentialBackoff(cap=0.05, base=0.01), retries=1)


def tls_options(settings: RedisSettings) -> dict[str, Any]:
    """redis-py's ``ssl_*`` options: the CA, the client certificate, whether the host name is checked."""
    return {
        "ssl_ca_certs": settings.tls_ca_file,
        "ssl_certfile": settings.tls_cert_file,
        "ssl_keyfile": settings.tls_key_file,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": settings.tls_check_hostname,
    }


def connection_options(settings: RedisSettings, *, timeout_s: float | None = None) -> dict[str, Any]:
    """The options every connection to a data node gets (one server, a master, a cluster node)."""
    target = settings.resolved
    options: dict[str, Any] = {
        "username": settings.username or target.username,
        "password": settings.password,
        "socket_timeout": settings.timeout_s if timeout_s is None else timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "socket_keepalive": True,
        # idle connections are pinged before reuse
        "health_check_interval": settings.health_check_interval_s,
        "retry": retry(),
        "retry_on_error": [RedisConnectionError],
    }
    if target.tls:
        options.update(tls_options(settings))
    return options


def connection_pool(
    settings: RedisSettings, *, max_connections: int | None = None, wait_s: float | None = None
) -> BlockingConnectionPool:
    """The redis-py pool for one server: bounded calls, one retry on a connection error.
    ``max_connections`` and ``wait_s`` (for a free connection) default to the settings' own."""
    target = settings.resolved
    assert target.topology == "single" and target.url is not None
    options = connection_options(settings)
    return BlockingConnectionPool.from_url(
        target.url,
        max_connections=settings.max_connections if max_connections is None else max_connections,
        timeout=settings.timeout_s if wait_s is None else wait_s,
        **options,
    )


def sentinel_master(settings: RedisSettings) -> Redis:
    """A client of the master the sentinels name. Its pool's connections ask the sentinels where the
    master is whenever they connect, and drop themselves when the server they reach answers as a
    replica (``READONLY``): after a failover the next connection goes to the new master."""
    target = settings.resolved
    assert target.topology == "sentinel" and target.master is not None
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": settings.timeout_s,
        "socket_connect_timeout": settings.connect_timeout_s,
        "password": settings.sentinel_password,
    }
    options = connection_options(settings)
    if target.tls:
        sentinel_kwargs.update(ssl=True, **tls_options(settings))
        options["ssl"] = True
    sentinel = Sentinel(list(target.nodes), sentinel_kwargs=sentinel_kwargs, **options)
    return sentinel.master_for(target.master, db=target.db, max_connections=settings.max_connections)


def cluster_client(settings: RedisSettings, *, max_connections: int | None = None) -> RedisCluster:
    """A cluster client that discovers the slots from the start-up nodes and follows redirects and
    failovers (refreshing the slot map on ``MOVED`` and on connection errors)."""
    target = settings.resolved
    assert target.topology == "cluster"
    options = connection_options(settings)
    if target.tls:
        options["ssl"] = True
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
        max_connections=settings.max_connections if max_connections is None else max_connections,
        **options,
    )
