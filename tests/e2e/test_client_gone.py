"""A client that goes away while it sends its request body leaves one info line, no traceback, on
every endpoint that reads a body, and one ``client_closed`` row on every endpoint that meters; one
that goes away while the answer comes leaves one ``client_cancelled`` row billed for what it got."""

from __future__ import annotations

import contextlib
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.waiting import settled, wait_until

KEY = "sk-client-gone"
PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/route/explain"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder: Path = tmp_path_factory.mktemp("client-gone")
    upstreams = (
        "  sim:\n    kind: simulated\n    profile: instant\n    models: [kimi-k2-thinking]\n"
        # slow enough that a client can leave halfway through the answer
        "  slow:\n    kind: simulated\n    profile: instant\n    ttft_ms: 20\n    tokens_per_s: 100\n"
        "    models: [kimi-k2-thinking]\n"
    )
    routes = "  kimi-k2-thinking: {candidates: [sim/kimi-k2-thinking]}\n  slow: {candidates: [slow/kimi-k2-thinking]}\n"
    policy = f'tenant: gone\nkeys: ["{hashed(KEY)}"]\nmodels:\n{routes}'
    proc = start_gateway(write_gateway(folder, upstreams, policy, extra_yaml="log_level: info"))
    yield proc
    proc.stop()


@pytest.mark.parametrize("path", PATHS)
def test_a_body_cut_short_is_one_info_line_and_no_traceback(gateway: Process, path: str) -> None:
    host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=5) as conn:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nx-api-key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        conn.sendall(head.encode() + b'{"model": "k')  # 12 of the 1,000 bytes it announced
    expected = f"POST {path}: the client went away after 12 bytes of its body; nothing answered"
    wait_until(lambda: expected in gateway.output(), timeout=10)
    output = gateway.output()
    assert output.count(expected) == 1
    assert "Traceback" not in output and "Exception in ASGI application" not in output


def ledger_rows(gateway: Process, where: str, *params: Any) -> list[tuple[Any, ...]]:
    db = gateway.log.parent / "gateway-ledger.db"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT outcome, status, stream, completion_tokens, cost_nanos, estimated, endpoint FROM ledger"
        return conn.execute(f"{query} WHERE {where}", params).fetchall()


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [("/v1/chat/completions", "chat/completions"), ("/v1/messages", "messages"), ("/v1/responses", "responses")],
)
def test_a_body_cut_short_leaves_one_client_closed_row(gateway: Process, path: str, endpoint: str) -> None:
    where = "outcome = 'client_closed' AND endpoint = ?"
    # rows of earlier tests first: the report says when this process has none left unwritten
    settled(lambda: httpx.get(gateway.url + "/v1/spend", headers={"Authorization": f"Bearer {KEY}"}, timeout=5))
    before = len(ledger_rows(gateway, where, endpoint))
    host, port = "127.0.0.1", int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=5) as conn:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\nx-api-key: {KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        )
        conn.sendall(head.encode() + b'{"model": "k')
    rows = wait_until(lambda: ledger_rows(gateway, where, endpoint)[before:], timeout=10)
    assert rows == [("client_closed", 499, 0, 0, 0, 0, endpoint)]  # nothing went upstream: nothing billed


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_a_client_gone_mid_answer_leaves_one_row_billed_for_what_it_got(gateway: Process, stream: bool) -> None:
    user = f"mid-answer-{stream}"
    body = {"model": "slow", "messages": [{"role": "user", "content": "a long answer"}], "stream": stream,
            "max_tokens": 400, "user": user}  # fmt: skip
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=10) as client:
        if stream:
            with client.stream("POST", gateway.url + "/v1/chat/completions", json=body, headers=headers) as resp:
                got = b""
                for chunk in resp.iter_raw():
                    got += chunk
                    if got.count(b"data:") >= 5:
                        break  # leave the with block: the connection closes mid-stream
        else:
            with contextlib.suppress(httpx.TimeoutException):
                client.post(gateway.url + "/v1/chat/completions", json=body, headers=headers, timeout=0.3)
    wait_until(lambda: ledger_rows(gateway, "end_user = ?", user), timeout=10)
    [(outcome, status, was_stream, completion, cost, estimated, _)] = ledger_rows(gateway, "end_user = ?", user)
    assert (outcome, status, was_stream) == ("client_cancelled", 499, int(stream))
    if stream:  # the prompt plus what was relayed, estimated: not the whole answer, nor max_tokens
        assert estimated == 1 and cost > 0 and 0 < completion < 400
    else:  # the upstream had not answered yet: nothing of the answer reached the client
        assert completion == 0
