"""Requests and tokens per minute, per tenant and per key, checked before the budget reservation.

A request is admitted only if every limit that applies to it has room: the tenant's RPM and TPM and
its key's (``rate_limits`` in the policy). Tokens are admitted on what the request could use at most
(a cheap prompt bound plus ``max_tokens``) and corrected to the reported usage when it ends, as
OpenAI does. Counters are sliding windows in the state backend (memory, or Redis shared by every
replica). A refusal is a 429 ``rate_limit_exceeded`` with ``Retry-After``; every answer under a
limit carries OpenAI's ``x-ratelimit-*`` headers so clients can pace themselves.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.observability import RATE_LIMITED
from gateway.policy.model import RateLimits, Rates
from gateway.state.base import RateCount, RateLimit, RateLimitState

log = logging.getLogger("kimi_gateway.ratelimit")

WINDOW_S = 60


@dataclass(slots=True)
class Admission:
    """What a request was admitted with: its counters (to correct tokens later) and its headers."""

    counts: list[RateCount]
    tokens: int
    headers: list[tuple[bytes, bytes]]


def format_reset(seconds: float) -> str:
    """OpenAI's duration style for ``x-ratelimit-reset-*``: ``250ms``, ``12s``, ``1m5s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _headers(counts: list[RateCount]) -> list[tuple[bytes, bytes]]:
    """One set per unit, from the tightest counter (least remaining) of that unit."""
    out: list[tuple[bytes, bytes]] = []
    for unit in ("requests", "tokens"):
        mine = [c for c in counts if c.limit.key.endswith(":rpm" if unit == "requests" else ":tpm")]
        if not mine:
            continue
        tight = min(mine, key=lambda c: c.remaining)
        out += [
            (f"x-ratelimit-limit-{unit}".encode(), str(tight.limit.limit).encode()),
            (f"x-ratelimit-remaining-{unit}".encode(), str(tight.remaining).encode()),
            (f"x-ratelimit-reset-{unit}".encode(), format_reset(tight.reset_s).encode()),
        ]
    return out


class RateLimiter:
    def __init__(self, state: RateLimitState) -> None:
        self.state = state
        # per policy object: key_id (12 hex digits) -> that key's limits, built on first use
        self._key_index: dict[int, tuple[RateLimits, dict[str, Rates]]] = {}

    def _key_rates(self, rules: RateLimits, key_id: str) -> Rates | None:
        cached = self._key_index.get(id(rules))
        if cached is None or cached[0] is not rules:
            if len(self._key_index) > 1024:  # policies reloaded many times: forget the old ones
                self._key_index.clear()
            index = {k.removeprefix("sha256:")[:12]: r for k, r in rules.keys.items() if k != "*"}
            cached = self._key_index[id(rules)] = (rules, index)
        return cached[1].get(key_id) or rules.keys.get("*")

    def limits_for(self, tenant: str, rules: RateLimits, key_id: str, tokens: int) -> list[RateLimit]:
        out: list[RateLimit] = []
        for scope, rates in (
            (f"rate:{tenant}:tenant", rules),
            (f"rate:{tenant}:key={key_id}", self._key_rates(rules, key_id)),
        ):
            if rates is None:
                continue
            if rates.rpm is not None:
                out.append(RateLimit(f"{scope}:rpm", rates.rpm, WINDOW_S, 1))
            if rates.tpm is not None:
                out.append(RateLimit(f"{scope}:tpm", rates.tpm, WINDOW_S, tokens))
        return out

    async def admit(self, tenant: str, rules: RateLimits | None, key_id: str, tokens: int) -> Admission | None:
        """Count the request against every limit that applies, or raise 429 (503 when the state is
        down and rate limits fail closed)."""
        if rules is None:
            return None
        limits = self.limits_for(tenant, rules, key_id, tokens)
        if not limits:
            return None
        admitted, counts = await self.state.hit(limits, time.time())
        if not admitted:
            raise _refusal(tenant, key_id, counts)
        return Admission(counts, tokens, _headers(counts))

    async def correct(self, admission: Admission | None, actual_tokens: int) -> None:
        """Replace the admitted token bound by what the request really used (never fails a request)."""
        if admission is None:
            return
        delta = actual_tokens - admission.tokens
        if delta == 0:
            return
        for count in admission.counts:
            if count.limit.key.endswith(":tpm"):
                try:
                    await self.state.adjust(count.limit.key, count.limit.window_s, count.window, delta)
                except Exception:
                    log.exception("token rate correction failed for %s", count.limit.key)


def _count_refusal(tenant: str, count: RateCount, unit: str) -> None:
    """Refusals by tenant, scope and unit: the key id stays out of the labels (keys are many)."""
    RATE_LIMITED.labels(tenant, "key" if ":key=" in count.limit.key else "tenant", unit).inc()


def _whose(tenant: str, key_id: str, count: RateCount) -> str:
    return f"key {key_id} of tenant '{tenant}'" if ":key=" in count.limit.key else f"tenant '{tenant}'"


def _refusal(tenant: str, key_id: str, counts: list[RateCount]) -> GatewayError:
    over = [c for c in counts if c.used + c.limit.amount > c.limit.limit]
    waits = [c.wait_s(c.limit.amount) for c in over]
    worst = over[0]
    unit = "requests" if worst.limit.key.endswith(":rpm") else "tokens"
    who = _whose(tenant, key_id, worst)
    short = "RPM" if unit == "requests" else "TPM"
    headers = _headers(counts)
    if any(w is None for w in waits):
        never = next(c for c, w in zip(over, waits, strict=True) if w is None)
        _count_refusal(tenant, never, "tokens")
        return GatewayError(
            429,
            f"Request too large for {_whose(tenant, key_id, never)} on tokens per min (TPM): Limit "
            f"{never.limit.limit}, Requested "
            f"{never.limit.amount} (the prompt bound plus max_tokens). Lower max_tokens or shorten the prompt.",
            type="tokens",
            code="rate_limit_exceeded",
            headers=[*headers, (b"x-should-retry", b"false")],
        )
    _count_refusal(tenant, worst, unit)
    wait = max(w for w in waits if w is not None)
    retry = max(1, math.ceil(wait))
    return GatewayError(
        429,
        f"Rate limit reached for {who} on {unit} per min ({short}): Limit {worst.limit.limit}, Used "
        f"{math.ceil(worst.used)}, Requested {worst.limit.amount}. Please try again in {format_reset(wait)}.",
        type=unit,
        code="rate_limit_exceeded",
        headers=[
            *headers,
            (b"retry-after", str(retry).encode()),
            (b"retry-after-ms", str(math.ceil(wait * 1000)).encode()),
        ],
    )
