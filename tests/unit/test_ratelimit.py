"""Rate limits alone: which limits apply to a key, OpenAI's reset format, the tightest limit in the
headers, and refusals that say when to come back (or that the request can never fit)."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.observability import REGISTRY
from gateway.policy.model import RateLimits
from gateway.ratelimit import RateLimiter, format_reset
from gateway.state.memory import MemoryRateLimitState

KEY = "sha256:" + "c" * 64


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.0004, "1ms"), (0.25, "250ms"), (1.2, "2s"), (65, "1m5s")])
def test_reset_uses_openai_durations(seconds: float, text: str) -> None:
    assert format_reset(seconds) == text


def test_limits_for_a_named_key_and_for_every_other_key() -> None:
    rules = RateLimits(rpm=100, keys={KEY: {"tpm": 50}, "*": {"rpm": 5}})
    limiter = RateLimiter(MemoryRateLimitState())
    named = limiter.limits_for("t", rules, "c" * 12, tokens=40)
    assert [(lim.key, lim.limit, lim.amount) for lim in named] == [
        ("rate:t:tenant:rpm", 100, 1),
        (f"rate:t:key={'c' * 12}:tpm", 50, 40),
    ]
    other = limiter.limits_for("t", rules, "d" * 12, tokens=40)
    assert [lim.key for lim in other] == ["rate:t:tenant:rpm", f"rate:t:key={'d' * 12}:rpm"]


async def test_headers_report_the_tightest_limit_and_refusals_say_when() -> None:
    limiter = RateLimiter(MemoryRateLimitState())
    rules = RateLimits(rpm=100, keys={"*": {"rpm": 2}})
    first = await limiter.admit("t", rules, "k1", tokens=10)
    assert first is not None and dict(first.headers)[b"x-ratelimit-limit-requests"] == b"2"
    await limiter.admit("t", rules, "k1", tokens=10)
    with pytest.raises(GatewayError) as refused:
        await limiter.admit("t", rules, "k1", tokens=10)
    error = refused.value
    headers = dict(error.headers)
    assert error.status == 429 and error.code == "rate_limit_exceeded" and error.type == "requests"
    assert "key k1 of tenant 't'" in error.message and "Limit 2" in error.message
    assert 1 <= int(headers[b"retry-after"]) <= 120 and int(headers[b"retry-after-ms"]) > 0
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert await limiter.admit("t", rules, "k2", tokens=10) is not None  # another key is unaffected


async def test_a_request_that_can_never_fit_is_told_so() -> None:
    limiter = RateLimiter(MemoryRateLimitState())
    with pytest.raises(GatewayError) as refused:
        await limiter.admit("t", RateLimits(tpm=1000), "k", tokens=1001)
    assert "Request too large" in refused.value.message
    assert (b"x-should-retry", b"false") in refused.value.headers
    assert not any(name == b"retry-after" for name, _ in refused.value.headers)


async def test_correction_frees_what_the_request_did_not_use() -> None:
    limiter = RateLimiter(MemoryRateLimitState())
    rules = RateLimits(tpm=1000)
    admission = await limiter.admit("t", rules, "k", tokens=900)
    await limiter.correct(admission, 100)
    assert await limiter.admit("t", rules, "k", tokens=900) is not None


def refusals(tenant: str, scope: str, unit: str) -> float:
    labels = {"tenant": tenant, "scope": scope, "unit": unit}
    return REGISTRY.get_sample_value("gateway_rate_limited_total", labels) or 0.0


async def test_refusals_are_counted_by_scope_and_unit_without_the_key() -> None:
    limiter = RateLimiter(MemoryRateLimitState())
    before = {
        (scope, unit): refusals("counted", scope, unit)
        for scope in ("tenant", "key")
        for unit in ("requests", "tokens")
    }
    await limiter.admit("counted", RateLimits(rpm=1), "k", tokens=10)
    with pytest.raises(GatewayError):
        await limiter.admit("counted", RateLimits(rpm=1), "k", tokens=10)
    with pytest.raises(GatewayError):  # can never fit: counted as a token refusal of the key's limit
        await limiter.admit("counted", RateLimits(keys={"*": {"tpm": 5}}), "k", tokens=6)
    assert refusals("counted", "tenant", "requests") == before["tenant", "requests"] + 1
    assert refusals("counted", "key", "tokens") == before["key", "tokens"] + 1
    assert refusals("counted", "key", "requests") == before["key", "requests"]
    labels = {s.labels.get("scope") for m in REGISTRY.collect() if m.name == "gateway_rate_limited" for s in m.samples}
    assert labels <= {"tenant", "key"}  # the key id never becomes a label value


async def test_a_request_too_large_for_its_key_names_the_key_even_when_the_tenant_limit_is_also_full() -> None:
    limiter = RateLimiter(MemoryRateLimitState())
    rules = RateLimits(rpm=1, keys={"*": {"tpm": 5}})
    await limiter.admit("t", rules, "k", tokens=3)
    with pytest.raises(GatewayError) as refused:  # the tenant's RPM is full and 6 tokens never fit the key's TPM
        await limiter.admit("t", rules, "k", tokens=6)
    assert refused.value.message.startswith("Request too large for key k of tenant 't'")
