"""The chat body check: each mistake is a 400 naming the parameter, valid bodies pass untouched."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.api.openai import parse_chat_body
from gateway.errors import GatewayError

VALID = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "hi"}]}


def error_of(raw: bytes) -> GatewayError:
    with pytest.raises(GatewayError) as info:
        parse_chat_body(raw)
    return info.value


@pytest.mark.parametrize(
    ("raw", "param", "fragment"),
    [
        (b"", None, "empty"),
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "must be a JSON object, got an array"),
        (b'"text"', None, "got a string"),
        (b'{"messages": [{"role": "user"}]}', "model", "Missing required parameter: 'model'"),
        (b'{"model": 5, "messages": [{"role": "user"}]}', "model", "non-empty string, got a number"),
        (b'{"model": "", "messages": [{"role": "user"}]}', "model", "non-empty string"),
        (b'{"model": "m"}', "messages", "Missing required parameter: 'messages'"),
        (b'{"model": "m", "messages": "hi"}', "messages", "must be an array, got a string"),
        (b'{"model": "m", "messages": []}', "messages", "at least one message"),
        (b'{"model": "m", "messages": ["hi"]}', "messages[0]", "must be an object"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role", "missing"),
        (b'{"model": "m", "messages": [{"role": "robot"}]}', "messages[0].role", "'robot'"),
        (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes"}', "stream", "must be a boolean"),
    ],
)
def test_bad_bodies_are_400_with_param(raw: bytes, param: str | None, fragment: str) -> None:
    error = error_of(raw)
    assert error.status == 400
    assert error.param == param
    assert fragment in error.message
    body = orjson.loads(error.body())
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_unknown_fields_and_key_order_survive() -> None:
    raw = b'{"zeta": 1, "model": "m", "thinking": {"type": "enabled"}, "messages": [{"role": "user"}], "alpha": null}'
    body = parse_chat_body(raw)
    assert list(body) == ["zeta", "model", "thinking", "messages", "alpha"]
    assert body["thinking"] == {"type": "enabled"}


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
        lambda c: st.lists(c) | st.dictionaries(st.text(), c),
    )
)
def test_any_json_value_is_accepted_or_refused_with_400(value: object) -> None:
    raw = orjson.dumps(value)
    try:
        parse_chat_body(raw)
    except GatewayError as error:
        assert error.status == 400


@given(st.binary(max_size=64))
def test_any_bytes_never_raise_anything_but_gateway_error(raw: bytes) -> None:
    try:
        parse_chat_body(raw)
    except GatewayError as error:
        assert error.status == 400
