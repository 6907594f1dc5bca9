"""The provider's own view of a key's quota: the ``x-ratelimit-*`` response headers.

OpenAI-compatible providers (OpenAI, Moonshot, most aggregators) send, per key,
``x-ratelimit-limit-requests`` / ``-tokens``, ``x-ratelimit-remaining-requests`` / ``-tokens`` and
``x-ratelimit-reset-requests`` / ``-tokens`` (a duration: ``1s``, ``6m0s``, ``20ms``, or plain
seconds). The key pool corrects its local count with them: another client of the same key, or a
replica whose counts were lost, shows up there first. Read only for requests sent over a pool key,
so the single-key path parses nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class RateHeaders:
    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None


def duration_s(text: str | None) -> float | None:
    """``1s``, ``6m0s``, ``1h2m3.5s``, ``20ms`` or plain seconds; None when unreadable."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    total, end = 0.0, 0
    for match in _PART.finditer(text):
        if match.start() != end:
            return None
        total += float(match.group(1)) * _UNIT[match.group(2)]
        end = match.end()
    return total if end == len(text) and end else None


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return max(0, int(float(text.strip())))
    except ValueError:
        return None


def parse_rate_headers(get: Callable[[str], str | None]) -> RateHeaders | None:
    """The headers through ``get`` (a case-insensitive lookup), or None when the provider sent none."""
    remaining_requests = _int(get("x-ratelimit-remaining-requests"))
    remaining_tokens = _int(get("x-ratelimit-remaining-tokens"))
    if remaining_requests is None and remaining_tokens is None:
        return None
    return RateHeaders(
        _int(get("x-ratelimit-limit-requests")),
        remaining_requests,
        duration_s(get("x-ratelimit-reset-requests")),
        _int(get("x-ratelimit-limit-tokens")),
        remaining_tokens,
        duration_s(get("x-ratelimit-reset-tokens")),
    )
