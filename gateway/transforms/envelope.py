"""One client-facing envelope, whatever upstream served the answer (``/v1/chat/completions``).

Why: a tenant's virtual model can be served by Moonshot, a self-hosted vLLM or an aggregator, and a
failover or a cheaper route moves a conversation between them. Without this step the app saw the move:
``model`` turned from ``kimi-k2-thinking`` into vLLM's ``moonshotai/Kimi-K2-Thinking``, cache hits were
under Moonshot's top-level ``usage.cached_tokens`` one turn and under OpenAI's
``prompt_tokens_details.cached_tokens`` the next (SDKs and agent frameworks read only the latter, so
Moonshot's cache hits looked like misses), and vLLM's ``tool_calls: []`` and ``stop_reason: null`` came
and went. With the tenant policy ``envelope: normalized`` (the default) every answer and chunk says:

* ``model``: the virtual model name the client asked for (which upstream served it stays in the
  ``x-gateway-upstream`` header and the ledger);
* ``usage`` (top level and Moonshot's ``choices[i].usage``): OpenAI's shape, with
  ``prompt_tokens_details.cached_tokens`` always and ``completion_tokens_details.reasoning_tokens``
  where the upstream reported it (Moonshot does not; the gateway does not invent it); the provider's
  own fields stay as sent (Moonshot's top-level ``cached_tokens``);
* no placeholders: keys whose value is ``null`` or ``[]`` are dropped at the top level, in each choice
  and in each message or delta, except the ones OpenAI's own answers carry even when empty (top:
  ``choices``, ``usage``; choice: ``finish_reason``, ``logprobs``; message/delta: ``role``,
  ``content``, ``refusal``, ``annotations``). That removes vLLM's ``tool_calls: []``,
  ``reasoning: null``, ``stop_reason: null``, ``function_call``/``audio: null``, its top-level
  ``prompt_logprobs``/``kv_transfer_params: null`` and a ``prompt_tokens_details: null``.

``envelope: raw`` turns all of this off: the client gets the upstream's bytes (the tenant's other
transforms, e.g. reasoning modes, still apply; so does the usage-chunk rule of ``include_usage``).

Two ways in, because the common path must stay a byte relay (README "Hot-path rules"):

* :class:`EnvelopeTransform`: the last response transform (stage ``ENVELOPE``) of requests whose answer
  other transforms already parse (tools, reasoning renamed or stripped...); it edits parsed dicts.
* :class:`EnvelopeBytes`: requests relayed as bytes. A non-stream body is parsed once and serialized
  again only when something changed (one body; its original bytes go out otherwise). A stream is
  never parsed event by event: ``model`` is rewritten at byte
  level (every ``"model":"<upstream id>"`` becomes ``"model":"<virtual>"``: in valid JSON that byte
  sequence can only be a key ``model`` with exactly that string value), and only the chunk that
  carries ``finish_reason`` and what follows it (the usage chunk, ``[DONE]``) are parsed, normalized
  and re-encoded when something changed. Events that need nothing keep their bytes: an upstream that
  already answers with the virtual name and OpenAI's usage is relayed untouched. Streams asked for
  vLLM's ``continuous_usage_stats`` (usage in every chunk), and upstreams that write JSON with spaces
  (``"model": "..."``), take the slower exact path: every event is parsed.
"""

from __future__ import annotations

from typing import Any, ClassVar

import orjson

from gateway.metering.stream import _data, _events
from gateway.transforms.base import Chunk
from gateway.transforms.order import ENVELOPE, add_transform
from gateway.upstreams.sse import last_boundary
from gateway.upstreams.usage import parse_usage

Mode = str  # "normalized" | "raw" (TenantPolicy.envelope)

KEEP_TOP = frozenset(("choices", "usage"))
KEEP_CHOICE = frozenset(("index", "message", "delta", "finish_reason", "logprobs"))
KEEP_MESSAGE = frozenset(("role", "content", "refusal", "annotations"))

_MODEL = b'"model":"'
_FINISH = b'"finish_reason":"'  # a finish reason that is a string: the chunk that ends a choice
_STRUCTURAL = (b"{", b",")  # what precedes a key in compact JSON


def _drop_placeholders(holder: dict[str, Any], keep: frozenset[str]) -> bool:
    dead = [k for k, v in holder.items() if (v is None or (type(v) is list and not v)) and k not in keep]
    for key in dead:
        del holder[key]
    return bool(dead)


def normalize_usage(usage: dict[str, Any]) -> bool:
    """Give one usage object OpenAI's shape in place (new keys go last); whether it changed."""
    found = parse_usage(usage)
    if found is None:  # no token counts: nothing to restate
        return False
    changed = False
    details = usage.get("prompt_tokens_details")
    if not isinstance(details, dict):
        usage["prompt_tokens_details"] = {"cached_tokens": found.cached_tokens}  # a null keeps its place
        changed = True
    elif type(details.get("cached_tokens")) is not int:
        details["cached_tokens"] = found.cached_tokens
        changed = True
    completion = usage.get("completion_tokens_details")
    if found.reasoning_tokens:
        if not isinstance(completion, dict):
            usage["completion_tokens_details"] = {"reasoning_tokens": found.reasoning_tokens}
            changed = True
        elif type(completion.get("reasoning_tokens")) is not int:
            completion["reasoning_tokens"] = found.reasoning_tokens
            changed = True
    elif "completion_tokens_details" in usage and completion is None:
        del usage["completion_tokens_details"]
        changed = True
    return changed


