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
            log.record({"n": i, "pad": "x" * 100})
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
        log.record({"n": 1})
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
