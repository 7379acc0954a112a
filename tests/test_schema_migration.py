"""A version-1 ledger file (rejections keyed by js_seq alone) is migrated in place to version
2 (keyed by js_seq and item) when a worker opens it: every row and rid kept, each old
rejection still decides its message on redelivery, and the rejections query still shows it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from harness import check_ledger, query

from jetledger.schemas import Subjects, new_event
from jetledger.schemas.codec import encode
from jetledger.schemas.queries import RejectionsQuery
from jetledger.worker.ingest import decode_message
from jetledger.worker.reader import LedgerReader
from jetledger.worker.schema import SCHEMA_VERSION
from jetledger.worker.writer import LedgerWriter, StorageError

# The layout as version 1 created it (worker/schema.py at version 1), verbatim.
V1_DDL = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY,
    tenant         TEXT    NOT NULL,
    id             TEXT    NOT NULL,
    stream         TEXT    NOT NULL,
    seq            INTEGER NOT NULL,
    kind           TEXT    NOT NULL,
    occurred_at    INTEGER NOT NULL,
    recorded_at    INTEGER NOT NULL,
    correlation_id TEXT,
    causation_id   TEXT,
    js_seq         INTEGER NOT NULL,
    content_hash   BLOB    NOT NULL,
    body           BLOB    NOT NULL,
    prev_hash      BLOB,
    hash           BLOB
);
-- Idempotence forever, not only inside JetStream's dedupe window.
CREATE UNIQUE INDEX IF NOT EXISTS events_tenant_id ON events (tenant, id);
CREATE UNIQUE INDEX IF NOT EXISTS events_stream_seq ON events (tenant, stream, seq);
CREATE INDEX IF NOT EXISTS events_tenant_position ON events (tenant, position);
CREATE INDEX IF NOT EXISTS events_tenant_time ON events (tenant, occurred_at);
CREATE INDEX IF NOT EXISTS events_tenant_kind_time ON events (tenant, kind, occurred_at);
CREATE INDEX IF NOT EXISTS events_tenant_correlation
    ON events (tenant, correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_tenant_causation
    ON events (tenant, causation_id) WHERE causation_id IS NOT NULL;

-- One row per (tenant, stream): the head used to assign seqs and to list streams.
CREATE TABLE IF NOT EXISTS streams (
    tenant         TEXT    NOT NULL,
    stream         TEXT    NOT NULL,
    head_seq       INTEGER NOT NULL,
    first_position INTEGER NOT NULL,
    last_position  INTEGER NOT NULL,
    last_kind      TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (tenant, stream)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS streams_tenant_created ON streams (tenant, first_position);
CREATE INDEX IF NOT EXISTS streams_tenant_last_kind ON streams (tenant, last_kind, first_position);

-- Everything consumed and not stored, with the bytes as they arrived.
CREATE TABLE IF NOT EXISTS rejections (
    rid           INTEGER PRIMARY KEY,
    js_seq        INTEGER NOT NULL UNIQUE,   -- redelivery of a rejected message is a no-op
    subject       TEXT    NOT NULL,
    tenant        TEXT,
    event_id      TEXT,
    code          TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    raw           BLOB    NOT NULL,
    headers       BLOB,
    existing_hash BLOB,
    new_hash      BLOB,
    recorded_at   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS rejections_tenant ON rejections (tenant, rid);

-- Where ingest stands in JetStream, written in the same transaction as the events.
CREATE TABLE IF NOT EXISTS ingest_state (
    js_stream    TEXT PRIMARY KEY,
    last_js_seq  INTEGER NOT NULL,   -- highest stream sequence committed
    ack_floor    INTEGER NOT NULL    -- every sequence <= this is committed (consumer recovery)
) WITHOUT ROWID;
"""

SUBJECTS = Subjects()


