"""Tenants never see an upstream's internals: its error text is bounded, credentials and account ids
in it are redacted, and a 401/403 (about the gateway's own key) quotes none of it."""

from __future__ import annotations

import orjson
import pytest

from gateway.policy.store import Candidate
from gateway.upstreams.errors import log_text, upstream_error

MOON = Candidate("moonshot", "kimi-k2-thinking", "kimi-k2-thinking")
LEAKY = (
    "Incorrect API key provided: sk-proj-AbCdEf1234567890abcdef. Organization org-8f3k2l9q; "
    "Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.payload.sig; project proj_77aa; "
    "trace 5f2b9c0d8e7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c"
)
SECRETS = ("sk-proj-AbCdEf", "org-8f3k2l9q", "eyJhbGciOiJIUzI1NiJ9", "proj_77aa", "5f2b9c0d8e7a6b5c4d3e")


def body(message: str, kind: str = "invalid_request_error") -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "code": None}})


@pytest.mark.parametrize("status", [401, 403])
def test_an_auth_failure_names_the_upstream_and_quotes_nothing(status: int) -> None:
    error = upstream_error(MOON, status, body(LEAKY, "invalid_authentication_error"), None)
    assert (error.status, error.code, error.type) == (502, "upstream_auth_failed", "upstream_error")
    assert "moonshot" in error.message and f"HTTP {status}" in error.message
    assert "Incorrect API key" not in error.message
    assert not any(secret in error.message for secret in SECRETS)


@pytest.mark.parametrize("status", [400, 422, 429, 500, 503])
def test_other_errors_keep_their_text_with_credentials_redacted(status: int) -> None:
    error = upstream_error(MOON, status, body(LEAKY), None)
    assert "Incorrect API key provided" in error.message  # what the request did wrong stays readable
    assert "[redacted]" in error.message
    assert not any(secret in error.message for secret in SECRETS), error.message


@pytest.mark.parametrize("payload", [body("x" * 50_000), ("<html>" + "y " * 50_000 + "</html>").encode()])
def test_upstream_text_is_bounded(payload: bytes) -> None:
    error = upstream_error(MOON, 400, payload, None)
    assert len(error.message) < 500


def test_the_log_gets_the_answer_bounded_and_redacted_too() -> None:
    line = log_text(body(LEAKY) + b"\n" + b"z" * 10_000)
    assert "Incorrect API key provided" in line and "\n" not in line
    assert not any(secret in line for secret in SECRETS)
    assert len(line) <= 2000
    assert log_text(b"") == "(empty body)"
