"""Capture end to end: a tenant with ``capture: full`` (and one with ``metadata``) through the openai SDK;
``kimi-gateway capture show`` prints the stored row, redacted, without keys."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import PYTHON, ROOT, Process, hashed, start_gateway, write_gateway

KEY_FULL = "sk-capture-full"
KEY_META = "sk-capture-meta"
SECRET = "sk-live-abcdefghijklmnopqrstuvwxyz"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, simulator: Process) -> Iterator[tuple[Process, Path]]:
    folder = tmp_path_factory.mktemp("capture")
    upstreams = f"  sim:\n    kind: openai\n    base_url: {simulator.url}/v1\n    models: [kimi-k2-thinking]\n"
    policy = (
        f'tenant: full\nkeys: ["{hashed(KEY_FULL)}"]\nmodels:\n  k2: {{candidates: [sim/kimi-k2-thinking]}}\n'
        "reasoning: {mode: strip, redact: {patterns: [{kind: wants, regex: 'wants'}]}}\n"
        "capture: {mode: full, retention_days: 3}\n"
    )
    config = write_gateway(folder, upstreams, policy)
    (config.parent / "gateway-policies" / "meta.yaml").write_text(
        f'tenant: meta\nkeys: ["{hashed(KEY_META)}"]\nmodels:\n  k2: {{candidates: [sim/kimi-k2-thinking]}}\n'
        "capture: {mode: metadata}\n"
    )
    proc = start_gateway(config)
    yield proc, config
    proc.stop()


def capture_show(config: Path, request_id: str, wait_s: float = 5.0) -> tuple[int, str, str]:
    deadline = time.monotonic() + wait_s
    while True:
        done = subprocess.run(
            [PYTHON, "-m", "gateway.cli", "capture", "show", request_id, "--config", str(config)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        if done.returncode == 0 or time.monotonic() > deadline:
            return done.returncode, done.stdout, done.stderr
        time.sleep(0.2)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_full_capture_is_redacted_and_shown_by_the_cli(setup: tuple[Process, Path], stream: bool) -> None:
    gw, config = setup
    c = gw.openai(KEY_FULL)
    args: dict[str, Any] = {
        "model": "k2",
        "messages": [{"role": "user", "content": f"My key is {SECRET}, mail me at carol@example.com"}],
        "extra_body": {"sim": {"reasoning_chunks": 3}},
    }
    if stream:
        raw = c.chat.completions.with_raw_response.create(stream=True, **args)
        request_id = raw.headers["x-request-id"]
        content = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    else:
        raw = c.chat.completions.with_raw_response.create(**args)
        request_id = raw.headers["x-request-id"]
        content = raw.parse().choices[0].message.content or ""
    code, out, err = capture_show(config, request_id)
    assert code == 0, err
    assert SECRET not in out and "carol@example.com" not in out and KEY_FULL not in out
    doc = orjson.loads(out)
    record = doc["record"]
    assert doc["mode"] == "full" and doc["tenant"] == "full"
    assert doc["expires_at"] - doc["ts"] == pytest.approx(3 * 86400)
    assert record["status"] == 200 and record["stream"] is stream and record["usage"]["completion_tokens"] > 0
    assert record["request"]["messages"][0]["content"] == ("My key is [REDACTED:api_key], mail me at [REDACTED:email]")
    response = record["response"][0]
    assert response["content"] == content and response["finish_reason"] == "stop"
    # the original reasoning is kept for diagnosis (the client never saw it), redacted by the tenant's rules
    assert response["reasoning"] == "The user [REDACTED:wants] a clear answer. Let me restate "


def test_metadata_capture_keeps_no_text(setup: tuple[Process, Path]) -> None:
    gw, config = setup
    c = gw.openai(KEY_META)
    raw = c.chat.completions.with_raw_response.create(
        model="k2", messages=[{"role": "user", "content": f"secret {SECRET}"}]
    )
    code, out, err = capture_show(config, raw.headers["x-request-id"])
    assert code == 0, err
    record = orjson.loads(out)["record"]
    assert "request" not in record and "response" not in record and "secret" not in out
    assert record["tenant"] == "meta" and record["messages"] == 1 and record["status"] == 200


def test_capture_show_names_a_request_without_capture(setup: tuple[Process, Path]) -> None:
    _, config = setup
    code, _, err = capture_show(config, "req-unknown", wait_s=0)
    assert code == 1 and "no capture for request 'req-unknown'" in err


@pytest.mark.postgres
def test_capture_on_a_postgresql_ledger_is_redacted_and_expires(tmp_path: Path, simulator: Process) -> None:
    """The same capture on PostgreSQL: the row sits beside the ledger in its schema; a gateway starting
    up deletes rows past their retention."""
    import asyncio
    import uuid

    import asyncpg

    from tests.conftest import require_service
    from tests.unit.conftest import PG_URL, with_schema

    async def probe() -> None:
        conn = await asyncpg.connect(PG_URL, timeout=3)
        await conn.close()

    try:
        asyncio.run(probe())
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
        require_service("PostgreSQL", f"cannot connect to {PG_URL} ({exc!r})")
    schema = f"kg_capture_e2e_{uuid.uuid4().hex[:12]}"
    url = with_schema(PG_URL, schema)
    upstreams = f"  sim:\n    kind: openai\n    base_url: {simulator.url}/v1\n    models: [kimi-k2-thinking]\n"
    policy = (
        f'tenant: full\nkeys: ["{hashed(KEY_FULL)}"]\nmodels:\n  k2: {{candidates: [sim/kimi-k2-thinking]}}\n'
        "capture: {mode: full, retention_days: 1}\n"
    )
    config = write_gateway(tmp_path, upstreams, policy)
    config.write_text(
        config.read_text().replace('ledger: {url: "sqlite:///gateway-ledger.db"}', f'ledger: {{url: "{url}"}}')
    )

    async def age_rows() -> None:  # as if the row had been written two days ago
        conn = await asyncpg.connect(PG_URL)
        await conn.execute(f'UPDATE "{schema}".capture SET expires_at = expires_at - 2 * 86400')
        await conn.close()

    async def count() -> int:
        conn = await asyncpg.connect(PG_URL)
        n = await conn.fetchval(f'SELECT count(*) FROM "{schema}".capture')
        await conn.close()
        return int(n)

    async def drop() -> None:
        conn = await asyncpg.connect(PG_URL)
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        await conn.close()

    try:
        gw = start_gateway(config)
        try:
            c = gw.openai(KEY_FULL)
            raw = c.chat.completions.with_raw_response.create(
                model="k2", messages=[{"role": "user", "content": f"key {SECRET}"}]
            )
            request_id = raw.headers["x-request-id"]
            code, out, err = capture_show(config, request_id)
            assert code == 0, err
            assert SECRET not in out
            assert orjson.loads(out)["record"]["request"]["messages"][0]["content"] == "key [REDACTED:api_key]"
        finally:
            gw.stop()
        asyncio.run(age_rows())
        assert asyncio.run(count()) == 1
        start_gateway(config).stop()  # start-up enforces retention
        assert asyncio.run(count()) == 0
        code, _, err = capture_show(config, request_id, wait_s=0)
        assert code == 1 and "no capture" in err
    finally:
        asyncio.run(drop())
