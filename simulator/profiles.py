"""Named behaviour profiles of the simulated upstream.

A profile says which dialect the simulator speaks (Moonshot's API or a self-hosted vLLM), how fast it
answers and what it serves.  Profiles are frozen so one instance can be shared by the engine, the HTTP
server and tests without anyone changing timing under a running simulator; use `profile_from` to derive
a variant (e.g. the demo profile with zero delays for a test).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Dialect = Literal["moonshot", "vllm"]
DIALECTS: tuple[str, ...] = ("moonshot", "vllm")

MOONSHOT_MODELS: tuple[str, ...] = ("kimi-k2-thinking", "kimi-k2-thinking-turbo", "kimi-k2.6", "kimi-k3")
VLLM_MODELS: tuple[str, ...] = ("moonshotai/Kimi-K2-Thinking", "kimi-k2-thinking")

_TUPLE_FIELDS = ("models", "retired", "api_keys")


@dataclass(frozen=True)
class Profile:
    """How one simulated upstream behaves.

    Timing: the first event (or a non-stream body) waits `ttft_s`; after that, each chunk waits
    `chunk_tokens / tokens_per_s` (0 or inf = no delay), so the total time of a reply follows from the
    tokens it generates, as with a real decoder.
    """

    name: str
    dialect: Dialect = "moonshot"
    ttft_s: float = 0.0
    tokens_per_s: float = 0.0
    models: tuple[str, ...] = MOONSHOT_MODELS
    # ids that answer 404 resource_not_found_error (Moonshot retired kimi-k2-thinking* on 2026-05-25);
    # empty by default so the demo can still route to them, set it to test the "dead upstream" path
    retired: tuple[str, ...] = ()
    reasoning_chunks: int = 24
    content_chunks: int = 12
    context_tokens: int = 262_144
    # Moonshot notes: prefixes under 256 prompt tokens are not cached
    cache_min_tokens: int = 256
    cache_ttl_s: float = 300.0
    # vLLM caches whole KV blocks, so its cached_tokens is a multiple of the block size (16)
    cache_block_tokens: int = 1
    # vLLM: requests beyond this many wait in a queue (vllm:num_requests_waiting); 0 = unlimited
    max_concurrency: int = 0
    # vLLM only: False = served without --reasoning-parser/--tool-call-parser (raw <think> and K2 markers)
    parsers: bool = True
    # output budget when the request sets no max_tokens: Moonshot documents a small default (1024),
    # vLLM allows whatever still fits in the context (0 here)
    default_max_tokens: int = 0
    # non-empty: requests must carry "Authorization: Bearer <one of these>" or get 401
    api_keys: tuple[str, ...] = ()
    # KV-cache capacity used to derive vllm:kv_cache_usage_perc from the tokens of running requests
    kv_cache_tokens: int = 2_000_000
    # how many tool-call rounds the model makes before it answers in text: 1 = call tools after a user
    # message, answer after the tool results; 3 = keep calling tools until three rounds came back
    # (agent loops of several steps, driven by frameworks that cannot send the per-request "sim" field)
    tool_rounds: int = 1

    def __post_init__(self) -> None:
        for name in _TUPLE_FIELDS:  # accept lists from YAML/JSON configs, keep the dataclass hashable
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, tuple | list):
                raise ValueError(f"profile field {name!r} must be a list of strings, got {value!r}")
            object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.dialect not in DIALECTS:
            raise ValueError(f"profile {self.name!r}: dialect must be one of {DIALECTS}, got {self.dialect!r}")
        for name in ("ttft_s", "tokens_per_s", "cache_ttl_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value < 0:
                raise ValueError(f"profile {self.name!r}: {name} must be a number >= 0, got {value!r}")
        for name in ("reasoning_chunks", "content_chunks", "cache_min_tokens", "max_concurrency", "default_max_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"profile {self.name!r}: {name} must be an integer >= 0, got {value!r}")
        for name in ("context_tokens", "cache_block_tokens", "kv_cache_tokens", "tool_rounds"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"profile {self.name!r}: {name} must be an integer >= 1, got {value!r}")
        if not self.models:
            raise ValueError(f"profile {self.name!r}: models must not be empty")

    @property
    def seconds_per_token(self) -> float:
        """Decode time of one token; 0 when the profile generates instantly."""
        tps = self.tokens_per_s
        return 0.0 if tps == 0 or math.isinf(tps) else 1.0 / tps

    @property
    def timed(self) -> bool:
        """True when replies of this profile take time (so transports should watch for disconnects)."""
        return self.ttft_s > 0 or self.seconds_per_token > 0 or self.max_concurrency > 0


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        # kimi-k2-thinking on api.moonshot.ai: ~35 tok/s after a noticeable prefill
        Profile("moonshot-standard", ttft_s=0.6, tokens_per_s=35.0, default_max_tokens=1024),
        # kimi-k2-thinking-turbo class speed (60-100 tok/s)
        Profile("moonshot-turbo", ttft_s=0.3, tokens_per_s=90.0, default_max_tokens=1024),
        Profile(
            "vllm",
            dialect="vllm",
            ttft_s=0.2,
            tokens_per_s=50.0,
            models=VLLM_MODELS,
            max_concurrency=32,
            # automatic prefix caching keeps every full KV block: no minimum beyond one block
            cache_block_tokens=16,
            cache_min_tokens=16,
        ),
        # zero delays: the upstream of proxy benchmarks and of most tests
        Profile("instant", default_max_tokens=1024),
    )
}
# a vLLM started without --reasoning-parser / --tool-call-parser: the same server, raw K2 markers
PROFILES["vllm-raw"] = dataclasses.replace(PROFILES["vllm"], name="vllm-raw", parsers=False)


def profile_from(name: str, **overrides: Any) -> Profile:
    """Return the built-in profile `name`, with `overrides` applied (e.g. ``ttft_s=0``).

    Raises ValueError naming the known profiles or fields when `name` or an override is unknown, and
    when an override has an invalid value.
    """
    base = PROFILES.get(name)
    if base is None:
        raise ValueError(f"unknown simulator profile {name!r}; known profiles: {', '.join(sorted(PROFILES))}")
    if not overrides:
        return base
    fields = {f.name for f in dataclasses.fields(Profile)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"unknown profile field(s) {', '.join(map(repr, unknown))}; known fields: {', '.join(sorted(fields))}"
        )
    return dataclasses.replace(base, **overrides)


def profile_with(
    name: str,
    *,
    ttft_ms: float | None = None,
    tokens_per_s: float | None = None,
    tool_rounds: int | None = None,
    max_concurrency: int | None = None,
) -> Profile:
    """:func:`profile_from` with the overrides a command line or a gateway config gives, in their
    units (milliseconds to first token); ``None`` keeps the profile's own value."""
    overrides: dict[str, Any] = {}
    if ttft_ms is not None:
        overrides["ttft_s"] = ttft_ms / 1000
    if tokens_per_s is not None:
        overrides["tokens_per_s"] = tokens_per_s
    if tool_rounds is not None:
        overrides["tool_rounds"] = tool_rounds
    if max_concurrency is not None:
        overrides["max_concurrency"] = max_concurrency
    return profile_from(name, **overrides)
