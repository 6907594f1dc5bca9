"""The ``state:`` section of the gateway config: memory, or Redis as one server, a Cluster or Sentinel,
over TLS when asked. Its own module because the Redis forms need a dozen fields and their checks;
``gateway.config`` re-exports :class:`StateConfig`. Addresses are parsed by :mod:`gateway.redisurl`,
the same parser the state backends use."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.redisurl import RedisTarget, parse_hostports, parse_redis_url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StateFailModes(_Strict):
    """Per concern, what a request gets while Redis does not answer: ``closed`` refuses it with 503,
    ``open`` serves it, counts it in this process and reconciles into Redis afterwards."""

    budgets: Literal["closed", "open"] = "closed"
    rate_limits: Literal["closed", "open"] = "closed"


class StateTLS(_Strict):
    """TLS to Redis (and to the sentinels): the CA that signed the servers' certificates (the system's
    when absent) and, for servers that check clients (``tls-auth-clients yes``), this client's
    certificate and key. Paths are relative to the config file."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    check_hostname: bool = True

    @model_validator(mode="after")
    def _pair(self) -> StateTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (the client certificate and its key)")
        return self


class StateConfig(_Strict):
    """Where budgets, rate limits and the shared key-value entries live: this process's memory, or a
    Redis that every worker and replica of a deployment shares (``namespace`` keeps deployments on
    one Redis apart). The timeouts bound every Redis call: a Redis that does not answer costs a
    request at most about twice their sum before the fail mode applies.

    ``wait_replicas`` makes every batch of writes wait (``WAIT``) until that many replicas hold it, so
    a failover to one of them loses no reservation or spend; a batch they do not confirm within
    ``timeout_s`` fails like an unreachable Redis (the fail modes apply)."""

    backend: Literal["memory", "redis"] = "memory"
    url: str | None = None
    cluster: bool = False
    sentinels: list[str] | None = None
    master: str | None = None
    db: Annotated[int, Field(ge=0, le=15)] = 0
    username: str | None = None
    password_env: str | None = None
    sentinel_password_env: str | None = None
    tls: StateTLS | None = None
    wait_replicas: Annotated[int, Field(ge=0, le=16)] = 0
    namespace: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")] = "kimi-gateway"
    connect_timeout_s: Annotated[float, Field(gt=0, le=10)] = 0.25
    timeout_s: Annotated[float, Field(gt=0, le=10)] = 0.25
    health_check_interval_s: Annotated[float, Field(ge=0)] = 10.0
    fail: StateFailModes = Field(default_factory=StateFailModes)

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v is not None:
            parse_redis_url(v)
        return v

    @field_validator("sentinels")
    @classmethod
    def _sentinels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            if not v:
                raise ValueError("list at least one sentinel (host:port)")
            for item in v:
                parse_hostports(item, 26379, "sentinels")
        return v

    @model_validator(mode="after")
    def _backend_fields(self) -> StateConfig:
        redis_only = self.url or self.password_env or self.sentinels or self.tls or self.cluster or self.username
        if self.backend == "memory" and redis_only:
            raise ValueError("url, sentinels, cluster, tls, username and password_env are for backend 'redis' only")
        if self.backend == "redis":
            if not self.url and not self.sentinels:
                raise ValueError("backend 'redis' needs url (e.g. redis://127.0.0.1:6379/0) or sentinels and master")
            self.target()  # every combination check below
        return self

    def target(self) -> RedisTarget:
        """The Redis to connect to, from ``url`` or ``sentinels``/``master`` and the flags around them;
        ValueError for combinations that contradict each other."""
        if self.sentinels:
            if self.url:
                raise ValueError("give either url or sentinels (with master), not both")
            if not self.master:
                raise ValueError("sentinels need master: the name the sentinels monitor the master under")
            if self.cluster:
                raise ValueError("cluster: true and sentinels exclude each other")
            nodes = tuple(pair for item in self.sentinels for pair in parse_hostports(item, 26379, "sentinels"))
            target = RedisTarget("sentinel", self.tls is not None, nodes=nodes, master=self.master, db=self.db)
        else:
            assert self.url is not None
            if self.master:
                raise ValueError("master goes with sentinels (or in a sentinel:// URL)")
            target = parse_redis_url(self.url, cluster=self.cluster)
            if self.db:
                raise ValueError("db goes with sentinels; in a URL it is the path (redis://host:6379/2)")
            if self.tls is not None and not target.tls:
                raise ValueError(
                    "tls options need a TLS URL: rediss://, rediss+cluster:// or sentinels:// (the s says TLS)"
                )
        if self.username and target.username and self.username != target.username:
            raise ValueError(f"username {self.username!r} and the URL's user {target.username!r} differ")
        if self.sentinel_password_env and target.topology != "sentinel":
            raise ValueError("sentinel_password_env is for Sentinel (sentinel:// or sentinels)")
        if self.wait_replicas and target.topology == "cluster":
            raise ValueError(
                "wait_replicas is for one server or Sentinel; a Redis Cluster's scripts run on the master "
                "of their slot, whose replicas a batch cannot wait for as a whole"
            )
        return target
