"""Text made storable in every backend: PostgreSQL refuses NUL in text and no driver can encode a lone
surrogate, and client-supplied strings (a ``user`` field, a captured message) may contain either.
The ledger and capture both store such text, so both clean it the same way, here."""

from __future__ import annotations


def clean_text(s: str) -> str:
    """``s`` made storable everywhere (NUL and lone surrogates replaced by U+FFFD). Returns ``s``
    itself when clean."""
    if s.isascii() and "\x00" not in s:  # nearly every value: no encode attempt needed
        return s
    if "\x00" in s:
        s = s.replace("\x00", "\ufffd")
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        s = s.encode("utf-8", "replace").decode("utf-8")
    return s


def opt_text(s: str | None) -> str | None:
    return None if s is None else clean_text(s)
