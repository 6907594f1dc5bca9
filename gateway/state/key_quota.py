"""Quota accounting for an upstream's key pool: requests and tokens per minute, requests in flight,
cool-downs and revocations per provider key, shared by every replica when the state is Redis.

A provider counts a key's requests and tokens (Moonshot: the prompt plus ``max_tokens``) over a
rolling minute and refuses with 429 beyond its tier's limits. The gateway keeps the same count
itself, exactly (a log of the minute's grants, not an estimate that could undercount a burst at the
end of the previous window), so it sends nothing a key cannot take: :meth:`KeyQuotaState.acquire`
takes the first key of a preference list that fits, or the least loaded one, and counts the grant
in one atomic step. A window entry lives ``WINDOW_S`` plus a small margin, because the gateway
counts a request a moment before the provider sees it and must also forget it after the provider.

Keys are opaque ids chosen by the caller (upstream, label and a fingerprint of the secret, never the
secret); times are unix seconds from the caller so replicas and the memory backend agree.
"""

from __future__ import annotations

import collections
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

WINDOW_S = 60.0
MARGIN_S = 0.5  # the provider sees a request after the gateway counted it, and forgets it later too
# why a key was passed over (KeyGrant.reasons); "" = it fitted
COOLING, REVOKED, RPM, TPM, CONCURRENCY, TOO_LARGE = "cooling", "revoked", "rpm", "tpm", "concurrency", "too_large"
UNKNOWN_WAIT_S = 1.0  # a key full of requests in flight frees a slot when one ends: unknown, retry soon


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """One key as the state sees it: its opaque id and the provider's limits (None: unknown)."""

    id: str
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """What :meth:`KeyQuotaState.acquire` decided: the chosen key's position in the list (None when no
    key fits), why each key was passed over, and, when none fits, the seconds until the soonest one
    may (None: never, the request is larger than every key's per-minute tokens)."""

    index: int | None
    reasons: tuple[str, ...]
    wait_s: float | None = 0.0


@dataclass(frozen=True, slots=True)
class KeyView:
    """A key's counters now (explain, tests, the benchmark)."""

    requests: int  # granted in the last minute
    tokens: int
    in_flight: int
    cooling_s: float  # seconds of cool-down left (0: none)
    revoked: bool

    def load(self, key: KeyLimits) -> float:
        """The largest used share of the key's known limits (0 when none is known)."""
        shares = [0.0]
        if key.rpm:
            shares.append(self.requests / key.rpm)
        if key.tpm:
            shares.append(self.tokens / key.tpm)
        if key.max_concurrency:
            shares.append(self.in_flight / key.max_concurrency)
        return max(shares)


class KeyQuotaState(ABC):
    @abstractmethod
    async def acquire(
        self,
        keys: Sequence[KeyLimits],
        tokens: Sequence[int],
        lease: str,
        now: float,
        lease_s: float,
        *,
        least_loaded: bool,
    ) -> KeyGrant:
        """Atomically pick a key that is neither cooling nor revoked and has room for one more request
        of ``tokens[i]`` on key ``i`` (rpm, tpm, concurrency; a key holding the conversation's prefix
        knows more of its prompt, so the bound differs per key), and count it there: the first in
        ``keys``' order, or the least loaded when ``least_loaded``. ``lease`` names the request in flight until
        :meth:`release` (or until ``lease_s`` passes: a replica that died does not hold slots)."""

    @abstractmethod
    async def release(self, key: KeyLimits, lease: str) -> None:
        """The request under ``lease`` ended: free its in-flight slot (its minute's counts stay)."""

    @abstractmethod
    async def adjust(self, key: KeyLimits, lease: str, granted: int, actual: int) -> None:
        """The request under ``lease`` was granted ``granted`` tokens (a bound on its prompt) and the
        provider counted ``actual`` (its reported prompt plus max_tokens): count that instead, for
        the rest of the minute. A lease no longer in the window is left alone."""

    @abstractmethod
    async def cool(self, key: KeyLimits, until: float) -> None:
        """The provider refused the key for a while (429, Retry-After): pass it over until ``until``."""

    @abstractmethod
    async def revoke(self, key: KeyLimits, until: float) -> None:
        """The provider refused the key itself (401/403): pass it over until ``until``."""

    @abstractmethod
    async def correct(self, key: KeyLimits, now: float, requests: int, tokens: int, expires_s: float) -> None:
        """The provider counts ``requests`` and ``tokens`` more than the gateway did (another client
        of the same key, a replica's lost count): add them, forgotten after ``expires_s``."""

    @abstractmethod
    async def view(self, keys: Sequence[KeyLimits], now: float) -> list[KeyView]:
        """Every key's counters now."""

    async def close(self) -> None:  # noqa: B027 - memory has nothing to close
        """Release connections."""


