"""The write-ahead log is copied back into the ledger file as ingest goes on, so it stays about
one checkpoint interval of commits long however much is committed (one batch long when a
checkpoint follows every commit); a long reader only delays that, never commits, and each
checkpoint's report (what the metrics show) says how much of the WAL it could copy."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest
from harness import count_events, make_event

from jetledger.schemas import Subjects, encode
from jetledger.worker.ingest import Decoded, decode_message
from jetledger.worker.writer import CHECKPOINT_INTERVAL, LedgerWriter

BATCH = 200
SUBJECTS = Subjects()


def _batch(first: int) -> list[Decoded]:
    out = []
    for i in range(first, first + BATCH):
        event = make_event(i)
        out.append(decode_message(SUBJECTS, SUBJECTS.event(event.tenant, event.kind),
                                  encode(event), None, i))
    return out


def _wal_bytes(db: Path) -> int:
    wal = db.with_name(db.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def _sustained_commits(db: Path, *, checkpoint_interval: float,
                             pause: float) -> tuple[int, int]:
    """Commit 40 batches, pausing `pause` seconds before each after the first; the WAL's size
    after the first and after the last."""
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER",
                                     checkpoint_interval=checkpoint_interval)
    try:
        await writer.commit(_batch(1))
        one_batch = _wal_bytes(db)
        for n in range(1, 40):
            if pause:
                await asyncio.sleep(pause)
            await writer.commit(_batch(1 + n * BATCH))
        last = _wal_bytes(db)
    finally:
        await writer.close()
    assert count_events(db) == 40 * BATCH
    return one_batch, last


async def test_with_a_checkpoint_after_every_commit_the_wal_stays_about_one_batch_long(
        tmp_path: Path) -> None:
    one_batch, last = await _sustained_commits(tmp_path / "ledger.db", checkpoint_interval=0,
                                               pause=0)
    written = 40 * one_batch
    assert last <= 3 * one_batch < written / 10


async def test_at_the_shipped_interval_the_wal_holds_about_one_interval_of_commits(
        tmp_path: Path) -> None:
    # At most five commits an interval: fewer checkpoints than commits, but they go on.
    one_batch, last = await _sustained_commits(
        tmp_path / "ledger.db", checkpoint_interval=CHECKPOINT_INTERVAL,
        pause=CHECKPOINT_INTERVAL / 4)
    assert last <= 8 * one_batch  # 40 batches were written


async def test_a_reader_holding_a_snapshot_delays_the_wal_reset_but_never_a_commit(
        tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER", checkpoint_interval=0)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        await writer.commit(_batch(1))
        one_batch = _wal_bytes(db)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (BATCH,)
        for n in range(1, 10):
            await writer.commit(_batch(1 + n * BATCH))
        held = _wal_bytes(db)  # nothing past the reader's snapshot could be copied back
        assert reader.execute("SELECT count(*) FROM events").fetchone() == (BATCH,)
        reader.execute("COMMIT")
        for n in range(10, 40):
            await writer.commit(_batch(1 + n * BATCH))
        # Once the reader let go, the log restarted from its beginning instead of growing
        # by 30 more batches (one more may land while the last held checkpoint runs).
        assert _wal_bytes(db) <= held + one_batch
    finally:
        reader.close()
        await writer.close()
    assert count_events(db) == 40 * BATCH


async def test_each_checkpoint_reports_the_pages_a_reader_still_holds(tmp_path: Path) -> None:
    """What the metrics show an operator: jetledger_wal_frames_not_checkpointed is above 0
    exactly while a reader's snapshot keeps pages in the WAL."""
    db = tmp_path / "ledger.db"
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER", checkpoint_interval=0)
    reader = sqlite3.connect(db, isolation_level=None)
    try:
        assert writer.wal is None  # no checkpoint yet
        await writer.commit(_batch(1))
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM events").fetchone()
        for n in range(1, 4):
            await writer.commit(_batch(1 + n * BATCH))
        await writer._checkpoint_done()  # noqa: SLF001 - wait for the last report
        assert writer.wal is not None and 0 < writer.wal.checkpointed < writer.wal.frames
        reader.execute("COMMIT")
        await writer.commit(_batch(1 + 4 * BATCH))
        await writer._checkpoint_done()  # noqa: SLF001
        assert writer.wal.frames > 0 and writer.wal.checkpointed == writer.wal.frames
        assert writer.checkpoint_failures == 0
    finally:
        reader.close()
        await writer.close()


async def test_a_failing_checkpoint_is_logged_and_never_fails_a_commit(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "ledger.db"
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    try:
        # Break the checkpoint's own connection: every checkpoint from now on fails.
        await writer._checkpointer.close()
        for n in range(5):
            await writer.commit(_batch(1 + n * BATCH))
    finally:
        await writer.close()
    assert "WAL checkpoint failed" in caplog.text
    assert writer.checkpoint_failures >= 1  # jetledger_wal_checkpoint_failures_total
    assert count_events(db) == 5 * BATCH
