"""Request headers that steer routing."""

from __future__ import annotations

from gateway.errors import invalid_request

MAX_LATENCY_HEADER = b"x-gateway-max-latency-ms"


def parse_max_latency(value: bytes | None) -> float | None:
    """``x-gateway-max-latency-ms: 20000`` tightens the route's total-time SLO; 400 when malformed."""
    if value is None:
        return None
    try:
        ms = float(value.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        ms = -1.0
    if not 0 < ms < 86_400_000:
        raise invalid_request(
            f"x-gateway-max-latency-ms must be a number of milliseconds > 0, got {value[:40]!r}.",
            param="x-gateway-max-latency-ms",
            code="invalid_header",
        )
    return ms
