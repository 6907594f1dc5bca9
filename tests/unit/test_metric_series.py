"""Request-path metrics go to prometheus-client's own children as they happen, looked up once."""

from __future__ import annotations

from gateway import observability
from gateway.observability import series

LABELS = {"tenant": "t-series", "model": "m", "upstream": "u"}


def sample(name: str, **labels: str) -> float | None:
    return observability.REGISTRY.get_sample_value(name, {**LABELS, **labels})


def test_every_update_is_visible_to_the_next_scrape_without_a_flush() -> None:
    s = series("t-series", "m", "u", True)
    before = sample("gateway_tokens_total", kind="prompt") or 0
    s.prompt.inc(7)
    s.status(200).inc()
    s.duration.observe(0.3)
    assert sample("gateway_tokens_total", kind="prompt") == before + 7
    assert (sample("gateway_requests_total", status="200") or 0) >= 1
    assert (sample("gateway_request_duration_seconds_count", stream="true") or 0) >= 1
    payload, _ = observability.metrics_payload()
    assert b'gateway_tokens_total{kind="prompt",model="m",tenant="t-series",upstream="u"}' in payload


def test_a_series_built_again_after_eviction_updates_the_same_children() -> None:
    """``series`` is a bounded cache: a rebuilt Series must reach the same children (prometheus-client
    returns one child per label set), so nothing counted through the old one is lost."""
    first = series("t-evict", "m", "u", False)
    series.cache_clear()
    again = series("t-evict", "m", "u", False)
    assert again is not first
    assert again.prompt is first.prompt
    assert again.status(200) is first.status(200)
    assert again.duration is first.duration
