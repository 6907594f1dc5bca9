"""chat/completions SSE → the Responses API's streaming events (``POST /v1/responses``).

The pipeline relays chat.completion.chunk events (cut wherever the network cut them); this turns
them into the documented event sequence, each ``event: <type>`` with a ``sequence_number`` from 0:
``response.created``, ``response.in_progress``; per output item ``response.output_item.added``,
its content events (reasoning summary part and text deltas, message content part and
``output_text`` deltas, function call argument deltas), their ``.done`` events and
``response.output_item.done``; then ``response.completed`` (or ``response.incomplete`` when the
answer hit ``max_tokens``) with the whole object — the one ``to_response`` gives for the same
answer, built from the same pieces. An upstream failure (the relay's error event, or a stream that
ends before its finish) is ``response.failed`` with ``error: {code, message}`` and the items so
far: the lifecycle event Codex, the openai SDK and openai-agents all end a stream on (none of them
needs a separate ``error`` event).

Items are written one at a time, as OpenAI writes them: a new kind of output closes the open item.
Each chunk is parsed once; delta events are byte templates made when their item opens. Nearly every
chunk of an answer is one text or reasoning delta and nothing else: for those only the delta's
JSON string is decoded (one chunk's bytes, valid JSON, go out again as they came), and the
consecutive deltas of one item that arrive in one block go out as one delta event, their texts
joined. So a stream costs per event while the gateway keeps up with the upstream, and per block
(per read of the upstream's socket) when it falls behind — which is when the cost matters
(bench/RESULTS.md, "Responses API"). Clients join deltas as they come; fewer, longer deltas give
them the same text. A chunk the byte test is not sure of takes the general path, which parses it
whole, so the two paths give the same events.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.metering.stream import _data, _events
from gateway.translate.responses_output import (
    arguments_text,
    call_item,
    envelope,
    failure,
    item_id,
    message_item,
    name_call,
    output_text,
    reasoning_item,
    responses_usage,
    sealed,
    shown_reasoning,
    status_of,
)
from gateway.translate.responses_types import ResponseContext
from gateway.upstreams.sse import chunk_of, last_boundary
from gateway.upstreams.usage import Usage, parse_usage

_DONE = b"[DONE]"
# a delta-only chunk of choice 0: ``{...,"choices":[{"index":0,"delta":{"<field>":"..."}`` + one of
# the endings Moonshot / the aggregators and vLLM write while the answer is still going; the cuts
# keep the string's closing quote
_CHOICE0 = b'"choices":[{"index":0,"delta":{"'
_CHOICE0_LEN = len(_CHOICE0)
_END_MOONSHOT = b'"},"finish_reason":null}]}'
_END_VLLM = b'"},"logprobs":null,"finish_reason":null}]}'
_CUT_MOONSHOT = 1 - len(_END_MOONSHOT)
_CUT_VLLM = 1 - len(_END_VLLM)
_CUT = "the upstream ended the stream before the answer was complete"


def _delta_prefix(kind: str, fields: dict[str, Any]) -> bytes:
    """``event: kind`` + the event's JSON up to its ``"delta":`` value."""
    head = orjson.dumps({"type": kind, **fields})[:-1]
    return b"event: " + kind.encode() + b"\ndata: " + head + b',"delta":'


class _Item:
    """The open output item: its kind, place, id, text so far and delta template."""

    __slots__ = ("at", "id", "kind", "parts", "prefix", "suffix")

    def __init__(self, kind: str, at: int, iid: str, prefix: bytes, suffix: bytes) -> None:
        self.kind = kind
        self.at = at
        self.id = iid
        self.parts: list[str] = []
        self.prefix = prefix
        self.suffix = suffix


