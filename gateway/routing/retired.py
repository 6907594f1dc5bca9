"""Candidates whose upstream answered 404 for the model: skipped, and tried again after a backoff.

A 404 for the model usually means the provider retired that id, and every tenant routed to that
upstream model would meet it, so it is skipped for all of them at once. But a 404 can also be a
deploy in progress or a model briefly withdrawn: rather than until the process restarts, the
candidate is ranked again after ``probe_s`` (60 s by default). Another 404 retires it for twice as
long (up to an hour); an answer clears it. Requests that meet it again at once all fail over to the
next candidate, as the first one did: nothing reaches a client. ``/readyz`` lists the retired
candidates with the seconds until they are tried again; ``gateway_candidate_retired`` is 1 while
one is retired.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway.routing.metrics import CANDIDATE_RETIRED, DEAD_CANDIDATES

MAX_PROBE_S = 3600.0


class Retired:
    """The retired candidates by label (``upstream/model``), each with its next probe time."""

    def __init__(self, probe_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.probe_s = probe_s
        self.clock = clock
        self._until: dict[str, float] = {}  # label -> when it is ranked again
        self._backoff: dict[str, float] = {}  # label -> the wait its last 404 earned

    def __contains__(self, label: object) -> bool:
        """Whether a request must skip ``label`` now."""
        until = self._until.get(label) if self._until else None  # type: ignore[call-overload]
        return until is not None and self.clock() < until

    def add(self, label: str) -> float:
        """``label``'s upstream answered 404 for the model (again); returns the seconds it is out."""
        before = self._backoff.get(label)
        wait = self.probe_s if before is None else min(before * 2, MAX_PROBE_S)
        self._backoff[label] = wait
        self._until[label] = self.clock() + wait
        DEAD_CANDIDATES.labels(label).inc()
        CANDIDATE_RETIRED.labels(label).set(1)
        return wait

    def served(self, label: str) -> None:
        """``label`` answered: whatever was retired about it is over."""
        if self._until and self._until.pop(label, None) is not None:
            del self._backoff[label]
            CANDIDATE_RETIRED.labels(label).set(0)

    def snapshot(self) -> dict[str, float]:
        """Seconds until each retired candidate is tried again (0: it is, until it answers)."""
        now = self.clock()
        # rounded up: 0 only once it is really ranked again
        return {label: max(0.0, math.ceil((until - now) * 10) / 10) for label, until in sorted(self._until.items())}
