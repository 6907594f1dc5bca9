"""Small pieces the Anthropic translation modules share: what was left out, and type names.

A Messages request can carry features no chat/completions upstream has (server tools, some
context-management edits, fields of later API versions). They are not refused — a real client
such as Claude Code sends them on every request — but left out and named, in request order, in the
``x-gateway-ignored`` response header: ``tools.3 (web_search_20250305), top_k``.
"""

from __future__ import annotations

from typing import Any

IGNORED_HEADER = b"x-gateway-ignored"
MAX_SHOWN = 24  # entries in the header; the rest is counted


def kind_of(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


class Notes:
    """The parts of a request the gateway accepted but did not send upstream."""

    __slots__ = ("ignored",)

    def __init__(self) -> None:
        self.ignored: list[str] = []

    def ignore(self, where: str, what: str | None = None) -> None:
        self.ignored.append(f"{where} ({what})" if what else where)

    def header(self) -> tuple[bytes, bytes] | None:
        """The response header naming them, or None when nothing was left out."""
        if not self.ignored:
            return None
        shown = self.ignored[:MAX_SHOWN]
        more = len(self.ignored) - len(shown)
        value = ", ".join(shown) + (f", and {more} more" if more > 0 else "")
        return IGNORED_HEADER, value.encode("ascii", "replace")
