"""SIGTERM drain: turn unready first, stop later, so a load balancer moves traffic away before the
listening socket closes.

Without a drain, uvicorn answers SIGTERM at once by closing its listening sockets and waiting for
the requests in flight (streams included) to finish. That is right for the requests already in,
but a load balancer that still routes to this process meanwhile gets refused connections until
its next readiness probe. With ``shutdown.drain_s`` set, the first SIGTERM only marks the process
as draining (``/readyz`` answers 503 ``draining``; every other request is served as before) and
hands the signal to uvicorn ``drain_s`` seconds later. A second SIGTERM hands it over at once.

The handler wraps the one uvicorn installed (``Server.capture_signals``, which runs before the
app's start-up in the same main thread), so uvicorn's own shutdown and its restoring of the
previous handlers are unchanged. With ``--workers N`` uvicorn's supervisor forwards SIGTERM to
every worker, and each drains on its own.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable
from types import FrameType

from gateway.observability import log


class Drain:
    """The SIGTERM wrapper of one process; ``draining`` is read by ``/readyz``."""

    def __init__(self, drain_s: float, on_start: Callable[[], None] | None = None) -> None:
        self.drain_s = drain_s
        self.draining = False
        self._on_start = on_start
        self._previous: Callable[[int, FrameType | None], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handed_over = False

    def install(self) -> bool:
        """Wrap the current SIGTERM handler; False (nothing done) off the main thread, with no drain
        configured, or when no Python handler is installed (not under uvicorn)."""
        if self.drain_s <= 0 or threading.current_thread() is not threading.main_thread():
            return False
        previous = signal.getsignal(signal.SIGTERM)
        if not callable(previous):
            return False
        self._previous = previous
        self._loop = asyncio.get_running_loop()
        signal.signal(signal.SIGTERM, self._on_term)
        return True

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        if self.draining:  # a second SIGTERM: stop now
            self._hand_over(sig)
            return
        self.draining = True
        if self._on_start is not None:
            self._on_start()
        log.info(
            "SIGTERM: draining for %g s (/readyz answers 503, requests are still served), then stopping", self.drain_s
        )
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._loop.call_later, self.drain_s, self._hand_over, sig)

    def _hand_over(self, sig: int) -> None:
        if self._handed_over or self._previous is None:
            return
        self._handed_over = True
        log.info("drain over: closing the listening socket; requests in flight get the grace period")
        self._previous(sig, None)
