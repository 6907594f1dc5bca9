"""What every upstream adapter offers the pipeline.

An adapter sends request bytes and hands back an :class:`UpstreamReply`: the status, the few headers
the gateway relays, and either the whole body or its chunks as they arrive. Failures below HTTP
(refused connections, timeouts, cut streams) are :class:`UpstreamFailure` with a ``kind`` the
pipeline maps to 502/504 and, later, to failover decisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gateway.config import UpstreamConfig
    from gateway.upstreams.rate_headers import RateHeaders

FailureKind = Literal["connect", "first_byte_timeout", "idle_timeout", "total_timeout", "cut", "protocol"]


class UpstreamFailure(Exception):
    """The upstream could not be reached or stopped answering; no HTTP status to relay."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def is_timeout(self) -> bool:
        return self.kind.endswith("_timeout")


class UpstreamReply(ABC):
    """One upstream response; the caller must end it with ``aclose()`` (idempotent)."""

    status: int
    retry_after: str | None
    content_type: str
    # the provider's x-ratelimit-* headers, read only for a request sent over a pool key
    rate: RateHeaders | None = None

    @abstractmethod
    async def read(self) -> bytes:
        """The whole body (non-stream answers and error bodies)."""

    @abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive; raises :class:`UpstreamFailure` on an idle timeout or a cut."""

    @abstractmethod
    async def aclose(self, *, abort: bool = False) -> None:
        """Release the response; ``abort`` drops the connection so the upstream stops generating."""


class Upstream(ABC):
    """An upstream endpoint that speaks OpenAI chat/completions."""

    name: str
    reasoning_field: str
    config: UpstreamConfig
    # the upstream leaves raw K2 tool-call markers in content (a vLLM without --tool-call-parser)
    tool_call_markers: bool = False

    async def start(self) -> None:  # noqa: B027 - most adapters have nothing to open
        """Open pools and clients (called from the server's lifespan, inside the event loop)."""

    async def close(self) -> None:  # noqa: B027 - most adapters have nothing to close
        """Close pools and clients."""

    @abstractmethod
    async def send(self, body: bytes, *, stream: bool, key: str | None = None) -> UpstreamReply:
        """POST ``body`` to chat/completions; returns once the status and headers (and for a stream the
        first body bytes) are in, or raises :class:`UpstreamFailure`. ``key``: the label of the pool
        key to send it with (None: the upstream's one key; only kind ``openai`` has pools)."""
