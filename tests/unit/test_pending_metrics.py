"""Request-path counters add up in memory and reach prometheus_client at flush: same numbers, later."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from gateway import observability
from gateway.observability import _PendingCounter, flush_metrics, series

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def test_a_counter_adds_up_until_flushed_and_then_starts_again() -> None:
    reg = CollectorRegistry()
    child = Counter("c", "c", registry=reg)
    pending = _PendingCounter(child)
    for _ in range(3):
        pending.inc()
    pending.inc(0.5)
    assert samples(reg)[("c_total", ())] == 0
    pending.flush()
    pending.flush()  # nothing new: nothing added twice
    assert samples(reg)[("c_total", ())] == 3.5
    pending.inc(2)
    pending.flush()
    assert samples(reg)[("c_total", ())] == 5.5


def test_a_series_built_again_after_eviction_shares_the_pending_counts() -> None:
    """``series`` is a bounded cache: a rebuilt Series must find the same pending wrappers, or counts
    made through the old one would be flushed twice or lost, and the flush list would grow forever."""
    first = series("t-evict", "m", "u", False)
    first.prompt.inc(7)
    first.status(200).inc()
    size = len(observability._PENDING)
    series.cache_clear()
    again = series("t-evict", "m", "u", False)
    assert again is not first
    assert again.prompt is first.prompt
    assert again.status(200) is first.status(200)
    assert len(observability._PENDING) == size
    flush_metrics()
    value = observability.REGISTRY.get_sample_value(
        "gateway_tokens_total", {"tenant": "t-evict", "model": "m", "upstream": "u", "kind": "prompt"}
    )
    assert value == 7


def test_histograms_are_the_librarys_own_children_observed_at_once() -> None:
    """Only counters are batched (public ``inc`` at flush); a histogram observation is visible before
    any flush, so no private prometheus_client field is needed and any release of it works."""
    s = series("t-hist", "m", "u", True)
    s.duration.observe(0.3)
    value = observability.REGISTRY.get_sample_value(
        "gateway_request_duration_seconds_count", {"tenant": "t-hist", "model": "m", "upstream": "u", "stream": "true"}
    )
    assert value == 1
    assert id(s.duration) not in observability._PENDING
