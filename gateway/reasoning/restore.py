"""Reasoning back into the assistant tool-call messages of a request, for every reasoning mode.

Each such message gets its reasoning from one source, counted in
``gateway_reasoning_restored_total{tenant,source}``:

* ``client``: the client sent it back (non-empty, under either field name).
* ``store``: the gateway kept it when it served that answer (``store.py``: the exact conversation
  key, else the fallback key on the user messages and tool calls).
* ``placeholder``: neither, on an upstream that requires it (``fallback.py``).
* ``none``: neither, on an upstream that does not need it; the message goes as it came.

Which source wins when there are two: for ``pass`` tenants the client's own text is never
overridden (the store is only asked for messages that came back without reasoning); for ``strip``
and ``redact`` tenants the store's original wins, because what such a client holds is nothing or
the redacted copy, and the copy is used only when the store has nothing. An empty string counts as
no reasoning (Moonshot refuses it).

The common requests cost next to nothing: a body without tool-call history is walked once to find
none, and a history whose messages all carry their reasoning (a pass tenant's client that echoes
it) without hashing or a state round trip. Only messages that need the store are
fingerprinted, and all their keys go in one ``get_many``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.observability import REASONING_RESTORED
from gateway.reasoning.fallback import PLACEHOLDER
from gateway.reasoning.modes import FIELDS
from gateway.reasoning.store import Fingerprints, ReasoningStore, calls_bytes, calls_key, turn_key


def client_reasoning(msg: dict[str, Any]) -> str | None:
    """The reasoning a client sent back on a message (non-empty), under either field name."""
    for name in FIELDS:
        value = msg.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def put_reasoning(msg: dict[str, Any], name: str, text: str) -> bool:
    """Set ``msg[name]`` keeping key order: a reasoning field under the other name is renamed in
    place, a duplicate under the other name removed. Returns whether the message changed."""
    other = FIELDS[1] if name == FIELDS[0] else FIELDS[0]
    if other not in msg:
        if msg.get(name) == text:
            return False
        msg[name] = text
        return True
    items = [(name if key == other else key, text if key in (name, other) else value) for key, value in msg.items()]
    msg.clear()
    for key, value in items:
        msg.setdefault(key, value)
    return True


def tool_turns(messages: list[Any]) -> list[int]:
    """Indices of the assistant messages that carry tool calls."""
    return [
        i
        for i, msg in enumerate(messages)
        if isinstance(msg, dict) and msg.get("role") == "assistant" and msg.get("tool_calls")
    ]


@dataclass(slots=True)
class Restoration:
    """What :func:`restore_history` did: whether the body changed, the first message it could not
    give reasoning to where the upstream requires it (only when asked to reject), and the
    fingerprints of the whole conversation when it had to compute them (the recorder reuses them)."""

    changed: bool = False
    missing: int | None = None
    prefix: bytes | None = None
    skeleton: bytes | None = None


async def restore_history(
    store: ReasoningStore | None,
    tenant: str,
    mode: str,
    messages: list[Any],
    up_field: str,
    *,
    required: bool,
    reject: bool,
    turns: list[int] | None = None,
    sent: dict[int, str | None] | None = None,
) -> Restoration:
    """Give each assistant tool-call message of ``messages`` its reasoning, in ``up_field``, in place.

    With ``reject`` nothing is changed when a message is left without reasoning on an upstream that
    ``required`` it: ``missing`` names the first such message and the caller answers 400."""
    result = Restoration()
    indices = tool_turns(messages) if turns is None else turns
    if not indices:
        return result
    if sent is None:
        sent = {i: client_reasoning(messages[i]) for i in indices}
    # pass: only what came back without reasoning; strip/redact: every turn (the original wins)
    ask = [i for i in indices if mode != "pass" or sent[i] is None] if store is not None else []
    kept: dict[int, str] = {}
    if ask:
        assert store is not None
        fp = Fingerprints()
        pairs: list[tuple[str, str]] = []
        wanted = iter(ask)
        nxt = next(wanted)
        for i, msg in enumerate(messages):  # one pass: a snapshot at each turn asked for
            if i == nxt:
                calls = calls_bytes(msg["tool_calls"])
                pairs.append((turn_key(tenant, fp.prefix(), calls), calls_key(tenant, fp.skeleton(), calls)))
                fp.feed(msg, calls)
                nxt = next(wanted, -1)
            else:
                fp.feed(msg)
        result.prefix, result.skeleton = fp.prefix(), fp.skeleton()
        for i, text in zip(ask, await store.recall_turns(pairs), strict=True):
            if text:
                kept[i] = text
    plan: list[tuple[int, str, str | None]] = []  # index, source, text to put (None: leave as is)
    for i in indices:
        mine = sent[i]
        if mode == "pass" and mine is not None:
            plan.append((i, "client", mine))
        elif i in kept:
            plan.append((i, "store", kept[i]))
        elif mine is not None:
            plan.append((i, "client", mine))
        elif required:
            if reject:
                result.missing = i
                return result
            plan.append((i, "placeholder", PLACEHOLDER))
        else:
            plan.append((i, "none", None))
    counts: dict[str, int] = {}
    for i, source, text in plan:
        counts[source] = counts.get(source, 0) + 1
        if text is not None:
            result.changed = put_reasoning(messages[i], up_field, text) or result.changed
    for source, n in counts.items():
        REASONING_RESTORED.labels(tenant, source).inc(n)
    return result
