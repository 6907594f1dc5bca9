"""The order response transforms run in, whichever request step adds them.

The tool step and the reasoning step each add transforms; the order they must run in is fixed here
rather than by which step happens to run first:

1. ``MARKERS``: raw K2 tool-call sections in content or reasoning become ``tool_calls``. First, so a
   section inside text the reasoning step removes (stripped ``<think>`` text) is still a call.
2. ``REPAIR``: ids, types and JSON-string arguments of the calls; well-formed stream deltas.
3. ``REASONING``: the tenant's reasoning mode (pass under its field name, strip, redact), including
   ``<think>`` text split out of content.
4. ``RECORD``: the turn as assembled so far is kept for the next tool-loop request (and capture). It
   must see the final calls (ids minted by the repair) under the names the upstream saw, because the
   next request's history is keyed after its names have been aliased again.
5. ``CLIENT_NAMES``: tool-name aliases back to the client's names.
6. ``LEGACY``: ``tool_calls`` → ``function_call`` for clients that sent ``functions``: the
   client's shape, after everything else has read the calls.
7. ``ENVELOPE``: the client-facing envelope (the virtual model name, OpenAI's usage shape, no empty
   placeholders; ``gateway/transforms/envelope.py``). Last, so it also sees what the others emitted
   and the chunks they synthesized.
"""

from __future__ import annotations

from bisect import insort
from typing import Any

MARKERS, REPAIR, REASONING, RECORD, CLIENT_NAMES, LEGACY, ENVELOPE = 10, 20, 30, 40, 50, 60, 70


def stage_of(transform: Any) -> int:
    stage = getattr(transform, "stage", None)
    if not isinstance(stage, int):
        raise TypeError(f"{type(transform).__name__} has no stage; give it one in gateway/transforms/order.py")
    return stage


def add_transform(transforms: list[Any], transform: Any) -> None:
    """Insert ``transform`` at its stage (after any transform of the same stage already there)."""
    insort(transforms, transform, key=stage_of)
