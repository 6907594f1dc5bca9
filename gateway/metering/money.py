"""Money is ``Decimal`` end to end, never float.

A float cannot hold 0.1 exactly and its sums drift, which finance notices. Amounts are rounded once,
to the nanodollar (:data:`NANO`), with banker's rounding; stores that lack an exact decimal type
(SQLite, Redis counters) keep integer nanodollars, which are exact and add up exactly in SQL.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Context, Decimal

USD = Decimal
"""Type alias used in signatures to say "this Decimal is an amount of US dollars"."""

NANO = Decimal("0.000000001")
"""The quantum: every stored amount is a whole number of nanodollars (1e-9 USD)."""

# 28 digits (the default context) would cap amounts near 1e19 nanodollars; a wider private context
# keeps quantize() from ever raising on a large but legitimate total.
_CTX = Context(prec=60, rounding=ROUND_HALF_EVEN)


def _check(d: Decimal | int) -> Decimal:
    if isinstance(d, bool) or not isinstance(d, (Decimal, int)):
        raise TypeError(f"money must be a Decimal (or int), not {type(d).__name__}: {d!r}")
    value = Decimal(d)
    if not value.is_finite():
        raise ValueError(f"money must be a finite amount, not {value}")
    return value


_NANOS_PER_USD = 1_000_000_000
_FAST_DIGITS = 40


def whole_units(d: Decimal, per_usd: int) -> int | None:
    """``d`` USD in whole units of ``1 / per_usd`` USD (nanodollars, femtodollars), or None when it is
    not a whole number of them. Its exact ratio says so in one C call, a third of quantize + scaleb;
    bounded magnitudes only (the ratio of 1E-999999 would be a million-digit integer), None beyond."""
    if not d.is_finite() or not -_FAST_DIGITS < d.adjusted() < _FAST_DIGITS:
        return None
    num, den = d.as_integer_ratio()
    return None if per_usd % den else num * (per_usd // den)


def to_nanos(d: Decimal | int) -> int:
    """Whole nanodollars in ``d`` USD, rounded half-to-even (exact for any finite amount)."""
    if type(d) is Decimal and d.is_finite():
        # every amount settled per request is already whole nanodollars (costs are quantized once)
        if (nanos := whole_units(d, _NANOS_PER_USD)) is not None:
            return nanos
        q = d.quantize(NANO, context=_CTX)
    else:
        q = _check(d).quantize(NANO, context=_CTX)
    return int(q.scaleb(9, context=_CTX))


def from_nanos(n: int) -> Decimal:
    """The USD amount of ``n`` nanodollars, with nine decimal places (``from_nanos(1) == NANO``)."""
    if type(n) is not int and (isinstance(n, bool) or not isinstance(n, int)):
        raise TypeError(f"nanodollars must be an int, not {type(n).__name__}: {n!r}")
    # one exact multiplication in the 60-digit context instead of Decimal(n).scaleb(-9)'s two
    # operations: the same value and exponent in half the time
    return _CTX.multiply(NANO, n)


def usd_text(nanos: int) -> str:
    """``f"{from_nanos(nanos):f}"`` from integers alone (``12_345`` -> ``"0.000012345"``): the cost
    header of every response, where formatting a Decimal was the dearer half."""
    sign, n = ("-", -nanos) if nanos < 0 else ("", nanos)
    whole, frac = divmod(n, _NANOS_PER_USD)
    return f"{sign}{whole}.{frac:09d}"


def quantize_usd(d: Decimal | int) -> Decimal:
    """``d`` rounded to the nanodollar the way storage will round it (what a round trip returns)."""
    return from_nanos(to_nanos(d))


def fmt_usd(d: Decimal | int, places: int = 6) -> str:
    """A human-readable amount (no currency sign, no exponent), rounded half-to-even to ``places``.

    For people (tables, logs); exports use ``str()`` of the full nine-place amount instead.
    """
    if places < 0:
        raise ValueError(f"places must be >= 0, not {places}")
    q = _check(d).quantize(Decimal(1).scaleb(-places), context=_CTX)
    if q.is_zero():
        q = abs(q)  # never print "-0.000000"
    return f"{q:f}"


__all__ = ["NANO", "USD", "fmt_usd", "from_nanos", "quantize_usd", "to_nanos", "usd_text", "whole_units"]
