"""Request-path metrics add up in memory and reach prometheus_client at flush: same numbers, later."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from gateway import observability
from gateway.observability import _PendingCounter, _PendingHistogram, flush_metrics, series

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


@given(st.lists(st.floats(min_value=0, max_value=50, allow_nan=False), max_size=60))
def test_a_flushed_histogram_equals_one_observed_directly(values: list[float]) -> None:
    direct_reg, pending_reg = CollectorRegistry(), CollectorRegistry()
    direct = Histogram("h", "h", ("k",), buckets=BUCKETS, registry=direct_reg).labels("x")
    pending = _PendingHistogram(Histogram("h", "h", ("k",), buckets=BUCKETS, registry=pending_reg).labels("x"))
    assert not pending.direct  # this prometheus_client's layout is the one the flush expects
    for v in values:
        direct.observe(v)
        pending.observe(v)
    pending.flush()
    got, want = samples(pending_reg), samples(direct_reg)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-12, abs_tol=1e-12), key


def test_values_on_a_bucket_bound_count_in_that_bucket() -> None:
    reg = CollectorRegistry()
    pending = _PendingHistogram(Histogram("h", "h", buckets=(0.1, 1), registry=reg))
    for v in (0.1, 1.0, 1.0000001):
        pending.observe(v)
    assert samples(reg)[("h_bucket", (("le", "0.1"),))] == 0  # nothing before the flush
    pending.flush()
    got = samples(reg)
    assert got[("h_bucket", (("le", "0.1"),))] == 1
    assert got[("h_bucket", (("le", "1.0"),))] == 2
    assert got[("h_bucket", (("le", "+Inf"),))] == 3
    assert got[("h_count", ())] == 3


def test_a_histogram_laid_out_differently_is_observed_directly() -> None:
    class Elsewhere:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, value: float) -> None:
            self.seen.append(value)

    child = Elsewhere()
    pending = _PendingHistogram(child)
    assert pending.direct
    pending.observe(0.2)
    assert child.seen == [0.2]  # at once, not at a flush
    pending.flush()
    assert child.seen == [0.2]


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


def test_prometheus_client_still_has_the_private_fields_the_flush_writes() -> None:
    """``_PendingHistogram.flush`` writes prometheus_client's private ``_upper_bounds``, ``_buckets``
    (one non-cumulative value per bound, +Inf last) and ``_sum``. They are the same in 0.20.0 to 0.26.0,
    the range pyproject.toml allows; a release that changes them must fail here, not go unnoticed
    (in production the fallback would quietly observe every value directly again)."""
    from importlib.metadata import version

    import prometheus_client

    child = Histogram("h", "h", buckets=(0.1, 1), registry=CollectorRegistry())
    where = f"prometheus-client {version('prometheus-client')} ({prometheus_client.__file__})"
    for name in ("_upper_bounds", "_buckets", "_sum"):
        assert hasattr(child, name), (
            f"{where}: Histogram has no {name}; gateway/observability.py _PendingHistogram needs it. "
            "Adapt the flush to the new layout or bound prometheus-client below this release in pyproject.toml."
        )
    assert list(child._upper_bounds) == [0.1, 1.0, math.inf], f"{where}: _upper_bounds is laid out differently"
    assert isinstance(child._buckets, list) and len(child._buckets) == 3, f"{where}: _buckets is no list per bound"
    assert all(hasattr(b, "inc") and hasattr(b, "get") for b in child._buckets), f"{where}: bucket values changed"
    assert hasattr(child._sum, "inc"), f"{where}: _sum has no inc()"
    child.observe(0.5)
    assert [b.get() for b in child._buckets] == [0, 1, 0], f"{where}: _buckets are no longer counted per bucket"
    assert child._sum.get() == 0.5, f"{where}: _sum no longer holds the sum"
    assert not _PendingHistogram(child).direct, f"{where}: _PendingHistogram would fall back to direct observe"
