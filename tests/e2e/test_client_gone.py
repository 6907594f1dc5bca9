"""A client that goes away while it sends its request body leaves one info line, no traceback, on
every endpoint that reads a body."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Process, hashed, start_gateway, write_gateway
from tests.waiting import wait_until

KEY = "sk-client-gone"
PATHS = ["/v1/chat/completions", "/v1/messages", "/v1/responses", "/v1/route/explain"]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    folder: Path = tmp_path_factory.mktemp("client-gone")
    upstreams = "  sim:\n    kind: simulated\n    profile: instant\n    models: [kimi-k2-thinking]\n"
    routes = "  kimi-k2-thinking: {candidates: [sim/kimi-k2-thinking]}\n"
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
