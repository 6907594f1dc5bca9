"""The gateway's own configuration file (``config/*.yaml``) as typed, validated settings.

Only shapes live here; the policies that name tenants live in ``gateway/policy``. Secrets never sit
in YAML: an upstream names the environment variable (or file) that holds its key, and a key given
inline is refused with a message that says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gateway.config_state import StateConfig
from gateway.dburl import SqliteURL, parse_database_url
from gateway.upstream_keys import KeySelection, PoolKey, ResolvedKey, check_pool, resolve_pool, resolve_single
from gateway.yamlfile import ConfigError, YamlDoc, load_model

SECRET_KEYS = ("api_key", "apikey", "key", "token", "password", "secret", "authorization")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 4000


class ShutdownConfig(_Strict):
    """What the gateway does on SIGTERM (README "Deploy on Kubernetes").

    For ``drain_s`` seconds it keeps serving everything but answers ``/readyz`` with 503, so a load
    balancer that polls readiness stops sending new requests; then it stops accepting connections
    and gives the requests in flight (streams included) up to ``grace_s`` seconds to finish before
    they are cancelled (and settled as such). A second SIGTERM skips what is left of the drain."""

    drain_s: Annotated[float, Field(ge=0, le=3600)] = 0.0
    grace_s: Annotated[int, Field(gt=0, le=86400)] | None = None  # None: wait for every request


class Timeouts(_Strict):
    """Upstream timeouts in seconds.

    ``first_byte_s`` bounds the wait for a stream's first byte (K2 Thinking starts reasoning fast, so
    a silent upstream is a sick one); a non-stream answer arrives whole and is bounded by ``total_s``.
    """

    connect_s: Annotated[float, Field(gt=0)] = 5.0
    first_byte_s: Annotated[float, Field(gt=0)] = 60.0
    idle_s: Annotated[float, Field(gt=0)] = 120.0
    total_s: Annotated[float, Field(gt=0)] = 900.0

    @model_validator(mode="after")
    def _ordered(self) -> Timeouts:
        if self.first_byte_s > self.total_s:
            raise ValueError(f"first_byte_s ({self.first_byte_s}) must not exceed total_s ({self.total_s})")
        return self


def _model_map(value: Any) -> Any:
    """``models`` may list names (served under the same id) or map local names to upstream ids."""
    if isinstance(value, list):
        if not all(isinstance(v, str) for v in value):
            return value  # let pydantic name the bad item
        return {v: v for v in value}
    return value


class Prior(_Strict):
    """What the router assumes of an upstream model before live traffic taught it anything."""

    ttft_ms: Annotated[float, Field(gt=0)] = 1500.0
    tokens_per_s: Annotated[float, Field(gt=0)] = 40.0
    # prompt tokens processed per second on a cache miss: a long uncached prompt delays the first token
    prefill_tokens_per_s: Annotated[float, Field(gt=0)] = 5000.0


class ModelShaping(_Strict):
    """What one upstream model accepts, so the gateway adapts requests before sending them.

    ``temperature``: the range values are clamped into (Moonshot: [0, 1]). ``thinking``: the form this
    model takes for reasoning controls (``none``: K2 Thinking, always reasons, both fields removed;
    ``type``: K2.5/K2.6 ``thinking: {type: enabled|disabled}``; ``effort``: K3 ``reasoning_effort``).
    ``default_max_tokens``: a thinking model gets the tenant's default when the client sent none.
    ``tool_choice_required``: ``emulate`` (drop it, append a user message asking for a tool) or
    ``reject`` (400 before any upstream call); ``pass`` forwards it.
    """

    temperature: tuple[float, float] | None = None
    thinking: Literal["none", "type", "effort"] | None = None
    default_max_tokens: bool = False
    tool_choice_required: Literal["pass", "emulate", "reject"] = "pass"

    @field_validator("temperature")
    @classmethod
    def _range(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError(f"temperature range must be [low, high] with 0 <= low <= high, got {list(v)}")
        return v


class UpstreamConfig(_Strict):
    kind: Literal["openai", "simulated", "litellm"]
    models: Annotated[dict[str, str], Field(min_length=1)]
    base_url: str | None = None
    api_key_env: str | None = None
    api_key_file: str | None = None
    # a pool of provider keys (gateway/upstream_keys.py), and how a request picks one of them
    api_keys: list[PoolKey] | None = None
    key_selection: KeySelection = "cache_aware"
    # a key that answered 429 without Retry-After rests this long (doubling while it keeps answering 429)
    key_backoff_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    headers: dict[str, str] = Field(default_factory=dict)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    max_connections: Annotated[int, Field(ge=1, le=100_000)] = 512
    # idle pooled connections live this long; a connection the upstream closed first is retried once
    keepalive_s: Annotated[float, Field(gt=0)] = 15.0
    reasoning_field: Literal["reasoning_content", "reasoning"] = "reasoning_content"
    # what an assistant tool-call message must carry when neither the client nor the gateway has its
    # reasoning: required (Moonshot's K2 Thinking: a placeholder, or a 400 for when_missing: reject
    # tenants) or optional (vLLM: sent without); unset: optional for a vLLM-shaped upstream
    tool_reasoning: Literal["required", "optional"] | None = None
    # the upstream returns reasoning inside content, ended by </think> (vLLM without --reasoning-parser):
    # tenants that strip or redact reasoning have it split out of the content
    think_in_content: bool = False
    # raw K2 tool-call markers arrive inside content (vLLM without --tool-call-parser): parse them
    tool_call_markers: bool = False
    # simulated upstreams
    profile: str | None = None
    ttft_ms: Annotated[float, Field(ge=0)] | None = None
    tokens_per_s: Annotated[float, Field(ge=0)] | None = None
    tool_rounds: Annotated[int, Field(ge=1, le=1000)] | None = None  # tool-call rounds before a text answer
    # routing: speeds assumed before live traffic (simulated: the profile's), the provider's prompt
    # cache lifetime (prefix affinity lasts this long), per-model request shaping
    prior: Prior | None = None
    cache_ttl_s: Annotated[float, Field(gt=0, le=86400)] = 300.0
    shaping: dict[str, ModelShaping] = Field(default_factory=dict)
    # a self-hosted vLLM: scrape <base_url without /v1>/metrics for queue depth and KV-cache usage
    vllm_metrics: bool = False
    metrics_interval_s: Annotated[float, Field(ge=0.2, le=300)] = 2.0

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in SECRET_KEYS:
                if key in data:
                    raise ValueError(
                        f"'{key}' holds a secret, and secrets never go in YAML: name the environment "
                        "variable that holds it with api_key_env (or a file with api_key_file)"
                    )
            if "models" in data:
                data = {**data, "models": _model_map(data["models"])}
        return data

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None and not (v.startswith("http://") or v.startswith("https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {v!r}")
        return v.rstrip("/") if v else v

    @field_validator("headers")
    @classmethod
    def _no_secret_headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if name.lower() in ("authorization", "x-api-key", "api-key"):
                raise ValueError(f"header '{name}' carries a secret; use api_key_env or api_key_file")
        return v

    def _simulator_keys(self) -> bool:
        return bool(
            self.profile or self.ttft_ms is not None or self.tokens_per_s is not None or self.tool_rounds is not None
        )

    @model_validator(mode="after")
    def _kind_fields(self) -> UpstreamConfig:
        if self.kind == "openai":
            if not self.base_url:
                raise ValueError("an upstream of kind 'openai' needs base_url")
            if self._simulator_keys():
                raise ValueError("profile, ttft_ms, tokens_per_s and tool_rounds are for kind 'simulated' only")
        if self.kind == "litellm" and self._simulator_keys():
            raise ValueError("profile, ttft_ms, tokens_per_s and tool_rounds are for kind 'simulated' only")
        if self.kind == "simulated" and (self.base_url or self.api_key_env or self.api_key_file):
            raise ValueError("an upstream of kind 'simulated' runs in-process: no base_url or key")
        if self.api_key_env and self.api_key_file:
            raise ValueError("give api_key_env or api_key_file, not both")
        if self.api_keys is not None:
            if self.kind != "openai":
                raise ValueError("api_keys (a key pool) is for kind 'openai' only")
            if not self.api_keys:
                raise ValueError("api_keys lists no key; remove it or name at least one")
            check_pool(self.api_keys, bool(self.api_key_env or self.api_key_file))
        if self.vllm_metrics and self.kind != "openai":
            raise ValueError("vllm_metrics scrapes a server over HTTP: only for kind 'openai'")
        unknown = sorted(set(self.shaping) - set(self.models))
        if unknown:
            raise ValueError(f"shaping names model(s) this upstream does not list: {', '.join(unknown)}")
        return self


class LedgerConfig(_Strict):
    """Where the ledger lives: ``sqlite:///path`` (relative paths are relative to the config file) or
    ``postgresql://...`` for several replicas."""

    url: str = "sqlite:///../data/ledger.db"
    # 512: a full batch is whole multi-row INSERTs on SQLite (statements of up to 64 rows)
    batch_size: Annotated[int, Field(ge=1, le=10_000)] = 512
    # rows are visible to reports this long after a request at most; longer batches cost less per row
    flush_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.2
    # the crash journal (README, "Ledger"): every request's row survives kill -9; off = rows in flight
    # and rows waiting for the batch writer are lost when the process dies
    journal: bool = True
    # where each process keeps its journal files; default: beside a SQLite ledger (<file>.journal.d),
    # ../data/journal for PostgreSQL; relative paths are relative to the config file. Local disk only.
    journal_dir: str | None = None
    # the journal is fsynced this often: on a power loss (not a process crash) at most this much of
    # the latest traffic can be lost
    journal_fsync_ms: Annotated[int, Field(ge=1, le=60_000)] = 100

    @field_validator("url")
    @classmethod
    def _parses(cls, v: str) -> str:
        """The stores' own parser: ``config check`` refuses what the ledger would refuse at start-up."""
        parse_database_url(v, label="ledger URL")
        return v