class ResponsesStream:
    """chat/completions SSE blocks in (choice 0), Responses SSE bytes out."""

    __slots__ = (
        "_calls",
        "_ctx",
        "_done",
        "_finish",
        "_head",
        "_open",
        "_output",
        "_reasoned",
        "_rest",
        "_seq",
        "_started",
        "_usage",
    )

    def __init__(self, ctx: ResponseContext) -> None:
        self._ctx = ctx
        self._seq = 0
        self._started = False
        self._done = False
        self._rest = b""
        self._head = b""  # the bytes every delta-only chunk of this stream begins with, once seen
        self._output: list[dict[str, Any]] = []  # every item opened so far, in output_index order
        self._open: _Item | None = None
        self._calls: dict[int, _Item] = {}  # chat tool call index -> its item
        self._reasoned = False  # a reasoning item was written (the sealed one goes on the first)
        self._finish: Any = None
        self._usage: Usage | None = None

    # -- input

    # False sends every chunk through the general path (tests compare the two)
    fast = True

    def feed(self, block: bytes) -> bytes:
        """The Responses events for the complete chat events now available (maybe ``b""``)."""
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        data = self._rest + block if self._rest else block
        if b"\r" in data:  # CRLF framing, which no upstream here writes: the general path
            cut = last_boundary(data)
            self._rest = data[cut:]
            for event in _events(data[:cut]):
                self._event(_data(event), out)
            return b"".join(out)
        events = data.split(b"\n\n")
        self._rest = events.pop()  # what follows the last blank line: b"" or an unfinished event
        # consecutive delta-only chunks of one kind (reasoning or text) in this block become one delta
        # event: the texts joined, as a client joins them; ``run`` is that kind (None: nothing held)
        run: bool | None = None
        literals: list[bytes] = []
        texts: list[str] = []
        fast = self.fast
        for event in events:
            # a delta-only chunk of choice 0 (see _CHOICE0), tested on its bytes only
            if fast and not self._done:
                if event.endswith(_END_MOONSHOT):
                    end = _CUT_MOONSHOT
                elif event.endswith(_END_VLLM):
                    end = _CUT_VLLM
                else:
                    end = 0
                # every chunk of a stream starts the same (id, object, created, model): once one head
                # passed the tests below, the next chunk with that head needs no other
                head = self._head
                if end and head and event.startswith(head):
                    at = len(head)
                else:
                    at = event.find(_CHOICE0) if end else -1
                    # the fields before ``choices`` are ignored, as the general path does, unless
                    # they are these
                    if (
                        at > 0
                        and event.startswith(b"data: {")
                        and event.find(b'"usage"', 0, at) < 0
                        and event.find(b'"error"', 0, at) < 0
                    ):
                        at += _CHOICE0_LEN
                        self._head = event[:at]
                    else:
                        at = -1
                if at > 0:
                    if event.startswith(b'content":', at):
                        reasoning, at = False, at + 9
                    elif event.startswith(b'reasoning_content":', at):
                        reasoning, at = True, at + 19
                    elif event.startswith(b'reasoning":', at):
                        reasoning, at = True, at + 11
                    else:
                        at = -1
                    if at > 0:
                        literal = event[at:end]
                        try:  # fails when the value is more than one string: more than one field
                            text = orjson.loads(literal)
                        except orjson.JSONDecodeError:
                            text = None
                        if type(text) is str:
                            if text:
                                if run is not reasoning and run is not None:
                                    self._held(run, literals, texts, out)
                                run = reasoning
                                literals.append(literal)
                                texts.append(text)
                            continue
            if run is not None:
                self._held(run, literals, texts, out)
                run = None
            self._event(_data(event), out)
        if run is not None:
            self._held(run, literals, texts, out)
        return b"".join(out)

    def _held(self, reasoning: bool, literals: list[bytes], texts: list[str], out: list[bytes]) -> None:
        """Write the delta chunks held by ``feed`` as one delta event, then forget them. One chunk's
        JSON string goes out as the upstream encoded it (valid JSON); several are joined and encoded."""
        if len(texts) == 1:
            text, literal = texts[0], literals[0]
        else:
            text = "".join(texts)
            literal = orjson.dumps(text)
        literals.clear()
        texts.clear()
        if reasoning:
            self._reasoning(text, out, literal)
        else:
            self._text(text, out, literal)

    def close(self) -> bytes:
        """The end of the relayed stream: finish the response if nothing else did."""
        out: list[bytes] = []
        if not self._started:
            self._start(out)
        rest, self._rest = self._rest.strip(), b""
        if rest.startswith(b"{"):  # not SSE: an error body the pipeline answered instead of a stream
            self._event(rest, out)
        elif rest:
            self._event(_data(rest), out)
        if not self._done:
            if self._finish is not None:
                self._complete(out)
            else:
                self._fail({"code": "server_error", "message": _CUT}, out)
        return b"".join(out)

    def _event(self, data: bytes, out: list[bytes]) -> None:
        if self._done or not data:
            return
        if data == _DONE:  # the upstream's own end: whatever it said is the answer
            self._complete(out)
            return
        chunk = chunk_of(data)
        if chunk is None:
            return
        error = chunk.get("error")
        if error is not None:
            # after the finish the answer is whole: only its end was lost (usage, [DONE])
            if self._finish is not None:
                self._complete(out)
            else:
                self._fail(failure(error), out)
            return
        usage = chunk.get("usage")
        if usage is not None and (found := parse_usage(usage)) is not None:
            self._usage = found
        for choice in chunk.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                self._choice(choice, out)

    def _choice(self, choice: dict[str, Any], out: list[bytes]) -> None:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            thinking = shown_reasoning(delta)
            if thinking:
                self._reasoning(thinking, out)
            text = delta.get("content")
            if isinstance(text, str) and text:
                self._text(text, out)
            for frag in delta.get("tool_calls") or ():
                if isinstance(frag, dict):
                    self._tool(frag, out)
        finish = choice.get("finish_reason")
        if finish is not None:
            self._finish = finish
        usage = choice.get("usage")  # Moonshot: usage inside the last choice
        if usage is not None and (found := parse_usage(usage)) is not None:
            self._usage = found

    # -- events

    def _emit(self, payload: dict[str, Any], out: list[bytes]) -> None:
        payload["sequence_number"] = self._seq
        self._seq += 1
        out.append(b"event: " + payload["type"].encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n")

    def _delta(self, item: _Item, text: str, out: list[bytes], literal: bytes | None = None) -> None:
        """One delta event; ``literal`` is ``text`` as the upstream encoded it (valid JSON), reused."""
        item.parts.append(text)
        encoded = orjson.dumps(text) if literal is None else literal
        out.append(item.prefix + encoded + item.suffix + str(self._seq).encode() + b"}\n\n")
        self._seq += 1

    def _start(self, out: list[bytes]) -> None:
        """``response.created`` and ``response.in_progress``: the same object, encoded once."""
        self._started = True
        response = orjson.dumps(envelope(self._ctx, "in_progress", [], None))
        for kind in (b"response.created", b"response.in_progress"):
            out.append(
                b"event: " + kind + b'\ndata: {"type":"' + kind + b'","response":' + response
                + b',"sequence_number":' + str(self._seq).encode() + b"}\n\n"
            )  # fmt: skip
            self._seq += 1

    def _added(self, item: dict[str, Any], out: list[bytes]) -> int:
        at = len(self._output)
        self._output.append(item)
        self._emit({"type": "response.output_item.added", "output_index": at, "item": item}, out)
        return at

    def _item_done(self, at: int, item: dict[str, Any], out: list[bytes]) -> None:
        self._output[at] = item
        self._emit({"type": "response.output_item.done", "output_index": at, "item": item}, out)

    # -- items

    def _reasoning(self, text: str, out: list[bytes], literal: bytes | None = None) -> None:
        item = self._open
        if item is None or item.kind != "reasoning":
            self._close(out)
            at = len(self._output)
            rid = item_id(self._ctx, "rs", at)
            self._added(reasoning_item(rid, "", None), out)
            where = {"item_id": rid, "output_index": at, "summary_index": 0}
            part = {"type": "summary_text", "text": ""}
            self._emit({"type": "response.reasoning_summary_part.added", **where, "part": part}, out)
            prefix = _delta_prefix("response.reasoning_summary_text.delta", where)
            item = self._open = _Item("reasoning", at, rid, prefix, b',"sequence_number":')
        self._delta(item, text, out, literal)

    def _before_answer(self, out: list[bytes]) -> None:
        """A turn whose reasoning the client does not see still carries it sealed, first."""
        if self._reasoned:
            return
        self._reasoned = True
        blob = sealed(self._ctx, "")
        if blob is not None:
            at = len(self._output)
            item = reasoning_item(item_id(self._ctx, "rs", at), "", blob)
            self._added(item, out)
            self._item_done(at, item, out)

    def _text(self, text: str, out: list[bytes], literal: bytes | None = None) -> None:
        item = self._open
        if item is None or item.kind != "message":
            self._close(out)
            self._before_answer(out)
            item = self._open_message(out)
        self._delta(item, text, out, literal)

    def _open_message(self, out: list[bytes]) -> _Item:
        at = len(self._output)
        mid = item_id(self._ctx, "msg", at)
        self._added(message_item(mid, None, "in_progress"), out)
        where = {"item_id": mid, "output_index": at, "content_index": 0}
        self._emit({"type": "response.content_part.added", **where, "part": output_text("")}, out)
        prefix = _delta_prefix("response.output_text.delta", where)
        item = self._open = _Item("message", at, mid, prefix, b',"logprobs":[],"sequence_number":')
        return item

    def _tool(self, frag: dict[str, Any], out: list[bytes]) -> None:
        index = frag.get("index", 0)
        found = frag.get("function")
        function: dict[str, Any] = found if isinstance(found, dict) else {}
        arguments = arguments_text(function.get("arguments"))
        item = self._calls.get(index)
        if item is not None and frag.get("id") and frag["id"] != self._output[item.at]["call_id"]:
            item = None  # a whole new call under a reused index (upstreams that send each call whole)
        if item is None:
            self._close(out)
            self._before_answer(out)
            at = len(self._output)
            fid = item_id(self._ctx, "fc", at)
            call_id = str(frag.get("id") or item_id(self._ctx, "call", at))
            self._added(call_item(self._ctx, fid, call_id, str(function.get("name") or ""), "", "in_progress"), out)
            prefix = _delta_prefix("response.function_call_arguments.delta", {"item_id": fid, "output_index": at})
            item = self._calls[index] = self._open = _Item("call", at, fid, prefix, b',"sequence_number":')
        elif function.get("name") and not self._output[item.at]["name"]:  # a name sent after the id
            name_call(self._ctx, self._output[item.at], str(function["name"]))
        if not arguments:
            return
        if item is self._open:
            self._delta(item, arguments, out)
        else:  # a fragment for a call already written out: keep it for the final object
            self._output[item.at]["arguments"] += arguments

    def _close(self, out: list[bytes], status: str = "completed") -> None:
        item = self._open
        if item is None:
            return
        self._open = None
        text = "".join(item.parts)
        at, iid = item.at, item.id
        if item.kind == "reasoning":
            where = {"item_id": iid, "output_index": at, "summary_index": 0}
            self._emit({"type": "response.reasoning_summary_text.done", **where, "text": text}, out)
            part = {"type": "summary_text", "text": text}
            self._emit({"type": "response.reasoning_summary_part.done", **where, "part": part}, out)
            blob = None
            if not self._reasoned:
                self._reasoned = True
                blob = sealed(self._ctx, text)
            self._item_done(at, reasoning_item(iid, text, blob), out)
        elif item.kind == "message":
            where = {"item_id": iid, "output_index": at, "content_index": 0}
            self._emit({"type": "response.output_text.done", **where, "text": text, "logprobs": []}, out)
            self._emit({"type": "response.content_part.done", **where, "part": output_text(text)}, out)
            self._item_done(at, message_item(iid, text, status), out)
        else:
            done = dict(self._output[at], arguments=text, status=status)
            self._emit(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": iid,
                    "output_index": at,
                    "arguments": text,
                },
                out,
            )
            self._item_done(at, done, out)

    # -- the end

    def _complete(self, out: list[bytes]) -> None:
        status, reason = status_of(self._finish)
        self._close(out, status)
        self._before_answer(out)
        if status == "completed" and not any(i["type"] in ("message", "function_call") for i in self._output):
            self._open_message(out)  # an empty answer is still a message, as the non-stream one
            self._close(out, status)
        usage = responses_usage(self._usage)
        self._end(
            "response.completed" if status == "completed" else "response.incomplete", status, usage, None, reason, out
        )

    def _fail(self, error: dict[str, Any], out: list[bytes]) -> None:
        item = self._open
        if item is not None:  # the item being written stays in the output as far as it got
            text = "".join(item.parts)
            if item.kind == "reasoning":
                self._output[item.at] = reasoning_item(item.id, text, None)
            elif item.kind == "message":
                self._output[item.at] = message_item(item.id, text, "incomplete")
            else:
                self._output[item.at] = dict(self._output[item.at], arguments=text, status="incomplete")
            self._open = None
        usage = responses_usage(self._usage) if self._usage is not None else None
        self._end("response.failed", "failed", usage, error, None, out)

    def _end(
        self,
        kind: str,
        status: str,
        usage: dict[str, Any] | None,
        error: dict[str, Any] | None,
        reason: str | None,
        out: list[bytes],
    ) -> None:
        self._done = True
        response = envelope(self._ctx, status, self._output, usage, error=error, incomplete=reason)
        if self._ctx.on_done is not None:
            self._ctx.on_done(response)
        self._emit({"type": kind, "response": response}, out)
