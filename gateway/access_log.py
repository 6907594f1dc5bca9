"""The access log: one JSON line per request, so an operator sees requests arrive and leave.

What a line holds is fixed here and comes only from what the gateway decided or measured: the
request id, tenant, key id (the first 12 hex digits of the key's hash, never the key), virtual
model, upstream, wire format, status, outcome, times, tokens and cost. Nothing from the request
body or its headers is copied into it, so no prompt, answer or secret can reach the log.

It is written off the request's path: :func:`record` builds the dict and appends its serialized
line (orjson; about 3 us together) to a buffer, and a timer 50 ms later hands the whole batch to a
thread that writes it to stderr. The request never waits on the write, and a slow log pipe (a
container runtime that falls behind) holds back the writer thread, not the event loop. Each ``write`` carries
whole lines of at most ``PIPE_BUF`` bytes, so the lines of several worker processes sharing one
stderr pipe never interleave mid-line.

The log is on by default and follows ``log_level``: at ``warning`` or ``error`` it is off, as any
other info line would be; ``access_log: false`` turns it off at ``info`` too.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import queue
import threading
import time
from typing import Any

import orjson

from gateway.exchange import Exchange
from gateway.observability import UNKNOWN
from gateway.upstreams.usage import Usage

FLUSH_AFTER_S = 0.05  # a line reaches stderr within this long after its request settled
MAX_PENDING = 1 << 20  # bytes held before a flush is forced (a burst never holds more than this)
PIPE_BUF = 4096  # POSIX: writes up to this size to a pipe are atomic
LOGGER = "kimi_gateway.access"
_NO_USAGE = Usage()


class AccessLog:
    """A buffer of serialized lines, the one flush scheduled for them, and the thread that writes."""

    def __init__(self, fd: int = 2) -> None:
        self.enabled = False
        self.fd = fd
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False
        # batches for the writer thread: SimpleQueue.put is one C call, where run_in_executor would
        # build two futures per batch; the thread starts with the first batch
        self._queue: queue.SimpleQueue[list[bytes] | threading.Event] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def record(self, data: bytes) -> None:
        """Queue one line; the first line of a batch schedules its flush on the running loop."""
        self._pending.append(data)
        self._size += len(data)
        if self._size >= MAX_PENDING:
            self._hand_off()
        elif not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_AFTER_S, self._hand_off)

    def _hand_off(self) -> None:
        self._scheduled = False
        batch, self._pending, self._size = self._pending, [], 0
        if batch:
            if self._writer is None:
                self._writer = threading.Thread(target=self._run, name="access-log", daemon=True)
                self._writer.start()
            self._queue.put(batch)

    def flush(self, timeout: float = 5.0) -> None:
        """Hand over what is pending and wait until the thread has written it (shutdown: nothing may
        be lost); at most ``timeout`` seconds, for a stderr that no longer drains."""
        self._hand_off()
        if self._writer is not None:
            done = threading.Event()
            self._queue.put(done)
            done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._write(item)

    def _write(self, batch: list[bytes]) -> None:
        chunk: list[bytes] = []
        size = 0
        for line in batch:
            if chunk and size + len(line) > PIPE_BUF:
                self._write_all(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        if chunk:
            self._write_all(b"".join(chunk))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError:  # stderr closed: the log is lost, the requests are not
            self.enabled = False


ACCESS = AccessLog()


def configure(enabled: bool, log_level: str) -> None:
    """Turn the log on when the config wants it and ``log_level`` lets info lines through."""
    ACCESS.enabled = enabled and log_level in ("debug", "info")


_QUOTED: dict[str, str] = {}
_STAMP: list[Any] = [-1, ""]  # the last whole second seen and its ISO text
_TEMPLATE = (
    '{"ts":"%s.%06dZ","level":"info","logger":"' + LOGGER + '","request_id":"%s","tenant":%s,"key_id":%s,'
    '"endpoint":%s,"model":%s,"upstream":%s,"stream":%s,"status":%d,"outcome":%s,"ttfb_ms":%s,"total_ms":%.2f,'
    '"prompt_tokens":%d,"cached_tokens":%d,"completion_tokens":%d,"reasoning_tokens":%d,"cost_usd":"%d.%09d",'
    '"estimated":%s}\n'
)


def _quoted(text: str | None) -> str:
    """``text`` as a JSON string (``null`` for None). Every string a line holds comes from the
    configuration (tenant, virtual model, upstream label) or a small fixed set, so each one is
    escaped once and kept; the dict is emptied if it ever holds more than 4096 of them."""
    if text is None:
        return "null"
    found = _QUOTED.get(text)
    if found is None:
        if len(_QUOTED) >= 4096:
            _QUOTED.clear()
        found = _QUOTED[text] = orjson.dumps(text).decode()
    return found


def _line(
    ts: float,
    request_id: str,
    tenant: str,
    key_id: str | None,
    endpoint: str,
    model: str | None,
    upstream: str | None,
    stream: bool | None,
    status: int,
    outcome: str,
    ttfb_ms: float | None,
    total_ms: float,
    usage: Usage | None,
    cost_nanos: int,
    estimated: bool,
) -> bytes:
    """One JSON line from one %-format of a fixed template: a single C call, where an f-string or
    a dict for ``orjson.dumps`` formats field by field (bench/RESULTS.md "Access log"; tests parse
    every line back with a JSON parser). The request id and key id are ``[a-z0-9_]`` by
    construction; every other string is escaped."""
    whole = int(ts)
    if whole != _STAMP[0]:
        _STAMP[0], _STAMP[1] = whole, datetime.datetime.fromtimestamp(whole, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S")
    u = usage if usage is not None else _NO_USAGE
    dollars, nanos = divmod(cost_nanos, 1_000_000_000)
    return (
        _TEMPLATE
        % (
            _STAMP[1], (ts - whole) * 1e6, request_id, _quoted(tenant), "null" if key_id is None else f'"{key_id}"',
            _quoted(endpoint), _quoted(model), _quoted(upstream), "null" if stream is None else _BOOL[stream], status,
            _quoted(outcome), "null" if ttfb_ms is None else _MS % ttfb_ms, total_ms, u.prompt_tokens,
            u.cached_tokens, u.completion_tokens, u.reasoning_tokens, dollars, nanos, _BOOL[estimated],
        )
    ).encode()  # fmt: skip


_BOOL = {True: "true", False: "false"}
_MS = "%.2f"


def line_of(ex: Exchange) -> bytes:
    """The access-log line of a settled request (see the module docstring for what is left out)."""
    m = ex.metered
    cost = m.cost
    return _line(
        m.ts, ex.request_id, ex.tenant.name, ex.key_id, m.endpoint, m.virtual_model, m.label or UNKNOWN, m.stream,
        m.status, m.outcome, m.ttft_ms, m.latency_ms, m.usage, cost.nanos if cost is not None else 0,
        m.estimate_reason is not None,
    )  # fmt: skip


def log_exchange(ex: Exchange) -> None:
    """The request's line, when the log is on; never raises (a log line must not fail a request)."""
    if ACCESS.enabled:
        try:
            ACCESS.record(line_of(ex))
        except Exception:  # pragma: no cover - formatting fixed-type fields does not fail
            ACCESS.enabled = False


def log_refused(request_id: str, endpoint: str, status: int, started_ms: float, tenant: str = UNKNOWN) -> None:
    """The line of a request refused before it reached the pipeline (no key, a malformed body, an
    unknown model): what is known, zeros for the rest, so a burst of refusals is visible too."""
    if ACCESS.enabled:
        line = _line(
            time.time(), request_id, tenant, None, endpoint, None, None, None, status, "rejected", None, started_ms,
            None, 0, False,
        )  # fmt: skip
        ACCESS.record(line)
