"""The ledger's entries and how they are prepared for storage, shared by both backends.

A :class:`LedgerRow` is one settled request; an :class:`OpenReservation` is budget held for a request
in flight, persisted so a crash cannot make its spend vanish. The pure helpers here (UTC day and
month, JSON text, the one-line dump of an entry the database refused) are what keeps the SQLite and
PostgreSQL encoders identical in behaviour; the writer (:mod:`gateway.metering.ledger`) and the
backends import them from here.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

OUTCOMES = frozenset(
    {
        "ok",
        "upstream_error",
        "invalid_response",
        "cut",
        "client_cancelled",
        "client_closed",
        "timeout",
        "rejected",
        "interrupted",
    }
    | {"crashed"}  # what rows rebuilt after a crash said before "interrupted"; older ledgers hold them
)
"""``invalid_response``: an upstream's 200 that was not an answer (never billed as a success);
``client_cancelled``: the client went away while the answer was coming (billed for what was relayed);
``client_closed``: it went away before its request body was in (nothing was sent upstream);
``interrupted``: the gateway died before settling the request (an estimated row rebuilt at start-up)."""

RECONCILED_STATUS = 0
"""HTTP status of a row made from an orphaned reservation: no client ever got a status. A real row for
the same request (a replica that was only slow, not dead) replaces an ``interrupted`` estimate instead
of being refused as a duplicate."""


@dataclass(slots=True)
class LedgerRow:
    """One request, as finance sees it. ``day``/``month`` (UTC) are derived from ``ts`` when stored."""

    request_id: str
    ts: float  # unix seconds, UTC
    tenant: str
    key_id: str  # first 12 hex digits of the key hash; never the key
    app: str | None
    user: str | None  # the request's `user` field
    tags: dict[str, str]
    virtual_model: str
    upstream: str | None
    upstream_model: str | None
    stream: bool
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    tool_calls_billed: int
    cost_usd: Decimal
    cache_savings_usd: Decimal
    price_version: str | None
    ttft_ms: float | None
    latency_ms: float
    status: int  # HTTP status the client got (499 = client went away, 0 = reconciled after a crash)
    outcome: str  # one of OUTCOMES
    estimated: bool
    estimate_reason: str | None
    route_reason: str
    # cost_usd and cache_savings_usd in whole nanodollars when the producer has them already (the
    # meter's integer cost); stores that keep nanodollars then skip converting the Decimals again
    cost_nanos: int | None = field(default=None, compare=False, repr=False)
    savings_nanos: int | None = field(default=None, compare=False, repr=False)
    # the wire format the client spoke: chat/completions, messages (Anthropic) or responses
    endpoint: str = "chat/completions"
    # the label of the upstream pool key that served it (None: the upstream has one key)
    upstream_key: str | None = None


@dataclass(slots=True)
class OpenReservation:
    """Budget held for a request in flight; persisted so a crash cannot make its spend vanish."""

    request_id: str
    ts: float
    tenant: str
    key_id: str
    app: str | None
    virtual_model: str
    upstream: str | None
    upstream_model: str | None
    amount_usd: Decimal
    prompt_tokens_estimate: int
    windows: list[str] = field(default_factory=list)
    endpoint: str = "chat/completions"


Entry = LedgerRow | OpenReservation


@functools.lru_cache(maxsize=64)
def _utc_day(day_number: int) -> tuple[str, str]:
    day = (dt.date(1970, 1, 1) + dt.timedelta(days=day_number)).isoformat()
    return day, day[:7]


def utc_day_month(ts: float) -> tuple[str, str]:
    """``('YYYY-MM-DD', 'YYYY-MM')`` of a unix time, in UTC: the columns reports group by.

    Every row needs them and consecutive rows share a day, so days are computed once each.
    """
    return _utc_day(int(ts // 86400))


def dump_json(value: Any) -> str:
    """Tags and windows as JSON text: sorted keys so equal tags give equal text."""
    if not value:
        return "{}" if isinstance(value, dict) else "[]"
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def entry_json(entry: Entry) -> str:
    """An entry as one JSON line, so an entry that could not be stored can be recovered from the log."""
    kind = "ledger_row" if isinstance(entry, LedgerRow) else "open_reservation"
    try:
        doc = {"kind": kind, **asdict(entry)}
        try:
            return orjson.dumps(doc, default=str).decode()
        except TypeError:  # e.g. an int beyond 64 bits: the slower encoder copes
            return json.dumps(doc, default=str, ensure_ascii=False)
    except Exception:  # this runs on error paths; it must never raise
        return repr(entry)


class BadEntry(Exception):
    """An entry that cannot even be encoded for storage (a float amount, a value out of range):
    retrying cannot help, so the writer isolates it, logs it and moves on."""


def encode_all(encode: Callable[[T], tuple[Any, ...]], entries: Sequence[T]) -> list[tuple[Any, ...]]:
    """``encode`` of every entry; a failure is a :class:`BadEntry`, never mistaken for an outage."""
    try:
        return [encode(e) for e in entries]
    except (TypeError, ValueError, ArithmeticError) as exc:
        raise BadEntry(repr(exc)) from exc


def reconciled_row(res: OpenReservation, cost: Decimal, reason: str) -> LedgerRow:
    """The estimated row standing in for a request whose gateway died before settling it, made from
    the database's open reservation (a replica whose journal is gone; the journal's own records make
    a fuller one, :func:`gateway.metering.journal_records.interrupted_row`)."""
    return LedgerRow(
        request_id=res.request_id,
        ts=res.ts,
        tenant=res.tenant,
        key_id=res.key_id,
        app=res.app,
        user=None,
        tags={},
        virtual_model=res.virtual_model,
        upstream=res.upstream,
        upstream_model=res.upstream_model,
        stream=False,
        prompt_tokens=res.prompt_tokens_estimate,
        cached_tokens=0,
        completion_tokens=0,
        reasoning_tokens=0,
        tool_calls_billed=0,
        cost_usd=cost,
        cache_savings_usd=Decimal(0),
        price_version=None,
        ttft_ms=None,
        latency_ms=0.0,
        status=RECONCILED_STATUS,
        outcome="interrupted",
        estimated=True,
        estimate_reason=reason,
        route_reason="reconciled from an open reservation",
        endpoint=res.endpoint,
    )
