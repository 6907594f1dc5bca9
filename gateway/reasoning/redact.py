"""Secrets and personal data in text → ``[REDACTED:<kind>]``.

One :class:`Redactor` per tenant redaction policy: the built-in detectors it enables plus its own
patterns. :meth:`Redactor.redact` is the pure whole-text API (capture uses it too);
:class:`StreamRedactor` does the same to text that arrives in pieces, holding back a bounded tail so
that a secret split across chunks is still caught. Every pattern has a bounded width (policy
patterns are checked at load), which is what makes the held tail bounded: a match that starts in
text about to be released is always complete within the tail that stays behind.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from re import _parser  # type: ignore[attr-defined]

from gateway.policy.model import DETECTORS, Redaction


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum card numbers carry: tells a card number from any other long number."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(text: str) -> bool:
    digits = re.sub(r"\D", "", text)
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


def _phone(text: str) -> bool:
    return 7 <= sum(ch.isdigit() for ch in text) <= 15


@dataclass(frozen=True, slots=True)
class Detector:
    kind: str
    pattern: re.Pattern[str]
    check: Callable[[str], bool] | None = None  # a match must also pass this (Luhn, digit count)


BUILTIN: dict[str, tuple[Detector, ...]] = {
    "email": (
        Detector(
            "email",
            re.compile(
                r"(?<![\w.+-])[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,40}){0,2}\.[A-Za-z]{2,24}(?![\w-])"
            ),
        ),
    ),
    "phone": (
        # international: +CC then groups of digits
        Detector("phone", re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,5}\)?){2,6}(?!\w)"), _phone),
        # North American style: (555) 123-4567, 555-123-4567, 555.123.4567
        Detector("phone", re.compile(r"(?<![\w(])(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\w)"), _phone),
    ),
    "api_key": (
        Detector("api_key", re.compile(r"(?<![\w-])sk-[A-Za-z0-9_-]{16,200}")),
        Detector(
            "api_key", re.compile(r"(?<!\w)(?:gh[pousr]_|github_pat_|xox[abprs]-|AIza|glpat-)[A-Za-z0-9_-]{16,200}")
        ),
    ),
    "aws_key": (
        Detector("aws_key", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}(?![A-Z0-9])")),
        Detector(
            "aws_key",
            re.compile(r"(?i)aws_secret_access_key[\"']?\s{0,3}[:=]\s{0,3}[\"']?[A-Za-z0-9/+=]{40}(?![\w/+=])"),
        ),
    ),
    "bearer_token": (
        Detector("bearer_token", re.compile(r"(?i)(?<!\w)bearer\s{1,3}[A-Za-z0-9._~+/-]{16,200}={0,2}")),
        Detector(
            "bearer_token",
            re.compile(r"(?<![\w-])eyJ[A-Za-z0-9_-]{8,100}\.eyJ[A-Za-z0-9_-]{8,300}\.[A-Za-z0-9_-]{8,100}"),
        ),
    ),
    "card_number": (Detector("card_number", re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])"), _card),),
}
assert set(BUILTIN) == set(DETECTORS), "every detector a policy may name has an implementation"


def max_width(pattern: re.Pattern[str]) -> int:
    return int(_parser.parse(pattern.pattern, pattern.flags).getwidth()[1])


Span = tuple[int, int, str]  # start, end, kind


class Redactor:
    """The detectors and patterns of one redaction policy."""

    def __init__(self, detectors: list[Detector]) -> None:
        self.detectors = detectors
        # a match never spans more than this: the tail a stream must hold back (+1 for lookahead)
        self.hold = max((max_width(d.pattern) for d in detectors), default=0) + 1

    @classmethod
    def from_policy(cls, rules: Redaction) -> Redactor:
        detectors = [d for name in rules.detectors for d in BUILTIN[name]]
        detectors += [Detector(p.kind, re.compile(p.regex)) for p in rules.patterns]
        return cls(detectors)

    def matches(self, text: str) -> list[Span]:
        """Non-overlapping matches, leftmost first (the longest one where two start together)."""
        found: list[Span] = []
        for d in self.detectors:
            for m in d.pattern.finditer(text):
                if d.check is None or d.check(m.group()):
                    found.append((m.start(), m.end(), d.kind))
        if len(found) < 2:
            return found
        found.sort(key=lambda span: (span[0], -span[1]))
        out: list[Span] = []
        end = -1
        for span in found:
            if span[0] >= end:
                out.append(span)
                end = span[1]
        return out

    def redact(self, text: str) -> str:
        """``text`` with every match replaced by ``[REDACTED:<kind>]``."""
        if not self.detectors or not text:
            return text
        return _apply(text, self.matches(text), 0, len(text))


def _apply(text: str, matches: list[Span], start: int, stop: int) -> str:
    """``text[start:stop]`` with the matches inside that span replaced."""
    parts: list[str] = []
    pos = start
    for s, e, kind in matches:
        if s < start or e > stop:
            continue
        parts.append(text[pos:s])
        parts.append(f"[REDACTED:{kind}]")
        pos = e
    parts.append(text[pos:stop])
    return "".join(parts)


_CACHE: dict[int, tuple[Redaction, Redactor]] = {}


def redactor_for(rules: Redaction) -> Redactor:
    """The compiled redactor of a policy's rules (policies are immutable; compiled once each)."""
    hit = _CACHE.get(id(rules))
    if hit is not None and hit[0] is rules:
        return hit[1]
    if len(_CACHE) > 1024:  # policies reloaded many times: forget the old ones
        _CACHE.clear()
    redactor = Redactor.from_policy(rules)
    _CACHE[id(rules)] = (rules, redactor)
    return redactor


CONTEXT = 16  # already-released characters kept for the detectors' look-behind
SLACK = 64  # release in steps of at least this many characters: the detectors run once per step, not per chunk


class StreamRedactor:
    """Redacts text that arrives in pieces; the output, joined, equals ``redact`` of the whole text.

    ``feed`` releases what can no longer be part of a secret (all but the last ``hold`` characters,
    and never the start of a match still open); ``finish`` releases the rest.
    """

    __slots__ = ("_buf", "_ctx", "_r")

    def __init__(self, redactor: Redactor) -> None:
        self._r = redactor
        self._buf = ""
        self._ctx = ""

    @property
    def held(self) -> int:
        return len(self._buf)

    def feed(self, text: str) -> str:
        self._buf += text
        hold = self._r.hold
        if len(self._buf) <= hold + SLACK:
            return ""
        return self._release(len(self._buf) - hold)

    def finish(self) -> str:
        return self._release(len(self._buf)) if self._buf else ""

    def _release(self, cut: int) -> str:
        ctx = self._ctx
        text = ctx + self._buf
        base = len(ctx)
        cut += base
        matches = [m for m in self._r.matches(text) if m[0] >= base]
        for s, e, _ in matches:
            if s < cut < e:  # a secret straddles the cut: keep all of it for later
                cut = s
                break
        out = _apply(text, matches, base, cut)
        self._ctx = text[max(0, cut - CONTEXT) : cut]
        self._buf = text[cut:]
        return out