class RoutingConfig(_Strict):
    """How the router learns and protects: EWMA weight, circuit breaker, policy reload interval."""

    ewma_alpha: Annotated[float, Field(gt=0, le=1)] = 0.3
    # consecutive failures (connect, 5xx, 429, first-byte timeout) that open an upstream model's breaker
    breaker_failures: Annotated[int, Field(ge=1, le=1000)] = 3
    breaker_cooldown_s: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # a candidate whose upstream answered 404 for the model is skipped this long, then probed again
    # (the wait doubles at each further 404, up to an hour)
    retired_probe_s: Annotated[float, Field(gt=0, le=3600)] = 60.0
    # how often the server looks at the policy files' modification times (0 = never reload)
    policy_reload_s: Annotated[float, Field(ge=0, le=3600)] = 1.0


class ResponsesConfig(_Strict):
    """The Responses API: the environment variable whose value (a long random secret) derives the key
    that seals reasoning into ``encrypted_content``; unset or empty, a random key is kept in the
    shared state instead (gateway/responses/seal.py)."""

    seal_key_env: str = "KIMI_GATEWAY_SEAL_KEY"


class GatewayConfig(_Strict):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    max_body_bytes: Annotated[int, Field(ge=1024)] = 8 * 1024 * 1024
    policies_dir: str = "../policies"
    # file names inside policies_dir to load; all *.yaml when absent (lets configs share one folder)
    policy_files: list[str] | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # one JSON line per request on stderr at info (gateway/access_log.py); no prompt, no secret
    access_log: bool = True
    shutdown: ShutdownConfig = Field(default_factory=ShutdownConfig)
    prices: str = "prices.yaml"
    ledger: LedgerConfig = Field(default_factory=LedgerConfig)
    state: StateConfig = Field(default_factory=StateConfig)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    # the environment variable holding the admin key (finance: every tenant's spend); unset = no admin
    admin_key_env: str = "KIMI_GATEWAY_ADMIN_KEY"
    responses: ResponsesConfig = Field(default_factory=ResponsesConfig)
    upstreams: Annotated[dict[str, UpstreamConfig], Field(min_length=1)]

    @field_validator("upstreams")
    @classmethod
    def _names(cls, v: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
        for name in v:
            if "/" in name or not name:
                raise ValueError(f"upstream name {name!r} must be non-empty and contain no '/'")
        return v


class LoadedConfig:
    """A validated config plus what it resolved: its file, the policy folder, upstream keys (one per
    upstream in ``api_keys``, a pool's in ``key_pools``)."""

    def __init__(
        self,
        path: Path,
        settings: GatewayConfig,
        api_keys: dict[str, str | None],
        doc: YamlDoc,
        key_pools: dict[str, list[ResolvedKey]] | None = None,
    ) -> None:
        self.path = path
        self.settings = settings
        self.api_keys = api_keys
        self.doc = doc
        self.key_pools: dict[str, list[ResolvedKey]] = key_pools or {}

    @property
    def policies_dir(self) -> Path:
        return (self.path.parent / self.settings.policies_dir).resolve()

    @property
    def prices_path(self) -> Path:
        return (self.path.parent / self.settings.prices).resolve()

    @property
    def journal_dir(self) -> Path | None:
        """Where this gateway's processes keep the ledger journal, or None without one (turned off,
        or an in-memory ledger, which nothing survives anyway)."""
        ledger = self.settings.ledger
        url = self.ledger_url
        if not ledger.journal or url == "sqlite:///:memory:":
            return None
        if ledger.journal_dir is not None:
            return (self.path.parent / ledger.journal_dir).resolve()
        parsed = parse_database_url(url, label="ledger URL")
        if isinstance(parsed, SqliteURL):
            return Path(parsed.path + ".journal.d").resolve()
        return (self.path.parent / "../data/journal").resolve()

    @property
    def ledger_url(self) -> str:
        """The ledger URL with a relative SQLite path made relative to the config file."""
        url = self.settings.ledger.url
        if url.startswith("sqlite:///") and not url.startswith("sqlite:////") and url != "sqlite:///:memory:":
            return "sqlite:///" + str((self.path.parent / url.removeprefix("sqlite:///")).resolve())
        return url


def _state_problems(doc: YamlDoc, state: StateConfig, environ: dict[str, str], resolve_keys: bool) -> list[str]:
    """What only the environment and the file system can tell about ``state:``: secrets that are
    not set, TLS files that cannot be read (found now, not at the first request)."""
    problems: list[str] = []
    if resolve_keys:
        for field, what in (("password_env", "Redis"), ("sentinel_password_env", "sentinels'")):
            name = getattr(state, field)
            if name and not environ.get(name):
                message = f"environment variable {name} is not set (it must hold the {what} password)"
                problems.append(doc.problem(("state", field), message))
    if state.tls is not None:
        for field in ("ca_file", "cert_file", "key_file"):
            value = getattr(state.tls, field)
            path = (doc.path.parent / value).resolve() if value is not None else None
            if path is not None and not path.is_file():
                problems.append(doc.problem(("state", "tls", field), f"no such file: {path}"))
    return problems


UpstreamCheck = Callable[[YamlDoc, str, UpstreamConfig], list[str]]
"""Problems (``file:line`` messages) only an upstream's adapter can see, for one named upstream."""


def load_config(
    path: str | os.PathLike[str],
    env: dict[str, str] | None = None,
    *,
    resolve_keys: bool = True,
    check_upstream: UpstreamCheck | None = None,
) -> LoadedConfig:
    """Load and validate a gateway config; raises :class:`ConfigError` listing every problem.

    ``resolve_keys=False`` skips reading upstream keys (tools that only read the ledger need none).

    This module checks what it can see: shapes, keys, files. Some keys mean something only to an
    upstream's adapter (a simulated upstream's ``profile`` names one of the simulator's profiles),
    and the adapters sit a layer above the config, so this module cannot ask them. The caller
    brings that knowledge as ``check_upstream``, run on every upstream with the rest, so its
    problems still carry ``file:line`` and come in the same list. Entry points load through
    :func:`gateway.upstreams.factory.load_checked_config`, which passes the adapters' check.
    """
    file = Path(path)
    doc, settings = load_model(file, GatewayConfig)
    environ = dict(os.environ) if env is None else env
    problems: list[str] = []
    keys: dict[str, str | None] = {}
    pools: dict[str, list[ResolvedKey]] = {}
    for name, up in settings.upstreams.items():
        if resolve_keys and up.api_keys:
            keys[name] = None
            pools[name], pool_problems = resolve_pool(doc, name, up.api_keys, environ)
            problems.extend(pool_problems)
        elif resolve_keys:
            keys[name], problem = resolve_single(doc, name, up.api_key_env, up.api_key_file, environ)
            if problem:
                problems.append(problem)
        if check_upstream is not None:
            problems.extend(check_upstream(doc, name, up))
    problems.extend(_state_problems(doc, settings.state, environ, resolve_keys))
    loaded = LoadedConfig(file, settings, keys, doc, pools)
    if not loaded.policies_dir.is_dir():
        problems.append(
            doc.problem(("policies_dir",), f"expected a folder of policy files, {loaded.policies_dir} is not one")
        )
    else:
        for i, name in enumerate(settings.policy_files or ()):
            if not (loaded.policies_dir / name).is_file():
                problems.append(doc.problem(("policy_files", i), f"no such file in {loaded.policies_dir}"))
    if problems:
        raise ConfigError(problems)
    return loaded
