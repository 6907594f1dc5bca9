"""The ledger journal: lines that round-trip rows exactly, segments that only their own dead process's
successor replays, replay that never duplicates, rotation that never drops a request in flight. The
replay tests run against SQLite and PostgreSQL (the ``ledger_url`` fixture)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from subprocess import PIPE

import pytest

from gateway.config import load_config
from gateway.metering.journal import Journal
from gateway.metering.journal_records import (
    INTERRUPTED,
    Started,
    estimated_prompt_tokens,
    finish_line,
    interrupted_row,
    read_journal,
    start_line,
)
from gateway.metering.journal_replay import replay_journals
from gateway.metering.ledger import Ledger
from gateway.metering.ledger_factory import ledger_from_url
from gateway.metering.prices import Price, PriceBook, PriceEntry, cost_of
from gateway.yamlfile import ConfigError
from tests.conftest import ROOT
from tests.unit.test_config_errors import ENV, GOOD_UPSTREAMS, write
from tests.unit.test_ledger import make_res, make_row

K2 = {"input_miss": "0.60", "input_hit": "0.15", "output": "2.50"}
BOOK = PriceBook(
    [PriceEntry.model_validate({"target": "moonshot/kimi-k2-thinking", "effective_from": "2025-01-01", **K2})]
)
PRICE_OF: Callable[[str, float], Price | None] = BOOK.at


def make_start(i: int, **changes: object) -> Started:
    row = make_row(i)
    start = Started(
        row.request_id, row.ts, row.tenant, row.key_id, row.app, row.user, row.tags, row.virtual_model,
        row.upstream, row.upstream_model, "moonshot/kimi-k2-thinking", True, 4000, "chat/completions", "primary",
    )  # fmt: skip
    return dataclasses.replace(start, **changes)


@pytest.fixture()
async def ledger(ledger_url: str) -> AsyncIterator[Ledger]:
    led = ledger_from_url(ledger_url)
    await led.open()
    yield led
    await led.close()


def segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.journal"))


# ---- lines


def test_a_finish_line_gives_back_the_exact_row() -> None:
    row = make_row(3, cost_nanos=123_459, savings_nanos=10_001, cost_usd=Decimal("0.000123459"))
    got = read_journal(finish_line(row)).finished[row.request_id]
    assert got == row
    assert (got.cost_usd, got.cost_nanos, got.savings_nanos) == (Decimal("0.000123459"), 123_459, 10_001)


def test_a_torn_last_line_is_skipped_and_every_whole_line_kept() -> None:
    data = start_line(make_start(1)) + finish_line(make_row(1)) + start_line(make_start(2))[:-9]
    got = read_journal(data)
    assert list(got.finished) == ["req-00001"] and got.bad_lines == 1
    assert got.unfinished() == []  # the torn start of request 2 is not invented into a row


def test_an_interrupted_stream_is_billed_for_its_prompt_and_relayed_events_not_max_tokens() -> None:
    start = make_start(5, events=37)
    row = interrupted_row(start, PRICE_OF, "died")
    price = PRICE_OF("moonshot/kimi-k2-thinking", start.ts)
    assert price is not None
    prompt = estimated_prompt_tokens(4000)
    assert (row.prompt_tokens, row.completion_tokens) == (prompt, 37)
    assert row.cost_usd == cost_of(price, prompt, 0, 37).usd
    assert (row.outcome, row.estimated, row.stream, row.status, row.upstream) == (
        INTERRUPTED, True, True, 200, "moonshot"
    )  # fmt: skip
    before_any_byte = interrupted_row(make_start(6, stream=False), PRICE_OF, "died")
    assert (before_any_byte.status, before_any_byte.completion_tokens, before_any_byte.stream) == (0, 0, False)


# ---- the writer and replay


async def test_a_live_journal_is_never_replayed_and_a_released_one_is(ledger: Ledger, tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, ledger, fsync_ms=10)
    journal.open()
    journal.started(make_start(1))
    done = await replay_journals(folder, ledger, PRICE_OF)  # a replica starting beside a live one
    assert done.segments == 0 and await ledger.get("req-00001") is None
    await journal.close(stored_everything=False)  # stands for the process dying: the lock goes
    done = await replay_journals(folder, ledger, PRICE_OF)
    assert (done.segments, done.interrupted) == (1, 1)
    got = await ledger.get("req-00001")
    assert got is not None and got.outcome == INTERRUPTED and got.stream
    assert segments(folder) == []


async def test_another_ledgers_journal_in_the_same_folder_is_left_alone(ledger: Ledger, tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    other = ledger_from_url(f"sqlite:///{tmp_path / 'other.db'}")
    journal = Journal(folder, other, fsync_ms=10)
    journal.open()
    journal.finished(make_row(1))
    await journal.close(stored_everything=False)
    assert (await replay_journals(folder, ledger, PRICE_OF)).segments == 0
    assert len(segments(folder)) == 1 and await ledger.get("req-00001") is None


async def test_replay_stores_each_row_once_when_the_crash_fell_between_journal_and_database(
    ledger: Ledger, tmp_path: Path
) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, ledger, fsync_ms=10)
    journal.open()
    stored, journaled_only = make_row(1), make_row(2, stream=False)
    for row in (stored, journaled_only):
        journal.started(make_start(int(row.request_id[-1])))
        journal.finished(row)
    ledger.record(stored)
    ledger.reservation_opened(make_res(2))  # a budgeted request: its open reservation is settled by replay
    await ledger.flush()
    await journal.close(stored_everything=False)
    done = await replay_journals(folder, ledger, PRICE_OF)
    assert (done.finished, done.interrupted) == (2, 0)
    assert await ledger.get("req-00001") == stored and await ledger.get("req-00002") == journaled_only
    assert await ledger.open_reservations() == []
    totals = await ledger.spend(group_by=[])
    assert totals[0]["requests"] == 2
    assert (await replay_journals(folder, ledger, PRICE_OF)).segments == 0  # deleted once stored


async def test_rotation_carries_requests_in_flight_and_deletes_the_old_segment(ledger: Ledger, tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, ledger, fsync_ms=10)
    journal.open()
    first = journal.path
    for i in range(1, 4):
        journal.started(make_start(i))
    journal.progress("req-00001", 12)
    journal.finished(make_row(2))
    ledger.record(make_row(2))
    journal.recorded("req-00002")
    journal.finished(make_row(3))  # sealed, not yet handed to the ledger: must survive the rotation
    await journal.rotate_soon()
    assert first is not None and not first.exists() and segments(folder) == [journal.path]
    await journal.close(stored_everything=False)
    done = await replay_journals(folder, ledger, PRICE_OF)
    assert (done.finished, done.interrupted) == (1, 1)
    carried = await ledger.get("req-00001")
    assert carried is not None and (carried.outcome, carried.completion_tokens) == (INTERRUPTED, 12)
    assert await ledger.get("req-00003") == make_row(3)
    assert (await ledger.spend(group_by=[]))[0]["requests"] == 3


async def test_a_clean_shutdown_leaves_no_journal(ledger: Ledger, tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    journal = Journal(folder, ledger, fsync_ms=10)
    journal.open()
    journal.started(make_start(1))
    journal.finished(make_row(1))
    ledger.record(make_row(1))
    journal.recorded("req-00001")
    await ledger.flush()
    await journal.close(stored_everything=True)
    assert list(folder.iterdir()) == []


KILLED = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from gateway.metering.journal import Journal
    from gateway.metering.ledger_factory import ledger_from_url
    from tests.unit.test_journal import make_start
    from tests.unit.test_ledger import make_row

    async def main():
        ledger = ledger_from_url(sys.argv[1])
        await ledger.open()
        journal = Journal(sys.argv[2], ledger, fsync_ms=5)
        journal.open()
        for i in range(1, 201):
            journal.started(make_start(i))
            if i % 4:
                journal.finished(make_row(i))
                ledger.record(make_row(i))
                journal.recorded(make_row(i).request_id)
            else:
                journal.progress(make_start(i).request_id, i)
        await ledger.flush()  # some rows reached the database, the batch in hand did not
        for i in range(201, 251):
            journal.started(make_start(i))
            journal.finished(make_row(i))
            ledger.record(make_row(i))
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_every_row_survives_kill_9_exactly_once(ledger: Ledger, ledger_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "journal"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", KILLED, ledger_url, str(folder), cwd=ROOT, stdout=PIPE, stderr=PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    done = await replay_journals(folder, ledger, PRICE_OF)
    assert (done.finished, done.interrupted) == (200, 50)
    for i in (1, 3, 150, 201, 250):
        assert await ledger.get(f"req-{i:05d}") == make_row(i)
    for i in (4, 200):
        got = await ledger.get(f"req-{i:05d}")
        assert got is not None and (got.outcome, got.completion_tokens, got.status) == (INTERRUPTED, i, 200)
    assert (await ledger.spend(group_by=[]))[0]["requests"] == 250


# ---- configuration


def test_journal_fsync_interval_out_of_range_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ledger:\n  journal_fsync_ms: 0\n" + GOOD_UPSTREAMS)
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ENV)
    [problem] = info.value.problems
    assert "gateway.yaml:3:" in problem and "ledger.journal_fsync_ms" in problem and "1" in problem


def test_journal_folder_defaults_beside_a_sqlite_ledger_and_can_be_turned_off(tmp_path: Path) -> None:
    loaded = load_config(write(tmp_path, 'ledger: {url: "sqlite:///data/l.db"}\n' + GOOD_UPSTREAMS), env=ENV)
    assert loaded.journal_dir == (tmp_path / "data" / "l.db.journal.d").resolve()
    off = load_config(write(tmp_path, "ledger: {journal: false}\n" + GOOD_UPSTREAMS), env=ENV)
    assert off.journal_dir is None
    memory = load_config(write(tmp_path, 'ledger: {url: "sqlite:///:memory:"}\n' + GOOD_UPSTREAMS), env=ENV)
    assert memory.journal_dir is None


async def test_the_start_lines_of_one_loop_iteration_go_out_in_one_write(
    ledger: Ledger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starts are grouped until the next loop iteration (before it reads any I/O, so before any
    upstream answer); a row written first carries the pending starts in the same write."""
    journal = Journal(tmp_path / "journal", ledger, fsync_ms=10)
    journal.open()
    writes: list[bytes] = []
    real = os.write

    def counted(fd: int, data: bytes | memoryview) -> int:
        writes.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(os, "write", counted)
    for i in (1, 2, 3):
        journal.started(make_start(i))
    assert writes == []  # not yet: the iteration's other starts may join them
    await asyncio.sleep(0)
    assert len(writes) == 1 and writes[0].count(b"\n") == 3
    journal.started(make_start(4))
    journal.finished(make_row(5))  # a row cannot wait: it takes the pending start with it
    assert len(writes) == 2 and writes[1].count(b"\n") == 2
    await asyncio.sleep(0)
    assert len(writes) == 2  # nothing left for the callback
    journal.started(make_start(6))
    await journal.close(stored_everything=False)  # a stop writes what is pending
    assert b"req-00006" in writes[-1]
