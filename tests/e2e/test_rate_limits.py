"""Rate limits end to end, with in-memory and with Redis state: RPM and TPM per tenant and per key,
429 ``rate_limit_exceeded`` with Retry-After, OpenAI's x-ratelimit-* headers on every answer under a
limit (stream and non-stream), and tokens corrected to actual usage."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.e2e.redis_helpers import drop_namespace, shared_redis, state_yaml
from tests.e2e.test_metering import upstream_yaml

KEY_1, KEY_2 = "sk-rate-one", "sk-rate-two"


def policy(rate_limits: str) -> str:
    return (
        f'tenant: rated\nkeys: ["{hashed(KEY_1)}", "{hashed(KEY_2)}"]\n'
        f"models:\n  kimi-k2-thinking: {{candidates: [sim/kimi-k2-thinking]}}\nrate_limits: {rate_limits}\n"
    )


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def state(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "memory":
        yield ""
        return
    url, namespace = shared_redis()
    yield state_yaml(url, namespace)
    drop_namespace(url, namespace)


def gateway(tmp_path: Path, sim: Process, rate_limits: str, state: str) -> Process:
    return start_gateway(write_gateway(tmp_path, upstream_yaml(sim), policy(rate_limits), extra_yaml=state))


def client(proc: Process, key: str = KEY_1) -> OpenAI:
    return proc.openai(key)


MESSAGES = [{"role": "user", "content": "rate limited"}]


def test_rpm_admits_the_limit_then_429_with_retry_after(tmp_path: Path, sim: Process, state: str) -> None:
    proc = gateway(tmp_path, sim, "{rpm: 4}", state)
    try:
        c = client(proc)
        for i in range(4):
            stream = i % 2 == 1
            raw = c.chat.completions.with_raw_response.create(
                model="kimi-k2-thinking", messages=MESSAGES, max_tokens=20, stream=stream
            )
            if stream:
                assert any(chunk.choices for chunk in raw.parse())
            else:
                assert raw.parse().choices[0].finish_reason
            assert raw.headers["x-ratelimit-limit-requests"] == "4"
            assert raw.headers["x-ratelimit-remaining-requests"] == str(3 - i)
            assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
            assert "x-ratelimit-limit-tokens" not in raw.headers  # no TPM configured
        for stream in (False, True):
            with pytest.raises(openai.RateLimitError) as refused:
                c.chat.completions.create(model="kimi-k2-thinking", messages=MESSAGES, max_tokens=20, stream=stream)
            error = refused.value
            assert error.status_code == 429 and error.code == "rate_limit_exceeded"
            assert error.type == "requests" and "tenant 'rated'" in error.message and "Limit 4" in error.message
            headers = error.response.headers
            assert 1 <= int(headers["retry-after"]) <= 120
            assert headers["x-ratelimit-remaining-requests"] == "0"
        # refused requests reached no upstream and are in the ledger as rejected
        assert len(httpx.get(sim.url + "/_sim/requests").json()) == 4
        # and /metrics counts them apart from upstream and budget 429s
        assert proc.metric("gateway_rate_limited_total", tenant="rated", scope="tenant", unit="requests") == 2
    finally:
        proc.stop()


def test_per_key_limit_leaves_other_keys_alone(tmp_path: Path, sim: Process, state: str) -> None:
    proc = gateway(tmp_path, sim, f'{{rpm: 100, keys: {{"{hashed(KEY_1)}": {{rpm: 1}}, "*": {{rpm: 3}}}}}}', state)
    try:
        one, two = client(proc, KEY_1), client(proc, KEY_2)
        raw = one.chat.completions.with_raw_response.create(model="kimi-k2-thinking", messages=MESSAGES, max_tokens=5)
        # the tightest of the tenant's and the key's limits is reported
        assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"]) == ("1", "0")
        with pytest.raises(openai.RateLimitError) as refused:
            one.chat.completions.create(model="kimi-k2-thinking", messages=MESSAGES, max_tokens=5)
        assert "key " in refused.value.message and "Limit 1" in refused.value.message
        for _ in range(3):  # KEY_2 falls under "*": 3 per minute of its own
            two.chat.completions.create(model="kimi-k2-thinking", messages=MESSAGES, max_tokens=5)
        with pytest.raises(openai.RateLimitError):
            two.chat.completions.create(model="kimi-k2-thinking", messages=MESSAGES, max_tokens=5)
    finally:
        proc.stop()


def test_token_limit_is_corrected_to_actual_usage(tmp_path: Path, sim: Process, state: str) -> None:
    """Admitted on prompt bound + max_tokens (~1,530 of 2,000): a second request fits only because the
    first was corrected down to the few tokens it really used."""
    proc = gateway(tmp_path, sim, "{tpm: 2000}", state)
    try:
        c = client(proc)
        for stream in (False, True):
            raw = c.chat.completions.with_raw_response.create(
                model="kimi-k2-thinking",
                messages=MESSAGES,
                max_tokens=1500,
                stream=stream,
                stream_options={"include_usage": True} if stream else openai.NOT_GIVEN,
            )
            if stream:
                [usage] = [chunk.usage for chunk in raw.parse() if chunk.usage]
            else:
                usage = raw.parse().usage
            assert usage is not None and usage.total_tokens < 400
            assert raw.headers["x-ratelimit-limit-tokens"] == "2000"
            assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 2000 - 1500
        with pytest.raises(openai.RateLimitError) as too_large:
            c.chat.completions.create(model="kimi-k2-thinking", messages=MESSAGES, max_tokens=5000)
        assert too_large.value.type == "tokens" and "Request too large" in too_large.value.message
        assert too_large.value.response.headers["x-should-retry"] == "false"
    finally:
        proc.stop()


def test_rate_limit_policy_errors_are_precise(tmp_path: Path, sim: Process) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    config = write_gateway(
        tmp_path, upstream_yaml(sim), policy(f'{{rpm: 0, keys: {{"sha256:{"b" * 64}": {{tpm: 5}}}}}}')
    )
    out = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "config", "check", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert out.returncode == 2
    assert "rate_limits.rpm" in out.stderr and "greater than or equal to 1" in out.stderr
