"""The aggregate query behind :meth:`gateway.metering.ledger.Ledger.spend`, built once for both
dialects so SQLite and PostgreSQL answer a report with the same rows in the same order. The group
names users type and the figures every group gets are defined here too; reports use them for their
columns.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

GROUPS: dict[str, str] = {
    "tenant": "tenant",
    "app": "app",  # the app that owns the request's key (the policy's apps)
    "key": "key_id",
    "user": "end_user",  # the request's own label: the body's user (Messages: metadata.user_id)
    "model": "virtual_model",
    "upstream": "upstream",
    "upstream_key": "upstream_key",
    "endpoint": "endpoint",
    "day": "day",
    "month": "month",
}
"""Report group names (what users type) and the ledger column each one groups by."""

METRICS = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "reasoning_tokens",
    "cost_usd",
    "cache_savings_usd",
    "estimated_requests",
)
"""The figures :meth:`Ledger.spend` returns for every group, in report column order."""


def check_group_by(group_by: Sequence[str]) -> list[str]:
    """``group_by`` as a list, or ValueError naming the bad entry and the valid choices."""
    if isinstance(group_by, str):
        raise ValueError(f"group_by must be a list of names, not the string {group_by!r}")
    seen: list[str] = []
    for name in group_by:
        if name not in GROUPS:
            hint = difflib.get_close_matches(str(name), GROUPS, n=1)
            did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ValueError(f"unknown group {name!r}{did_you_mean}; choose from {', '.join(GROUPS)}")
        if name in seen:
            raise ValueError(f"group {name!r} is listed twice")
        seen.append(name)
    return seen


def build_spend_query(
    group_by: Sequence[str],
    *,
    since: float | None,
    until: float | None,
    tenant: str | None,
    cost_col: str,
    savings_col: str,
    placeholder: Callable[[int], str],
    collate: str,
) -> tuple[str, list[Any]]:
    """The aggregate query behind :meth:`Ledger.spend`, for either dialect.

    ``since`` is inclusive and ``until`` exclusive, so consecutive periods never count a row twice.
    Ordering is by code point with NULLs last on both databases (``collate`` gives PostgreSQL the "C"
    collation), so SQLite and PostgreSQL return the same rows in the same order.
    """
    cols = [GROUPS[g] for g in group_by]
    select = [f'{c} AS "{g}"' for g, c in zip(group_by, cols, strict=True)]
    select += [
        "COUNT(*) AS requests",
        "COALESCE(SUM(prompt_tokens), 0) AS prompt_tokens",
        "COALESCE(SUM(cached_tokens), 0) AS cached_tokens",
        "COALESCE(SUM(completion_tokens), 0) AS completion_tokens",
        "COALESCE(SUM(reasoning_tokens), 0) AS reasoning_tokens",
        f"COALESCE(SUM({cost_col}), 0) AS cost_usd",
        f"COALESCE(SUM({savings_col}), 0) AS cache_savings_usd",
        "COALESCE(SUM(CASE WHEN estimated THEN 1 ELSE 0 END), 0) AS estimated_requests",
    ]
    where: list[str] = []
    params: list[Any] = []
    for cond, value in (("ts >= {}", since), ("ts < {}", until), ("tenant = {}", tenant)):
        if value is not None:
            params.append(float(value) if cond.startswith("ts") else value)
            where.append(cond.format(placeholder(len(params))))
    sql = f"SELECT {', '.join(select)} FROM ledger"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if cols:
        sql += " GROUP BY " + ", ".join(cols)
        sql += " ORDER BY " + ", ".join(f"{c}{collate} NULLS LAST" for c in cols)
    return sql, params
