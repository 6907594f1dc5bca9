"""A candidate whose upstream answered 404 for the model is skipped, then ranked again after a
backoff that doubles at each further 404 (up to an hour); an answer clears it."""

from __future__ import annotations

from gateway.observability import REGISTRY
from gateway.routing.retired import MAX_PROBE_S, Retired


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(label: str) -> float | None:
    return REGISTRY.get_sample_value("gateway_candidate_retired", {"candidate": label})


def test_skipped_until_its_wait_is_over_then_ranked_again() -> None:
    clock = Clock()
    retired = Retired(60.0, clock)
    assert "up/k2" not in retired
    retired.add("up/k2")
    assert "up/k2" in retired and retired.snapshot() == {"up/k2": 60.0}
    assert gauge("up/k2") == 1
    clock.now += 59.95
    assert "up/k2" in retired and retired.snapshot() == {"up/k2": 0.1}  # rounded up: not due yet
    clock.now += 0.05
    assert "up/k2" not in retired and retired.snapshot() == {"up/k2": 0.0}


def test_each_further_404_doubles_the_wait_up_to_an_hour() -> None:
    clock = Clock()
    retired = Retired(60.0, clock)
    waits = []
    for _ in range(8):
        retired.add("up/gone")
        waits.append(retired.snapshot()["up/gone"])
        clock.now += waits[-1]
    assert waits == [60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, MAX_PROBE_S, MAX_PROBE_S]


def test_an_answer_clears_the_candidate_and_its_backoff() -> None:
    clock = Clock()
    retired = Retired(10.0, clock)
    retired.add("up/back")
    retired.add("up/back")
    clock.now += 20
    retired.served("up/back")
    assert "up/back" not in retired and retired.snapshot() == {}
    assert gauge("up/back") == 0
    retired.add("up/back")  # a new 404 later starts from the first wait again
    assert retired.snapshot() == {"up/back": 10.0}
    retired.served("up/never-retired")  # nothing to clear: nothing happens
