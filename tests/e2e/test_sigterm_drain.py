"""SIGTERM as Kubernetes sends it: the stream in flight finishes, /readyz turns unready for the drain
period while requests are still served, then the listener closes and the process exits once the
stream is done; the request is settled as a success. Without a drain (the default) uvicorn's own
graceful shutdown still lets the stream finish."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx

from tests.conftest import Process, start_gateway, write_gateway
from tests.e2e.test_metering import policy_yaml, upstream_yaml
from tests.waiting import wait_until

KEY = "sk-drain"
AUTH = {"Authorization": f"Bearer {KEY}"}
STALL_S = 3.0  # the simulator's pause in mid-stream: SIGTERM arrives inside it


def slow_upstream(sim: Process) -> str:
    return upstream_yaml(sim).replace("idle_s: 2, total_s: 5", "idle_s: 10, total_s: 20")


class StreamInFlight(threading.Thread):
    """One stream read to its end in a thread; ``started`` is set at its first SSE event."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.started = threading.Event()
        self.events: list[str] = []
        self.status = 0
        self.request_id = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        body = {
            "model": "kimi-k2-thinking",
            "messages": [{"role": "user", "content": "a long answer"}],
            "max_tokens": 30,
            "stream": True,
            "stream_options": {"include_usage": True},
            "sim": {"fault": {"stall_mid_s": STALL_S}},
        }
        try:
            with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
                self.status = r.status_code
                self.request_id = r.headers.get("x-request-id", "")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            self.started.set()  # a stream that never got an event ends the test's wait at once too


def readyz(proc: Process) -> int | None:
    try:
        return httpx.get(proc.url + "/readyz", timeout=1).status_code
    except httpx.HTTPError:
        return None  # the listener is closed


def access_line(log: str, request_id: str) -> dict:
    mark = f'"request_id":"{request_id}"'
    return next(json.loads(x) for x in log.splitlines() if x.startswith("{") and mark in x)


def ledger_outcome(db: Path, request_id: str) -> tuple[str, int] | None:
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT outcome, estimated FROM ledger WHERE request_id = ?", (request_id,)).fetchone()
    return (row[0], int(row[1])) if row else None


def finished_ok(stream: StreamInFlight) -> None:
    assert stream.error is None, stream.error
    assert stream.status == 200
    assert stream.events[-1] == "[DONE]", stream.events[-3:]
    usage = [json.loads(e)["usage"] for e in stream.events[:-1] if json.loads(e).get("usage")]
    assert usage and usage[-1]["completion_tokens"] > 0


def test_sigterm_drains_readyz_unready_and_the_stream_in_flight_finishes(tmp_path: Path, sim: Process) -> None:
    extra = "shutdown: {drain_s: 1.0, grace_s: 20}"
    config = write_gateway(tmp_path, slow_upstream(sim), policy_yaml("t", KEY), extra_yaml=extra, name="drain")
    proc = start_gateway(config)
    try:
        stream = StreamInFlight(proc.url)
        stream.start()
        assert stream.started.wait(10) and stream.events, (stream.status, stream.error)
        sent_at = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        # draining: unready at once, every other request still served
        wait_until(lambda: readyz(proc) == 503, timeout=2)
        assert httpx.get(proc.url + "/readyz", timeout=1).json() == {"status": "draining"}
        body = {"model": "kimi-k2-thinking", "messages": [{"role": "user", "content": "during drain"}], "max_tokens": 5}
        late = httpx.post(proc.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=10)
        assert late.status_code == 200, late.text
        assert proc.proc.poll() is None
        # after the drain the listener closes, while the stream is still paused upstream
        wait_until(lambda: readyz(proc) is None, timeout=5)
        assert time.monotonic() - sent_at < STALL_S
        assert stream.is_alive(), "the stream should still be in flight when the listener closes"
        stream.join(20)
        finished_ok(stream)
        wait_until(lambda: proc.proc.poll() is not None, timeout=10)
        log = proc.output()
        line = access_line(log, stream.request_id)
        assert (line["status"], line["outcome"], line["stream"]) == (200, "ok", True)
        assert "SIGTERM: draining" in log
    finally:
        proc.stop()


def test_sigterm_without_drain_still_lets_the_stream_finish(tmp_path: Path, sim: Process) -> None:
    config = write_gateway(tmp_path, slow_upstream(sim), policy_yaml("t", KEY), name="nodrain")
    proc = start_gateway(config)
    try:
        stream = StreamInFlight(proc.url)
        stream.start()
        assert stream.started.wait(10) and stream.events, (stream.status, stream.error)
        proc.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: readyz(proc) is None, timeout=2)  # no drain: the listener closes at once
        assert stream.is_alive()
        stream.join(20)
        finished_ok(stream)
        wait_until(lambda: proc.proc.poll() is not None, timeout=10)
    finally:
        proc.stop()


def test_sigterm_after_the_grace_period_cancels_the_stream_and_settles_it(tmp_path: Path, sim: Process) -> None:
    extra = "shutdown: {drain_s: 0, grace_s: 1}"
    config = write_gateway(tmp_path, slow_upstream(sim), policy_yaml("t", KEY), extra_yaml=extra, name="grace")
    proc = start_gateway(config)
    try:
        stream = StreamInFlight(proc.url)
        stream.start()
        assert stream.started.wait(10) and stream.events, (stream.status, stream.error)
        sent_at = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: proc.proc.poll() is not None, timeout=10)
        assert time.monotonic() - sent_at < STALL_S, "the grace period should have ended the wait"
        stream.join(10)
        assert "[DONE]" not in stream.events
        log = proc.output()
        line = access_line(log, stream.request_id)
        # settled as what it was: a stream the gateway cut, its tokens estimated from what it relayed
        assert (line["stream"], line["outcome"], line["estimated"]) == (True, "cut", True), line
        assert line["completion_tokens"] > 0 and line["prompt_tokens"] > 0
        # and its ledger row was written before the process closed the ledger
        assert ledger_outcome(tmp_path / "grace-ledger.db", stream.request_id) == ("cut", 1)
        assert line["completion_tokens"] > 0 and line["prompt_tokens"] > 0
    finally:
        proc.stop()
