"""Injected faults: errors, stalls, dropped connections and cut streams.

Faults exist to test a gateway in front of the simulator (retries, failover, idle timeouts, usage
estimation after a broken stream).  They are queued with `Simulator.add_fault` / `POST /_sim/faults`,
or given per request in the body as ``"sim": {"fault": {...}}`` (unknown fields pass through gateways
to upstreams, so a test can aim a fault at exactly one request).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .garbage import KINDS


def _number(name: str, value: Any, *, minimum: float = 0.0) -> None:
    if value is None:
        return
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value) or value < minimum:
        raise ValueError(f"fault field {name!r} must be a number >= {minimum:g}, got {value!r}")


@dataclass
class Fault:
    """One fault; every field is optional and they combine (e.g. a stall, then a 503).

    status: answer this HTTP status with a provider-style error body (429 uses Moonshot's
        rate_limit_reached_error, 5xx server_error; `error_type`/`message` override them, e.g.
        ``error_type="exceeded_current_quota_error"`` for the 429 that must not be retried).
    retry_after: seconds for a Retry-After header on the error.
    cut_after_events: stream: send N SSE events, then drop the connection without [DONE]
        (a non-stream request is dropped without a response).  N >= the number of events = no cut.
    stall_s: wait this long before the first byte.
    stall_mid_s: stream: wait this long after the first two events (role + first delta);
        non-stream: added to the delay.
    drop: close the connection without any response.
    garbage: a 200 that is not an answer, as a misbehaving proxy in front of a provider sends, stream
        or not: ``html``, ``truncated``, ``not_json``, ``wrong_shape``, ``html_mid`` or ``text_plain``
        (what each sends: ``simulator/garbage.py``).
    garbage_after_events: stream: how many real events come before the garbage (default 2).
    count: how many matching requests the fault applies to; -1 = until cleared.
    model: apply only to requests naming this model.
    key: apply only to requests sent with this API key (a 429 storm on one key of a pool).
    """

    status: int | None = None
    retry_after: float | None = None
    cut_after_events: int | None = None
    stall_s: float | None = None
    stall_mid_s: float | None = None
    drop: bool = False
    garbage: str | None = None
    garbage_after_events: int | None = None
    count: int = 1
    model: str | None = None
    key: str | None = None
    error_type: str | None = None
    message: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and (
            not isinstance(self.status, int) or isinstance(self.status, bool) or not 400 <= self.status <= 599
        ):
            raise ValueError(f"fault field 'status' must be an HTTP error status (400-599), got {self.status!r}")
        _number("retry_after", self.retry_after)
        _number("stall_s", self.stall_s)
        _number("stall_mid_s", self.stall_mid_s)
        if self.garbage is not None and self.garbage not in KINDS:
            raise ValueError(f"fault field 'garbage' must be one of {', '.join(KINDS)}, got {self.garbage!r}")
        for name in ("cut_after_events", "garbage_after_events"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"fault field {name!r} must be an integer >= 0, got {value!r}")
        if not isinstance(self.drop, bool):
            raise ValueError(f"fault field 'drop' must be a boolean, got {self.drop!r}")
        if not isinstance(self.count, int) or isinstance(self.count, bool) or (self.count < 1 and self.count != -1):
            raise ValueError(f"fault field 'count' must be an integer >= 1 or -1 (until cleared), got {self.count!r}")
        for name in ("model", "key", "error_type", "message"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"fault field {name!r} must be a string, got {value!r}")

    @classmethod
    def from_dict(cls, data: Any) -> Fault:
        """Build a fault from JSON; raises ValueError on unknown keys or bad values."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a fault must be a JSON object, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(
                f"unknown fault field(s) {', '.join(map(repr, unknown))}; known fields: {', '.join(sorted(fields))}"
            )
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def key_label(key: str) -> str:
    """A short stable name for an API key in stats (the key itself is never shown)."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


class FaultQueue:
    """Queued faults, consumed in order by matching requests."""

    def __init__(self) -> None:
        self._items: list[list[Any]] = []  # [fault, remaining]; remaining -1 = until cleared

    def __bool__(self) -> bool:
        return bool(self._items)

    def add(self, fault: Fault) -> None:
        self._items.append([fault, fault.count])

    def clear(self) -> None:
        self._items.clear()

    def take(self, model: Any, key: str = "") -> Fault | None:
        """The first queued fault matching `model` (and the request's API `key`), counting one use of it."""
        for i, item in enumerate(self._items):
            fault: Fault = item[0]
            if (fault.model is not None and fault.model != model) or (fault.key is not None and fault.key != key):
                continue
            if item[1] > 0:
                item[1] -= 1
                if item[1] == 0:
                    del self._items[i]
            return fault
        return None

    def pending(self) -> list[dict[str, Any]]:
        """The queued faults with their remaining counts (for /_sim/stats; a key by its label only)."""
        out = []
        for fault, remaining in self._items:
            entry = dict(fault.to_dict(), remaining=remaining)
            if fault.key is not None:
                entry["key"] = key_label(fault.key)
            out.append(entry)
        return out
