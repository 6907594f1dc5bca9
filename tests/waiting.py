"""Waiting for a condition with a deadline, never a fixed sleep followed by an exact assertion.

A fixed sleep is either too short on a loaded CI machine (the test flakes) or too long everywhere else
(the suite crawls); polling until the condition holds, up to a generous deadline, is neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 10.0, interval: float = 0.02) -> T:
    """``check()``'s first truthy result; raises AssertionError naming the check after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{getattr(check, '__name__', check)!s} did not hold within {timeout} s")
        time.sleep(interval)


def settled(get: Callable[[], T], timeout: float = 10.0) -> T:
    """A ``/v1/spend`` answer that includes every row the gateway has recorded so far.

    The report answers at once (within 100 ms) and says in ``x-gateway-ledger-unwritten`` how many
    of this process's rows the database does not have yet; ask again until that is 0."""

    def check() -> T | None:
        resp = get()
        headers = getattr(resp, "headers", {})
        return resp if headers.get("x-gateway-ledger-unwritten", "0") == "0" else None

    return wait_until(check, timeout)