def _v1_file(path: Path) -> list[tuple[object, ...]]:
    """A real version-1 ledger: one stored event and three rejections (rids 1, 2, 7: a gap,
    so keeping rids is visible). Returns the rejection rows as stored."""
    conn = sqlite3.connect(path)
    try:
        conn.executescript(V1_DDL)
        conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        conn.execute(
            "INSERT INTO events (position, tenant, id, stream, seq, kind, occurred_at,"
            " recorded_at, js_seq, content_hash, body) VALUES (1,'acme','e1','s',1,'k',1,1,1,"
            " x'00', x'00')")
        conn.execute("INSERT INTO streams VALUES ('acme','s',1,1,1,'k',1,1)")
        rows = [
            (1, 2, "jetledger.evt.acme.k", "acme", "bad-1", "invalid_event", "not valid",
             b"\x01\x02", None, None, None, 10),
            (2, 3, "jetledger.evt.acme.k", "acme", "late", "expected_seq_mismatch",
             "stream 's' is at seq 1, not at the expected 0", b"raw-3", b"\x80", None, None, 11),
            (7, 9, "jetledger.batch.acme", "acme", "c1", "conflict", "already stored",
             b"raw-9", None, b"h-old", b"h-new", 12),
        ]
        conn.executemany(
            "INSERT INTO rejections (rid, js_seq, subject, tenant, event_id, code, reason, raw,"
            " headers, existing_hash, new_hash, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows)
        conn.execute("INSERT INTO ingest_state VALUES ('JETLEDGER', 9, 9)")
        conn.commit()
    finally:
        conn.close()
    return rows


def _columns(path: Path) -> list[str]:
    return [r[1] for r in query(path, "PRAGMA table_info(rejections)")]


async def test_v1_ledger_is_migrated_in_place_keeping_every_rejection(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    rows = _v1_file(db)
    assert "item" not in _columns(db)

    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    try:
        assert query(db, "SELECT value FROM meta WHERE key='schema_version'") == \
            [(str(SCHEMA_VERSION),)]
        assert SCHEMA_VERSION == 2
        assert "item" in _columns(db)
        migrated = query(
            db, "SELECT rid, js_seq, subject, tenant, event_id, code, reason, raw, headers,"
                " existing_hash, new_hash, recorded_at, item FROM rejections ORDER BY rid")
        assert migrated == [(*r, 0) for r in rows]  # every row, every rid, item 0 (whole)
        # The unique key is (js_seq, item) now, and the tenant index is back.
        indexes = {r[1] for r in query(db, "PRAGMA index_list(rejections)")}
        assert "rejections_tenant" in indexes
        assert await writer.ingest_state() == (9, 9)

        # A message rejected under version 1 keeps its outcome on redelivery, although it
        # would pass now (expected_seq=1 matches the head).
        late = new_event(tenant="acme", stream="s", kind="k", id="late", data={},
                         expected_seq=1)
        again = decode_message(SUBJECTS, "jetledger.evt.acme.k", encode(late), None, 3)
        (outs,) = await writer.commit([again])
        assert [(o.id, o.outcome, o.code) for o in outs] == \
            [("late", "rejected", "expected_seq_mismatch")]
        # New rejections get rids after the kept ones.
        bad = decode_message(SUBJECTS, "jetledger.evt.acme.k", b"\xc1", None, 10)
        await writer.commit([bad])
    finally:
        await writer.close()
    assert query(db, "SELECT rid, js_seq, item FROM rejections WHERE js_seq=10") == [(8, 10, 0)]
    report = check_ledger(db)
    assert report.events == 1 and report.rejections == 4

    # The query side reads the migrated table as before.
    reader = await LedgerReader.open(db)
    try:
        page = await reader.rejections("acme", RejectionsQuery(order="asc"))
    finally:
        await reader.close()
    assert [(r.rid, r.js_seq, r.event_id, r.code) for r in page.rejections] == [
        (1, 2, "bad-1", "invalid_event"), (2, 3, "late", "expected_seq_mismatch"),
        (7, 9, "c1", "conflict"), (8, 10, None, "invalid_event")]


async def test_opening_a_migrated_or_new_file_again_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    _v1_file(db)
    for _ in range(2):
        writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
        await writer.close()
    assert query(db, "SELECT count(*) FROM rejections") == [(3,)]
    fresh = tmp_path / "fresh.db"
    writer = await LedgerWriter.open(fresh, js_stream="JETLEDGER")
    await writer.close()
    assert query(fresh, "SELECT value FROM meta WHERE key='schema_version'") == [("2",)]
    assert "item" in _columns(fresh)


async def test_a_file_from_a_newer_version_is_refused_untouched(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    _v1_file(db)
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(StorageError, match="version 99"):
        await LedgerWriter.open(db, js_stream="JETLEDGER")
    assert "item" not in _columns(db)


def test_v1_ddl_here_is_the_version_1_layout() -> None:
    """Guards the fixture itself: version 1 had `js_seq ... UNIQUE` on rejections."""
    assert "js_seq        INTEGER NOT NULL UNIQUE" in V1_DDL
