"""An upstream 200 that is not an answer is never relayed or billed as a success.

Each kind of garbage (``simulator/garbage.py``): an HTML page, a body or stream cut before its end,
a ``data:`` line that is not JSON, JSON of another shape, HTML in the middle, the answer labelled
``text/plain``. Before any byte reached the client (a non-stream body, or a stream's first events)
the request fails over to the next candidate, or alone is a 502 ``upstream_invalid_response``; in
the middle of a stream the client gets an in-band error in its own format and a clean end. The
ledger row says ``invalid_response``, with the prompt (and the tokens relayed so far) estimated and
flagged: the provider may bill them.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import Process, hashed, start_gateway, start_simulator, write_gateway
from tests.waiting import wait_until

KEY = "sk-invalid-answers"
GARBAGE_TEXT = ("<html>", "hiccup", "keepalive")  # what the simulator's garbage says: never the client's


@pytest.fixture(scope="module")
def sims(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Process, Process]]:
    folder = tmp_path_factory.mktemp("invalid-sims")
    a, b = start_simulator(folder, "instant"), start_simulator(folder, "instant")
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, sims: tuple[Process, Process]) -> Iterator[tuple[Process, Path]]:
    a, b = sims
    folder = tmp_path_factory.mktemp("invalid-gw")
    upstreams = f"""\
  a:
    kind: openai
    base_url: {a.url}/v1
    models: [kimi-k2-thinking]
  b:
    kind: openai
    base_url: {b.url}/v1
    models: [kimi-k2-thinking]
"""
    policy = f"""\
tenant: invalid
keys: ["{hashed(KEY)}"]
models:
  alone: {{candidates: [a/kimi-k2-thinking]}}
  with-spare: {{candidates: [a/kimi-k2-thinking, b/kimi-k2-thinking], strategy: pinned}}
