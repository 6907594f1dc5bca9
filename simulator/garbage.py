"""Injected 200s that are not answers, as a misbehaving proxy or a broken provider sends them.

Each kind has a non-stream and a stream form, so a gateway's validation can be tested both ways:

* ``html``: a proxy's HTML error page, ``text/html``, whatever was asked.
* ``truncated``: non-stream, the first half of the real JSON body; stream, the first
  ``garbage_after_events`` events, then a clean end of the response (no finish, no ``[DONE]``).
* ``not_json``: a ``data:`` line that is not JSON (non-stream: a body that is not JSON).
* ``wrong_shape``: valid JSON that is no chat completion (an event, or a body, without ``choices``).
* ``html_mid``: an HTML page in the middle of the answer (between two events; inside the body).
* ``text_plain``: the real answer labelled ``text/plain``.
* ``no_done``: not garbage but a quirk to tolerate: the real stream without its ``[DONE]`` (it ends
  cleanly after the finish and usage chunks); non-stream, the real body.

In a stream the injected event comes after ``garbage_after_events`` real ones (default 2: the role
chunk and the first delta, the same place ``stall_mid_s`` pauses, so the two combine into garbage
that arrives after the first bytes went to the client); 0 puts it before any real event.
"""

from __future__ import annotations

KINDS = ("html", "truncated", "not_json", "wrong_shape", "html_mid", "text_plain", "no_done")
DEFAULT_AFTER = 2

# what a proxy in front of a provider answers with a 200 when the provider behind it is gone
HTML_PAGE = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>\n"

_EVENTS = {
    "not_json": b"data: upstream hiccup, not json\n\n",
    "wrong_shape": b'data: {"object":"keepalive","status":"processing"}\n\n',
    "html_mid": b"<html>\n<body><h1>502 Bad Gateway</h1></body>\n</html>\n\n",
}


def garbage_body(kind: str, real: bytes) -> bytes:
    """The non-stream body of ``kind`` in place of the ``real`` one."""
    if kind == "truncated":
        return real[: len(real) // 2]
    if kind == "not_json":
        return b"upstream hiccup, not json"
    if kind == "wrong_shape":
        return b'{"object":"keepalive","status":"processing"}'
    if kind == "html_mid":
        half = len(real) // 2
        return real[:half] + HTML_PAGE + real[half:]
    return real  # text_plain: the real body, mislabelled; no_done: the real body


def garbage_stream(
    kind: str, events: list[bytes], tokens: list[int], after: int | None
) -> tuple[list[bytes], list[int]]:
    """The stream's events (and the tokens each carries) with ``kind`` injected after ``after`` real
    events. A truncated stream's last element is ``b""``: the stream ends there, cleanly."""
    at = min(DEFAULT_AFTER if after is None else after, len(events) - 1)
    if kind == "truncated":
        return [*events[:at], b""], [*tokens[:at], 0]
    if kind == "no_done":
        return [*events[:-1], b""], [*tokens[:-1], 0]
    if kind in _EVENTS:
        return [*events[:at], _EVENTS[kind], *events[at:]], [*tokens[:at], 0, *tokens[at:]]
    return events, tokens  # text_plain: the real events, mislabelled


def garbage_type(kind: str, stream: bool) -> str:
    if kind == "html":
        return "text/html"
    if kind == "text_plain":
        return "text/plain"
    return "text/event-stream" if stream else "application/json"
