"""Per-key tier limits of the simulated provider: requests and tokens per minute, concurrent requests.

A real provider counts each API key (project, account) on its own over a rolling minute; Moonshot
counts a request's prompt plus its ``max_tokens`` against the tokens per minute. Beyond a limit it
answers 429 with ``Retry-After``; every answer carries ``x-ratelimit-*`` headers with what remains.
A revoked key gets 401. Keys without configured limits are served as before.

Configured in-process (``Simulator.keys.configure``) or over HTTP (``POST /_sim/keys`` with
``{"limits": {"<key>": {"rpm": 3, "tpm": 1000, "max_concurrency": 1}}, "revoked": ["<key>"]}``).
``/_sim/stats`` shows per-key counters under ``keys``, by a short label of the key (never the key).
"""

from __future__ import annotations

__all__ = ["Admission", "KeyCounters", "KeyLimit", "KeyQuotas", "key_label"]

import collections
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from .faults import key_label

WINDOW_S = 60.0


@dataclass(frozen=True)
class KeyLimit:
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    @classmethod
    def parse(cls, value: Any) -> KeyLimit:
        if not isinstance(value, dict) or set(value) - {"rpm", "tpm", "max_concurrency"}:
            raise ValueError(f"a key's limits are an object of rpm, tpm, max_concurrency; got {value!r}")
        for name, number in value.items():
            if number is not None and (not isinstance(number, int) or isinstance(number, bool) or number < 1):
                raise ValueError(f"{name} must be a positive integer or null, got {number!r}")
        return cls(**value)


@dataclass
class KeyCounters:
    """What one key saw: answered, refused for its limits (429), the most in flight at once."""

    requests: int = 0
    rate_limited: int = 0
    unauthorized: int = 0
    max_in_flight: int = 0
    tokens: int = 0


@dataclass
class _Window:
    log: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)  # (time, tokens)
    tokens: int = 0
    in_flight: int = 0

    def purge(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - WINDOW_S:
            self.tokens -= self.log.popleft()[1]


@dataclass(frozen=True)
class Admission:
    """The answer to one request's key: refused (status 401/429) or admitted, and the headers."""

    status: int
    headers: list[tuple[str, str]]
    message: str = ""


class KeyQuotas:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.limits: dict[str, KeyLimit] = {}
        self.revoked: set[str] = set()
        self.counters: dict[str, KeyCounters] = {}
        self._windows: dict[str, _Window] = {}

    def configure(self, limits: dict[str, KeyLimit] | None = None, revoked: set[str] | None = None) -> None:
        """Replace the limits and revocations (counters and windows are kept)."""
        if limits is not None:
            self.limits = dict(limits)
        if revoked is not None:
            self.revoked = set(revoked)

    def configure_json(self, payload: Any) -> None:
        if not isinstance(payload, dict) or set(payload) - {"limits", "revoked"}:
            raise ValueError('expected {"limits": {key: {...}}, "revoked": [key, ...]}')
        limits = payload.get("limits")
        revoked = payload.get("revoked")
        if revoked is not None and (not isinstance(revoked, list) or not all(isinstance(k, str) for k in revoked)):
            raise ValueError("revoked is a list of keys")
        if limits is not None and not isinstance(limits, dict):
            raise ValueError("limits maps keys to their limits")
        self.configure(
            {str(k): KeyLimit.parse(v) for k, v in limits.items()} if limits is not None else None,
            set(revoked) if revoked is not None else None,
        )

    def reset(self) -> None:
        self.counters.clear()
        self._windows.clear()

    @property
    def active(self) -> bool:
        return bool(self.limits or self.revoked)

    def admit(self, key: str, tokens: int) -> Admission:
        """Count a request of ``tokens`` (prompt + max_tokens) on ``key`` if its limits allow."""
        counters = self.counters.setdefault(key, KeyCounters())
        if key in self.revoked:
            counters.unauthorized += 1
            return Admission(401, [], "Invalid Authentication")
        limit = self.limits.get(key)
        if limit is None:
            counters.requests += 1
            return Admission(200, [])
        now = self.clock()
        window = self._windows.setdefault(key, _Window())
        window.purge(now)
        refused = ""
        retry = 1.0
        if limit.max_concurrency is not None and window.in_flight >= limit.max_concurrency:
            refused = f"max concurrency: {limit.max_concurrency}"
        elif limit.rpm is not None and len(window.log) + 1 > limit.rpm:
            refused = f"max RPM: {limit.rpm}"
            retry = window.log[0][0] + WINDOW_S - now
        elif limit.tpm is not None and window.tokens + tokens > limit.tpm:
            refused = f"max TPM: {limit.tpm}"
            retry = _until_tokens(window, now, window.tokens + tokens - limit.tpm)
        if refused:
            counters.rate_limited += 1
            seconds = max(1, math.ceil(retry))
            headers = [("retry-after", str(seconds)), *self._headers(limit, window, now)]
            return Admission(
                429,
                headers,
                f"Your account org-simulator request reached organization {refused}, "
                f"please try again after {seconds} seconds",
            )
        window.log.append((now, tokens))
        window.tokens += tokens
        window.in_flight += 1
        counters.requests += 1
        counters.tokens += tokens
        counters.max_in_flight = max(counters.max_in_flight, window.in_flight)
        return Admission(200, self._headers(limit, window, now))

    def has_room(self, key: str, tokens: int) -> bool:
        """Whether ``admit`` would take a request of ``tokens`` on ``key`` now (counts nothing)."""
        if key in self.revoked:
            return False
        limit = self.limits.get(key)
        if limit is None:
            return True
        window = self._windows.setdefault(key, _Window())
        window.purge(self.clock())
        return not (
            (limit.max_concurrency is not None and window.in_flight >= limit.max_concurrency)
            or (limit.rpm is not None and len(window.log) + 1 > limit.rpm)
            or (limit.tpm is not None and window.tokens + tokens > limit.tpm)
        )

    def release(self, key: str) -> None:
        window = self._windows.get(key)
        if window is not None and window.in_flight > 0:
            window.in_flight -= 1

    def _headers(self, limit: KeyLimit, window: _Window, now: float) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        reset = f"{max(0.0, window.log[0][0] + WINDOW_S - now):.3f}s" if window.log else "0s"
        if limit.rpm is not None:
            out += [
                ("x-ratelimit-limit-requests", str(limit.rpm)),
                ("x-ratelimit-remaining-requests", str(max(0, limit.rpm - len(window.log)))),
                ("x-ratelimit-reset-requests", reset),
            ]
        if limit.tpm is not None:
            out += [
                ("x-ratelimit-limit-tokens", str(limit.tpm)),
                ("x-ratelimit-remaining-tokens", str(max(0, limit.tpm - window.tokens))),
                ("x-ratelimit-reset-tokens", reset),
            ]
        return out

    def stats(self) -> dict[str, dict[str, int]]:
        return {key_label(k): asdict(c) for k, c in self.counters.items()}


def _until_tokens(window: _Window, now: float, excess: int) -> float:
    freed = 0
    for at, tokens in window.log:
        freed += tokens
        if freed >= excess:
            return at + WINDOW_S - now
    return WINDOW_S