"""
    extra = "routing: {breaker_failures: 1000}"  # every case meets the candidate with its breaker closed
    config = write_gateway(folder, upstreams, policy, name="invalid", extra_yaml=extra)
    proc = start_gateway(config)
    yield proc, folder / "invalid-ledger.db"
    proc.stop()


def ledger_row(db: Path, request_id: str) -> dict[str, Any] | None:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute("SELECT * FROM ledger WHERE request_id = ?", (request_id,)).fetchone()
        return dict(found) if found is not None else None


def ask(
    proc: Process, upstream_a: Process, fault: dict[str, Any], model: str, stream: bool, path: str = "chat"
) -> httpx.Response:
    """One request to ``model`` while upstream ``a`` answers its next request with ``fault``."""
    httpx.post(upstream_a.url + "/_sim/faults", json=fault).raise_for_status()
    messages = [{"role": "user", "content": "hi"}]
    if path == "chat":
        url, body = "/v1/chat/completions", {"model": model, "messages": messages, "stream": stream}
    elif path == "messages":
        url, body = "/v1/messages", {"model": model, "messages": messages, "stream": stream, "max_tokens": 512}
    else:
        url, body = "/v1/responses", {"model": model, "input": "hi", "stream": stream}
    return httpx.post(proc.url + url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=10)


# before any byte reached the client: every kind, non-stream, and as a stream's first event
KINDS = ["html", "truncated", "not_json", "wrong_shape", "html_mid", "text_plain"]
BEFORE = [({"garbage": k}, False) for k in KINDS] + [({"garbage": k, "garbage_after_events": 0}, True) for k in KINDS]
BEFORE_IDS = [f"{f['garbage']}-{'stream' if s else 'nonstream'}" for f, s in BEFORE]
# after the first events went out: the pause lets them reach the client before the garbage comes
MID = [{"garbage": k, "garbage_after_events": 2, "stall_mid_s": 0.3} for k in KINDS if k not in ("html", "text_plain")]


@pytest.mark.parametrize(("fault", "stream"), BEFORE, ids=BEFORE_IDS)
def test_alone_it_is_a_502_and_never_billed_as_a_success(
    gateway: tuple[Process, Path], sims: tuple[Process, Process], fault: dict[str, Any], stream: bool
) -> None:
    proc, db = gateway
    resp = ask(proc, sims[0], fault, "alone", stream)
    assert resp.status_code == 502, resp.text
    error = resp.json()["error"]
    assert error["code"] == "upstream_invalid_response" and error["type"] == "upstream_error"
    assert "'a' answered 200 with" in error["message"]
    assert not any(text in resp.text for text in GARBAGE_TEXT)  # the garbage is not the client's answer
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert (row["status"], row["outcome"], row["estimated"]) == (502, "invalid_response", 1)
    assert "answered 200 with" in row["estimate_reason"]
    assert row["prompt_tokens"] > 0  # the prompt it may have billed, estimated
    assert row["cost_nanos"] > 0


@pytest.mark.parametrize(("fault", "stream"), BEFORE, ids=BEFORE_IDS)
def test_with_a_spare_candidate_the_request_fails_over(
    gateway: tuple[Process, Path], sims: tuple[Process, Process], fault: dict[str, Any], stream: bool
) -> None:
    proc, db = gateway
    resp = ask(proc, sims[0], fault, "with-spare", stream)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-gateway-upstream"] == "b/kimi-k2-thinking"
    assert "invalid_response" in resp.headers["x-gateway-route-reason"]
    assert ("data: [DONE]" in resp.text) if stream else resp.json()["choices"][0]["message"]["content"]
    assert not any(text in resp.text for text in GARBAGE_TEXT)
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert (row["status"], row["outcome"], row["upstream"], row["estimated"]) == (200, "ok", "b", 0)


def sse_data(text: str) -> list[Any]:
    return [orjson.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize("model", ["alone", "with-spare"])
@pytest.mark.parametrize("fault", MID, ids=[f["garbage"] for f in MID])
def test_mid_stream_garbage_ends_the_stream_with_an_error_event_and_an_estimate(
    gateway: tuple[Process, Path], sims: tuple[Process, Process], fault: dict[str, Any], model: str
) -> None:
    proc, db = gateway
    resp = ask(proc, sims[0], fault, model, True)
    assert resp.status_code == 200  # the first events were on their way: nothing can fail over now
    assert resp.headers["x-gateway-upstream"] == "a/kimi-k2-thinking"
    events = sse_data(resp.text)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"  # what came before went out whole
    error = events[-1]["error"]
    assert (error["code"], error["type"]) == ("upstream_invalid_response", "upstream_error")
    assert "'a' sent" in error["message"] and "in the middle of its answer" in error["message"]
    assert "data: [DONE]" not in resp.text
    assert not any(text in resp.text for text in GARBAGE_TEXT)
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert (row["outcome"], row["upstream"], row["estimated"]) == ("invalid_response", "a", 1)
    assert "mid-stream" in row["estimate_reason"] and "relayed so far" in row["estimate_reason"]
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] > 0  # the reasoning relayed before it


@pytest.mark.parametrize("path", ["messages", "responses"])
def test_mid_stream_garbage_is_an_error_in_the_clients_own_format(
    gateway: tuple[Process, Path], sims: tuple[Process, Process], path: str
) -> None:
    proc, db = gateway
    resp = ask(proc, sims[0], MID[1], "alone", True, path)  # not_json
    assert resp.status_code == 200
    assert not any(text in resp.text for text in GARBAGE_TEXT)
    if path == "messages":
        assert "event: message_start" in resp.text and "event: message_stop" not in resp.text
        [error] = [e for e in sse_data(resp.text) if e["type"] == "error"]
        assert error["error"]["type"] == "api_error" and "in the middle of its answer" in error["error"]["message"]
        assert resp.text.rstrip().endswith("}")  # the error event is the stream's last
    else:
        events = sse_data(resp.text)
        assert events[-1]["type"] == "response.failed"
        assert "in the middle of its answer" in events[-1]["response"]["error"]["message"]
        assert not any(e["type"] == "response.completed" for e in events)
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert (row["outcome"], row["endpoint"], row["estimated"]) == ("invalid_response", path, 1)


@pytest.mark.parametrize("model", ["alone", "with-spare"])
def test_a_whole_stream_without_its_done_is_an_answer(
    gateway: tuple[Process, Path], sims: tuple[Process, Process], model: str
) -> None:
    proc, db = gateway
    resp = ask(proc, sims[0], {"garbage": "no_done"}, model, True)
    assert resp.status_code == 200
    assert resp.headers["x-gateway-upstream"] == "a/kimi-k2-thinking"
    assert resp.text.endswith("data: [DONE]\n\n")  # the client's SDK gets the end it waits for
    assert not any("error" in e for e in sse_data(resp.text))
    row = wait_until(lambda: ledger_row(db, resp.headers["x-request-id"]))
    assert (row["outcome"], row["estimated"]) == ("ok", 0)
