"""The lines of the ledger journal, and the row a request gets when its process died mid-way.

Three kinds of line, each one JSON array on its own line (positional: a request writes two of them on
the hot path, and an array of values encodes in half the time of an object with keys):

* ``["s", request_id, ts, tenant, key_id, app, user, tags, virtual_model, upstream, upstream_model,
  label, stream, prompt_bytes, endpoint, route_reason]``: a request is about to be sent upstream
  (again, after a failover: the last start wins). Everything its row needs except what the answer says.
* ``["p", request_id, events]``: a stream's response had begun and this many SSE events had been
  handed to the client (written with the first event, then every
  :data:`gateway.metering.journal.PROGRESS_EVERY_READS` upstream reads).
* ``["f", <the 29 LedgerRow fields in order>]``: the exact row, money as decimal strings.

:func:`interrupted_row` is the one builder of an estimated row for a request whose gateway died, for
the journal's records and for the database's open reservations alike (a replica whose journal is gone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from decimal import Decimal
from operator import attrgetter
from typing import Any

import orjson

from gateway.metering.ledger_rows import LedgerRow, OpenReservation
from gateway.metering.prices import Price, cost_of

ROW_FIELDS = tuple(f.name for f in fields(LedgerRow))
_MONEY = {ROW_FIELDS.index("cost_usd"), ROW_FIELDS.index("cache_savings_usd")}

BYTES_PER_PROMPT_TOKEN = 4
"""A journal start holds the request's size, not its text: at replay the prompt is estimated at 4
bytes of request body per token (what cl100k-style tokenizers average on English chat JSON, the
framing included). Tokenizing on the request path to record an exact count would cost more than
everything else the journal does, for a number needed only after a crash."""

INTERRUPTED = "interrupted"
RESPONSE_BEGUN_STATUS = 200  # an interrupted stream whose events had started reaching the client
NO_RESPONSE_STATUS = 0  # no status ever reached the client


@dataclass(slots=True)
class Started:
    """What a request's row needs when its gateway dies before settling it."""

    request_id: str
    ts: float
    tenant: str
    key_id: str
    app: str | None
    user: str | None
    tags: dict[str, str]
    virtual_model: str
    upstream: str | None
    upstream_model: str | None
    label: str | None
    stream: bool
    prompt_bytes: int
    endpoint: str = "chat/completions"
    route_reason: str = ""
    events: int | None = field(default=None)  # SSE events relayed (None: the response had not begun)


_START_FIELDS = tuple(f.name for f in fields(Started))[:-1]  # the progress count is not part of a start
_start_values = attrgetter(*_START_FIELDS)  # one C call instead of a Python expression per field
_row_values = attrgetter(*ROW_FIELDS)


def start_line(s: Started) -> bytes:
    return orjson.dumps(("s", *_start_values(s)), option=orjson.OPT_APPEND_NEWLINE)


def progress_line(request_id: str, events: int) -> bytes:
    return orjson.dumps(["p", request_id, events], option=orjson.OPT_APPEND_NEWLINE)


def finish_line(row: LedgerRow) -> bytes:
    values: list[Any] = list(_row_values(row))
    for i in _MONEY:
        values[i] = str(values[i])
    return orjson.dumps(["f", *values], option=orjson.OPT_APPEND_NEWLINE)


@dataclass(slots=True)
class Recovered:
    """What a dead process's journal says: exact rows, and requests that never finished."""

    finished: dict[str, LedgerRow] = field(default_factory=dict)
    started: dict[str, Started] = field(default_factory=dict)
    bad_lines: int = 0

    def unfinished(self) -> list[Started]:
        return [s for rid, s in self.started.items() if rid not in self.finished]


def read_journal(data: bytes, into: Recovered | None = None) -> Recovered:
    """Parse a journal file's bytes. A line that does not parse (the torn last write of a killed
    process, or a damaged block after a power loss) is counted and skipped: every other line stands
    on its own."""
    out = into if into is not None else Recovered()
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            rec = orjson.loads(line)
            kind = rec[0]
            if kind == "s":
                out.started[rec[1]] = Started(*rec[1:16])
            elif kind == "p":
                began = out.started.get(rec[1])
                if began is not None:
                    began.events = int(rec[2])
            elif kind == "f":
                values = rec[1:]
                for i in _MONEY:
                    values[i] = Decimal(values[i])
                row = LedgerRow(*values)
                out.finished[row.request_id] = row
            else:
                out.bad_lines += 1
        except (orjson.JSONDecodeError, TypeError, ValueError, IndexError, ArithmeticError):
            out.bad_lines += 1
    return out


def estimated_prompt_tokens(prompt_bytes: int) -> int:
    return max(1, prompt_bytes // BYTES_PER_PROMPT_TOKEN)


def interrupted_row(
    s: Started, price_of: Callable[[str, float], Price | None], reason: str, route_reason: str | None = None
) -> LedgerRow:
    """The estimated row of a request whose gateway died before settling it.

    Billed for what actually happened as far as the records show: the prompt (estimated from its
    size) plus one completion token per SSE event relayed to the client, never the ``max_tokens``
    a budget reserved. Marked ``interrupted`` and ``estimated``; a real row for the same request id
    (a replica that was only slow) replaces it.
    """
    prompt = estimated_prompt_tokens(s.prompt_bytes)
    completion = s.events or 0
    price = price_of(s.label, s.ts) if s.label else None
    cost = cost_of(price, prompt, 0, completion) if price is not None else None
    return LedgerRow(
        request_id=s.request_id,
        ts=s.ts,
        tenant=s.tenant,
        key_id=s.key_id,
        app=s.app,
        user=s.user,
        tags=s.tags,
        virtual_model=s.virtual_model,
        upstream=s.upstream,
        upstream_model=s.upstream_model,
        stream=s.stream,
        prompt_tokens=prompt,
        cached_tokens=0,
        completion_tokens=completion,
        reasoning_tokens=0,
        tool_calls_billed=0,
        cost_usd=cost.usd if cost is not None else Decimal(0),
        cache_savings_usd=Decimal(0),
        price_version=(cost.price_version or None) if cost is not None else None,
        ttft_ms=None,
        latency_ms=0.0,
        status=RESPONSE_BEGUN_STATUS if s.events is not None else NO_RESPONSE_STATUS,
        outcome=INTERRUPTED,
        estimated=True,
        estimate_reason=reason,
        route_reason=route_reason if route_reason is not None else s.route_reason,
        cost_nanos=cost.nanos if cost is not None else None,
        savings_nanos=0 if cost is not None else None,
        endpoint=s.endpoint,
    )


def reservation_estimate(res: OpenReservation, price_of: Callable[[str, float], Price | None]) -> Decimal:
    """The cost of a request known only from its open reservation in the database: its prompt at
    the candidate's price. The reservation's token count is the budget's upper bound (two bytes per
    token), so it is halved to the journal's four; what it relayed is unknown, and the ``max_tokens``
    the reservation held would be the worst case, not an estimate."""
    price = price_of(f"{res.upstream}/{res.upstream_model}", res.ts) if res.upstream else None
    if price is None:
        return Decimal(0)
    return cost_of(price, max(1, res.prompt_tokens_estimate // 2), 0, 0).usd