class _Book:
    """One key's counters in memory: the minute's grants (expiry, requests, tokens) oldest first."""

    __slots__ = ("cooled", "flight", "grants", "log", "requests", "revoked", "tokens")

    def __init__(self) -> None:
        # [expiry, requests, tokens, lease]: tokens change when a grant is adjusted to the actual count
        self.log: collections.deque[list[Any]] = collections.deque()
        self.grants: dict[str, list[Any]] = {}  # lease -> its log entry
        self.requests = 0
        self.tokens = 0
        self.flight: dict[str, float] = {}  # lease -> expiry
        self.cooled = 0.0
        self.revoked = 0.0

    def purge(self, now: float) -> None:
        log = self.log
        while log and log[0][0] <= now:
            _, requests, tokens, lease = log.popleft()
            self.requests -= requests
            self.tokens -= tokens
            if lease is not None:
                self.grants.pop(lease, None)
        if self.flight:
            for lease in [k for k, t in self.flight.items() if t <= now]:
                del self.flight[lease]

    def refusal(self, key: KeyLimits, tokens: int, now: float) -> tuple[str, float | None]:
        """Why the key cannot take the request now ("" when it can), and how long until it may."""
        if self.revoked > now:
            return REVOKED, self.revoked - now
        if self.cooled > now:
            return COOLING, self.cooled - now
        if key.max_concurrency is not None and len(self.flight) >= key.max_concurrency:
            return CONCURRENCY, UNKNOWN_WAIT_S
        if key.rpm is not None and self.requests + 1 > key.rpm:
            return RPM, self._until(now, lambda r, _t: self.requests - r + 1 <= (key.rpm or 0))
        if key.tpm is not None and self.tokens + tokens > key.tpm:
            if tokens > key.tpm:
                return TOO_LARGE, None
            return TPM, self._until(now, lambda _r, t: self.tokens - t + tokens <= (key.tpm or 0))
        return "", 0.0

    def _until(self, now: float, fits: object) -> float:
        """Seconds until enough of the log expires that ``fits(freed requests, freed tokens)``."""
        freed_r = freed_t = 0
        for expires, requests, tokens, _ in self.log:
            freed_r += requests
            freed_t += tokens
            if fits(freed_r, freed_t):  # type: ignore[operator]
                return max(0.0, expires - now)
        return WINDOW_S


class MemoryKeyQuotaState(KeyQuotaState):
    """One process's key quotas; every method is atomic on one event loop (no await inside)."""

    def __init__(self) -> None:
        self._books: dict[str, _Book] = {}

    def _book(self, key_id: str) -> _Book:
        book = self._books.get(key_id)
        if book is None:
            book = self._books[key_id] = _Book()
        return book

    async def acquire(
        self,
        keys: Sequence[KeyLimits],
        tokens: Sequence[int],
        lease: str,
        now: float,
        lease_s: float,
        *,
        least_loaded: bool,
    ) -> KeyGrant:
        reasons: list[str] = []
        best: int | None = None
        best_load = 0.0
        wait: float | None = None
        for i, key in enumerate(keys):
            book = self._book(key.id)
            book.purge(now)
            reason, until = book.refusal(key, tokens[i], now)
            reasons.append(reason)
            if reason:
                if until is not None:
                    wait = until if wait is None else min(wait, until)
                continue
            if not least_loaded:
                best = i
                break
            load = _load(book, key, tokens[i])
            if best is None or load < best_load:
                best, best_load = i, load
        if best is None:
            return KeyGrant(None, tuple(reasons), wait)
        book = self._books[keys[best].id]
        granted = tokens[best]
        entry = [now + WINDOW_S + MARGIN_S, 1, granted, lease]
        book.log.append(entry)
        book.grants[lease] = entry
        book.requests += 1
        book.tokens += granted
        book.flight[lease] = now + lease_s
        return KeyGrant(best, tuple(reasons) + ("",) * (len(keys) - len(reasons)))

    async def release(self, key: KeyLimits, lease: str) -> None:
        book = self._books.get(key.id)
        if book is not None:
            book.flight.pop(lease, None)

    async def adjust(self, key: KeyLimits, lease: str, granted: int, actual: int) -> None:
        book = self._books.get(key.id)
        entry = book.grants.get(lease) if book is not None else None
        if book is None or entry is None:
            return
        actual = max(0, actual)
        book.tokens += actual - entry[2]
        entry[2] = actual

    async def cool(self, key: KeyLimits, until: float) -> None:
        book = self._book(key.id)
        book.cooled = max(book.cooled, until)

    async def revoke(self, key: KeyLimits, until: float) -> None:
        book = self._book(key.id)
        book.revoked = max(book.revoked, until)

    async def correct(self, key: KeyLimits, now: float, requests: int, tokens: int, expires_s: float) -> None:
        if requests <= 0 and tokens <= 0:
            return
        book = self._book(key.id)
        requests, tokens = max(0, requests), max(0, tokens)
        entry: list[Any] = [now + expires_s, requests, tokens, None]
        # keep the log ordered by expiry: a correction usually expires before the newest grants
        log = book.log
        at = len(log)
        while at and log[at - 1][0] > entry[0]:
            at -= 1
        log.insert(at, entry)
        book.requests += requests
        book.tokens += tokens

    async def view(self, keys: Sequence[KeyLimits], now: float) -> list[KeyView]:
        out = []
        for key in keys:
            book = self._book(key.id)
            book.purge(now)
            out.append(
                KeyView(book.requests, book.tokens, len(book.flight), max(0.0, book.cooled - now), book.revoked > now)
            )
        return out


def _load(book: _Book, key: KeyLimits, tokens: int) -> float:
    """The key's largest used share after this request (least-loaded picks the smallest)."""
    view = KeyView(book.requests + 1, book.tokens + tokens, len(book.flight) + 1, 0.0, False)
    return view.load(key) if (key.rpm or key.tpm or key.max_concurrency) else float(len(book.flight))
