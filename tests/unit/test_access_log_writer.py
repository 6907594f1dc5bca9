"""The access log's writer: lines leave the request path in batches, reach the descriptor whole, in
order, in writes no larger than PIPE_BUF (so workers sharing one stderr pipe never interleave
mid-line), and nothing pending is lost at shutdown."""

from __future__ import annotations

import asyncio
import os
import threading

import orjson

from gateway.access_log import ACCESS, PIPE_BUF, AccessLog, configure


class Recorder(AccessLog):
    """Counts the writes that reach the descriptor."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.writes: list[int] = []
        self.handed = asyncio.Event()

    def _hand_off(self) -> None:
        super()._hand_off()
        self.handed.set()

    def _write_all(self, data: bytes) -> None:
        self.writes.append(len(data))
        super()._write_all(data)


def drain(fd: int, out: bytearray) -> None:
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        out.extend(chunk)


def test_access_log_batches_whole_lines_within_pipe_buf_in_order() -> None:
    r, w = os.pipe()
    got = bytearray()
    reader = threading.Thread(target=drain, args=(r, got))
    reader.start()
    log = Recorder(w)

    async def main() -> None:
        for i in range(500):
            log.record(orjson.dumps({"n": i, "pad": "x" * 100}) + b"\n")
        assert log.writes == [], "a request never waits for the write"
        await asyncio.wait_for(log.handed.wait(), 5)  # by the loop's timer, not by a flush
        assert not log._pending

    asyncio.run(main())
    log.flush()  # waits for the writer thread
    os.close(w)
    reader.join(5)
    os.close(r)
    lines = bytes(got).splitlines()
    assert [orjson.loads(x)["n"] for x in lines] == list(range(500))
    assert len(log.writes) > 1 and max(log.writes) <= PIPE_BUF


def test_access_log_flush_writes_what_is_pending_at_once() -> None:
    r, w = os.pipe()
    log = AccessLog(w)

    async def main() -> None:
        log.record(b'{"n":1}\n')
        log.flush()

    asyncio.run(main())
    os.close(w)
    assert orjson.loads(os.read(r, 4096)) == {"n": 1}
    os.close(r)


def test_access_log_follows_log_level() -> None:
    try:
        configure(True, "info")
        assert ACCESS.enabled
        configure(True, "warning")
        assert not ACCESS.enabled
        configure(False, "debug")
        assert not ACCESS.enabled
    finally:
        configure(False, "info")


def test_access_log_line_is_json_with_config_strings_escaped() -> None:
    from gateway.access_log import _line
    from gateway.upstreams.usage import Usage

    tenant = 'acme "eu"\\\n'
    line = _line(1764900000.25, "req_ab", tenant, "0123456789ab", "messages", "m", "up/m", True, 200, "ok", 1.005,
                 12.3456, Usage(10, 5, 2, 1), 1_234_567_891, True)  # fmt: skip
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    doc = orjson.loads(line)
    assert doc["ts"] == "2025-12-05T02:00:00.250000Z"
    assert (doc["tenant"], doc["stream"], doc["estimated"], doc["cost_usd"]) == (tenant, True, True, "1.234567891")
    assert (doc["prompt_tokens"], doc["completion_tokens"], doc["cached_tokens"], doc["reasoning_tokens"]) == (
        10, 5, 2, 1,
    )  # fmt: skip
    assert doc["total_ms"] == 12.35
    refused = orjson.loads(_line(1.0, "req_x", "t", None, "responses", None, None, None, 401, "rejected", None, 0.5,
                                 None, 0, False))  # fmt: skip
    assert refused["key_id"] is None and refused["model"] is None and refused["cost_usd"] == "0.000000000"