def normalize(answer: dict[str, Any], model: str) -> bool:
    """A whole answer or one chunk in the client-facing envelope, in place; whether it changed."""
    changed = False
    if "model" in answer and answer["model"] != model:
        answer["model"] = model
        changed = True
    usage = answer.get("usage")
    if isinstance(usage, dict) and normalize_usage(usage):
        changed = True
    if _drop_placeholders(answer, KEEP_TOP):
        changed = True
    choices = answer.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        usage = choice.get("usage")
        if isinstance(usage, dict) and normalize_usage(usage):
            changed = True
        if _drop_placeholders(choice, KEEP_CHOICE):
            changed = True
        for key in ("message", "delta"):
            holder = choice.get(key)
            if isinstance(holder, dict) and _drop_placeholders(holder, KEEP_MESSAGE):
                changed = True
    return changed


class EnvelopeTransform:
    """The envelope as a response transform, for answers other transforms already parse."""

    stage: ClassVar[int] = ENVELOPE

    __slots__ = ("model",)

    def __init__(self, model: str) -> None:
        self.model = model

    def whole(self, response: dict[str, Any]) -> None:
        normalize(response, self.model)

    def chunk(self, chunk: Chunk) -> list[Chunk]:
        normalize(chunk, self.model)
        return [chunk]

    def finish(self) -> list[Chunk]:
        return []


class EnvelopeBytes:
    """The envelope on relayed bytes: a non-stream body (:meth:`whole`) or SSE blocks of whole
    events (:meth:`feed`, after the stream tap). See the module docstring for what is parsed."""

    __slots__ = ("_each", "_many", "_value", "_want", "model")

    def __init__(self, model: str, *, choices: int = 1, every_event: bool = False) -> None:
        self.model = model
        self._value = orjson.dumps(model)  # the JSON string, quotes included
        self._want = _MODEL[:-1] + self._value
        self._many = choices > 1  # several finish chunks: look for the first, not the last
        self._each = every_event  # parse every event from here on

    # -- non-stream

    def whole(self, payload: bytes) -> bytes:
        """A non-stream body: parsed once (any of its fields may need a change, and a search of the
        bytes for each would cost as much as a parse), serialized again only when something changed."""
        try:
            body = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return payload
        if not isinstance(body, dict):
            return payload
        return self.whole_parsed(payload, body)

    def whole_parsed(self, payload: bytes, body: dict[str, Any]) -> bytes:
        """:meth:`whole` of a body the caller parsed already: ``payload`` itself when nothing changed."""
        return orjson.dumps(body) if normalize(body, self.model) else payload

    # -- stream

    def feed(self, block: bytes) -> bytes:
        if not block or self._each:
            return self._every(block) if block else block
        at = block.find(_FINISH) if self._many else block.rfind(_FINISH)
        if at < 0:
            return self._rename(block)
        # the chunk that ends a choice, and all that follows it (usage chunk, [DONE]): parsed
        start = last_boundary(block, at)
        head = self._rename(block[:start]) if start else b""
        self._each = True
        return head + self._every(block[start:])

    def _rename(self, block: bytes) -> bytes:
        at = block.find(_MODEL)
        if at < 0:
            if b'"model"' in block:  # written with spaces, or not a string: the exact path from here
                self._each = True
                return self._every(block)
            return block
        end = block.find(b'"', at + len(_MODEL))
        value = block[at + len(_MODEL) - 1 : end + 1]
        if end < 0 or b"\\" in value or block[at - 1 : at] not in _STRUCTURAL:
            self._each = True
            return self._every(block)
        if value == self._value:
            return block  # an upstream writes one model id in every chunk of a stream
        # every occurrence is a key "model" whose value is exactly the upstream's id (module docstring)
        return self._want.join(block.split(block[at : end + 1]))

    def _every(self, block: bytes) -> bytes:
        out: list[bytes] = []
        changed = False
        for event in _events(block):
            data = _data(event)
            if data[:1] != b"{":
                out.append(event)
                continue
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                out.append(event)
                continue
            if isinstance(chunk, dict) and normalize(chunk, self.model):
                out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
                changed = True
            else:
                out.append(event)
        return b"".join(out) if changed else block


def wants_normalized(mode: Mode) -> bool:
    return mode != "raw"


def add_envelope(transforms: list[Any], model: str, mode: Mode) -> None:
    """After every step that adds response transforms: an answer they parse anyway gets the envelope
    on the parsed dicts; an answer relayed as bytes gets :class:`EnvelopeBytes` at relay time."""
    if transforms and wants_normalized(mode):
        add_transform(transforms, EnvelopeTransform(model))


def stream_envelope(model: str, body: dict[str, Any], mode: Mode) -> EnvelopeBytes | None:
    """The byte-level envelope of a stream relayed without other transforms (None: raw tenant)."""
    if not wants_normalized(mode):
        return None
    options = body.get("stream_options")
    continuous = isinstance(options, dict) and options.get("continuous_usage_stats") is True
    n = body.get("n")
    return EnvelopeBytes(model, choices=n if type(n) is int else 1, every_event=continuous)


def body_envelope(model: str, mode: Mode) -> EnvelopeBytes | None:
    """The byte-level envelope of a non-stream answer relayed without other transforms."""
    return EnvelopeBytes(model) if wants_normalized(mode) else None
