"""The response-transform seam of the pipeline.

A transform sees parsed chat/completions answers: the whole response for a non-stream request,
one parsed chunk at a time for a stream. The pipeline serializes again only when at least one
transform is active for the request, so untouched traffic keeps its upstream bytes exactly.
Usage is metered from the upstream's own bytes before any transform runs (reasoning tokens are
billed whatever a tenant's clients are shown).
"""

from __future__ import annotations

from typing import Any, Protocol

Chunk = dict[str, Any]


class ResponseTransform(Protocol):
    def whole(self, response: dict[str, Any]) -> None:
        """Edit a non-stream response in place."""

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        """One stream chunk in, zero or more out (text held back across chunk boundaries may come
        out with a later chunk)."""

    def finish(self) -> list[Chunk]:
        """Chunks still held when the upstream's stream ends (before ``[DONE]``)."""
