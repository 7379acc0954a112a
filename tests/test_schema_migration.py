"""Older ledger files are migrated in place, one version at a time, when a worker opens them.

Version 1 -> 2: rejections keyed by (js_seq, item) instead of js_seq alone: every row and rid
kept, each old rejection still decides its message on redelivery, and the rejections query
still shows it. Version 2 -> 3: tenants, kinds and streams become integer keys of events
(dictionary tables): every event kept with its position and bytes, stream heads kept, the
reader answers as before, the writer continues the streams, and a step that cannot carry the
file whole leaves it at version 2."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from harness import check_ledger, query

from jetledger.schemas import Subjects, new_event
from jetledger.schemas import StoredEvent
from jetledger.schemas.codec import decode, encode
from jetledger.schemas.queries import EventsPage, EventsQuery, RejectionsQuery, StreamsQuery
from jetledger.worker.ingest import decode_message
from jetledger.worker.reader import LedgerReader
from jetledger.worker.schema import DDL, MIGRATIONS, SCHEMA_VERSION
from jetledger.worker.times import to_micros
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

# The layout as version 2 created it (worker/schema.py at version 2), verbatim.
V2_DDL = """
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
    js_seq        INTEGER NOT NULL,
    -- 0: the whole message; n >= 1: the n-th event of a bundle, decided on its own. Never
    -- reused for both, so a bundle rejected whole (say as "internal") is never mistaken on
    -- redelivery for its first event's rejection.
    item          INTEGER NOT NULL DEFAULT 0,
    subject       TEXT    NOT NULL,
    tenant        TEXT,
    event_id      TEXT,
    code          TEXT    NOT NULL,
    reason        TEXT    NOT NULL,
    raw           BLOB    NOT NULL,
    headers       BLOB,
    existing_hash BLOB,
    new_hash      BLOB,
    recorded_at   INTEGER NOT NULL,
    UNIQUE (js_seq, item)                    -- redelivery of a rejection is a no-op
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
        assert SCHEMA_VERSION == 3  # v1 -> v2 -> v3
        assert "item" in _columns(db)
        # The event stored under version 1 came through both steps, its names resolved.
        assert query(db, "SELECT position, tenant, id, stream, seq, kind, js_seq"
                         " FROM named_events") == [(1, "acme", "e1", "s", 1, "k", 1)]
        assert query(db, "SELECT tenant, stream, head_seq, first_position, last_position,"
                         " last_kind FROM named_streams") == [("acme", "s", 1, 1, 1, "k")]
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
    dumps = []
    for _ in range(2):
        writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
        await writer.close()
        conn = sqlite3.connect(db)
        dumps.append(list(conn.iterdump()))
        conn.close()
    assert dumps[0] == dumps[1]
    assert query(db, "SELECT count(*) FROM rejections") == [(3,)]
    fresh = tmp_path / "fresh.db"
    writer = await LedgerWriter.open(fresh, js_stream="JETLEDGER")
    await writer.close()
    assert query(fresh, "SELECT value FROM meta WHERE key='schema_version'") == [("3",)]
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


def test_v2_ddl_here_is_the_version_2_layout() -> None:
    """Guards the fixture itself: version 2 kept names as text in events and streams."""
    assert "CREATE UNIQUE INDEX IF NOT EXISTS events_stream_seq ON events (tenant, stream, seq)" \
        in V2_DDL
    assert "UNIQUE (js_seq, item)" in V2_DDL and "PRIMARY KEY (tenant, stream)" in V2_DDL


# --- version 2 -> 3 ---------------------------------------------------------------------------

#: Who appends what, in commit order: tenants first seen globex, acme, initech (not alphabetical),
#: kinds first seen order_placed, user_created, order_paid; stream "order-1" in two tenants.
_V2_PLAN = [
    ("globex", "order-1", "order_placed", "corr-g"),
    ("acme", "order-1", "order_placed", "corr-a"),
    ("acme", "user-7", "user_created", None),
    ("globex", "order-1", "order_paid", "corr-g"),
    ("acme", "order-1", "order_paid", "corr-a"),
    ("initech", "x", "user_created", None),
    ("acme", "order-1", "order_placed", None),
    ("globex", "order-2", "order_placed", "corr-g2"),
]
_EVENT_COLUMNS = ("position, tenant, id, stream, seq, kind, occurred_at, recorded_at,"
                  " correlation_id, causation_id, js_seq, content_hash, body, prev_hash, hash")
_STREAM_COLUMNS = ("tenant, stream, head_seq, first_position, last_position, last_kind,"
                   " created_at, updated_at")
_REJECTION = (1, 4, 0, "jetledger.evt.acme.order_placed", "acme", "bad-1", "invalid_event",
              "not valid", b"\xc1", None, None, None, 1_700_000_000_000_004)


class V2File:
    """A real version-2 ledger written as version 2 stored events: canonical bodies and their
    content hashes from the worker's own decoding of each encoded event."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.wire: dict[str, bytes] = {}  # event id -> the message as it was sent
        self.events: list[tuple[Any, ...]] = []  # rows in _EVENT_COLUMNS order
        heads: dict[tuple[str, str], list[Any]] = {}
        base = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
        for n, (tenant, stream, kind, corr) in enumerate(_V2_PLAN, start=1):
            position, js_seq = n, 2 * n + 3  # js_seqs with gaps: kept, not renumbered
            ev = new_event(tenant=tenant, stream=stream, kind=kind, id=f"{tenant}-ev-{n}",
                           data={"n": n, "text": "é" * n}, correlation_id=corr,
                           causation_id=f"{tenant}-ev-{n - 1}" if corr and n > 2 else None,
                           occurred_at=base + timedelta(seconds=n, microseconds=n))
            wire = encode(ev)
            (cand,) = decode_message(SUBJECTS, SUBJECTS.event(tenant, kind), wire, None,
                                     js_seq).events
            self.wire[ev.id] = wire
            head = heads.get((tenant, stream))
            seq = head[2] + 1 if head else 1
            recorded = 1_700_000_000_000_000 + 1000 * n
            self.events.append((position, tenant, ev.id, stream, seq, kind,
                                to_micros(ev.occurred_at), recorded, ev.correlation_id,
                                ev.causation_id, js_seq, cand.content_hash, cand.body,
                                # The reserved chain columns are carried too, set or not.
                                bytes([n]) * 32 if n % 2 else None,
                                bytes([n + 100]) * 32 if n % 2 else None))
            if head is None:
                heads[(tenant, stream)] = [tenant, stream, 1, position, position, kind,
                                           recorded, recorded]
            else:
                head[2:] = [seq, head[3], position, kind, head[6], recorded]
        self.streams = [tuple(h) for h in heads.values()]  # in creation order
        self.ingest_state = ("JETLEDGER", 2 * len(_V2_PLAN) + 3, 2 * len(_V2_PLAN) + 3)
        conn = sqlite3.connect(path)
        try:
            conn.executescript(V2_DDL)
            conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '2')")
            conn.executemany(f"INSERT INTO events ({_EVENT_COLUMNS})"
                             " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", self.events)
            # Stored out of creation order: the migration orders them, not the file.
            conn.executemany(f"INSERT INTO streams ({_STREAM_COLUMNS}) VALUES (?,?,?,?,?,?,?,?)",
                             sorted(self.streams, key=lambda h: (h[0], h[1]), reverse=True))
            conn.execute("INSERT INTO rejections VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", _REJECTION)
            conn.execute("INSERT INTO ingest_state VALUES (?,?,?)", self.ingest_state)
            conn.commit()
        finally:
            conn.close()

    def event(self, event_id: str) -> tuple[Any, ...]:
        return next(e for e in self.events if e[2] == event_id)


def _layout(conn: sqlite3.Connection) -> dict[str, Any]:
    """Every table, index and view with its columns, keys and index columns (not its SQL
    text, which keeps the spelling and comments of whoever created it)."""
    out: dict[str, Any] = {}
    for kind, name, table in conn.execute("SELECT type, name, tbl_name FROM sqlite_schema"):
        if kind == "table":
            out[name] = (kind, conn.execute(f"PRAGMA table_xinfo('{name}')").fetchall(),
                         sorted(conn.execute(f"PRAGMA index_list('{name}')").fetchall(),
                                key=lambda r: r[1]))
        elif kind == "index":
            out[name] = (kind, table, conn.execute(f"PRAGMA index_xinfo('{name}')").fetchall())
        else:
            out[name] = (kind, table)
    return out


async def test_v2_ledger_is_migrated_to_v3_keeping_every_event_and_head(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    v2 = V2File(db)

    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    try:
        assert await writer.ingest_state() == v2.ingest_state[1:]
        # The step's WAL (as large as the rewritten tables) is given back once it is done:
        # what is left is the views DDL creates after the step (two pages).
        assert db.with_name(db.name + "-wal").stat().st_size <= 32 + 2 * (24 + 4096)
    finally:
        await writer.close()

    assert query(db, "SELECT value FROM meta WHERE key='schema_version'") == [("3",)]
    # Every event at its position, every byte and number as stored, names given back.
    assert query(db, f"SELECT {_EVENT_COLUMNS} FROM named_events ORDER BY position") == v2.events
    # Ids in order of first appearance; stream ids in creation order.
    assert query(db, "SELECT tenant_id, tenant FROM tenants ORDER BY tenant_id") == \
        [(1, "globex"), (2, "acme"), (3, "initech")]
    assert query(db, "SELECT kind_id, kind FROM kinds ORDER BY kind_id") == \
        [(1, "order_placed"), (2, "user_created"), (3, "order_paid")]
    assert query(db, f"SELECT stream_id, {_STREAM_COLUMNS} FROM named_streams"
                     " ORDER BY stream_id") == \
        [(i, *h) for i, h in enumerate(v2.streams, start=1)]
    # Untouched: the rejections and where ingest stands.
    assert query(db, "SELECT * FROM rejections") == [_REJECTION]
    assert query(db, "SELECT * FROM ingest_state") == [v2.ingest_state]
    report = check_ledger(db)
    assert (report.events, report.streams, report.rejections) == (8, 5, 1)

    # Exactly the layout a new version-3 file has: columns, keys, indexes (names and
    # columns, partial or not), views; no table of version 2 or of the migration left over.
    fresh = sqlite3.connect(":memory:")
    try:
        fresh.executescript(DDL)
        conn = sqlite3.connect(db)
        try:
            assert _layout(conn) == _layout(fresh)
        finally:
            conn.close()
    finally:
        fresh.close()


async def test_an_empty_v2_file_is_migrated_to_an_empty_v3_ledger(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    conn = sqlite3.connect(db)
    conn.executescript(V2_DDL)
    conn.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '2')")
    conn.commit()
    conn.close()
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    try:
        (out,) = await writer.commit([decode_message(
            SUBJECTS, SUBJECTS.event("acme", "k"),
            encode(new_event(tenant="acme", stream="s", kind="k", data={})), None, 1)])
    finally:
        await writer.close()
    assert [(o.outcome, o.seq, o.position) for o in out] == [("inserted", 1, 1)]
    assert query(db, "SELECT value FROM meta WHERE key='schema_version'") == [("3",)]
    assert check_ledger(db).events == 1


def test_the_v2_step_alone_builds_every_v3_table_and_index(tmp_path: Path) -> None:
    """Without DDL after it (whose IF NOT EXISTS would hide a missing index): the step's own
    statements give the version-3 tables and indexes; only the views are left to DDL."""
    db = tmp_path / "ledger.db"
    V2File(db)
    fresh = sqlite3.connect(":memory:")
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        fresh.executescript(DDL)
        conn.execute("BEGIN IMMEDIATE")
        for statement in MIGRATIONS[2]:
            conn.execute(statement)
        conn.execute("COMMIT")
        want = {k: v for k, v in _layout(fresh).items() if v[0] != "view"}
        assert _layout(conn) == want
    finally:
        conn.close()
        fresh.close()


async def test_after_migration_the_reader_answers_as_before(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    v2 = V2File(db)
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    await writer.close()

    reader = await LedgerReader.open(db)
    try:
        page = decode(await reader.events("acme", EventsQuery(kinds=["order_placed"])),
                      EventsPage)
        got = await reader.get("globex", "globex-ev-4")
        head = await reader.head("acme", "order-1")
        streams = await reader.streams("acme", StreamsQuery(order="asc"))
        by_corr = decode(await reader.events("globex", EventsQuery(correlation_id="corr-g")),
                         EventsPage)
    finally:
        await reader.close()

    assert [(e.position, e.id, e.stream, e.seq, e.kind) for e in page.events] == \
        [(2, "acme-ev-2", "order-1", 1, "order_placed"),
         (7, "acme-ev-7", "order-1", 3, "order_placed")]
    one = decode(got, StoredEvent)
    row = v2.event("globex-ev-4")
    assert (one.position, one.tenant, one.id, one.stream, one.seq, one.kind, one.js_seq,
            one.correlation_id, one.causation_id, to_micros(one.occurred_at),
            to_micros(one.recorded_at)) == (*row[:6], row[10], *row[8:10], *row[6:8])
    assert one.data == {"n": 4, "text": "é" * 4}
    assert (head.stream, head.seq, head.first_position, head.last_position, head.last_kind) == \
        ("order-1", 3, 2, 7, "order_placed")
    assert [(s.stream, s.seq, s.first_position) for s in streams.streams] == \
        [("order-1", 3, 2), ("user-7", 1, 3)]
    assert [e.id for e in by_corr.events] == ["globex-ev-1", "globex-ev-4"]


async def test_after_migration_the_writer_continues_the_streams(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    v2 = V2File(db)
    js_seq = v2.ingest_state[1]
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    try:
        nxt = new_event(tenant="acme", stream="order-1", kind="order_paid", id="acme-new",
                        data={"after": "migration"}, expected_seq=3)
        fresh = new_event(tenant="umbrella", stream="order-1", kind="audit_logged",
                          id="umbrella-1", data={})
        again = v2.wire["acme-ev-5"]  # stored under version 2, sent once more
        outs = await writer.commit([
            decode_message(SUBJECTS, SUBJECTS.event("acme", "order_paid"), encode(nxt), None,
                           js_seq + 1),
            decode_message(SUBJECTS, SUBJECTS.event("umbrella", "audit_logged"),
                           encode(fresh), None, js_seq + 2),
            decode_message(SUBJECTS, SUBJECTS.event("acme", "order_paid"), again, None,
                           js_seq + 3),
        ])
    finally:
        await writer.close()

    assert [(o.id, o.outcome, o.stream, o.seq, o.position) for (o,) in outs] == [
        ("acme-new", "inserted", "order-1", 4, 9),        # head 3 + 1, next position
        ("umbrella-1", "inserted", "order-1", 1, 10),     # a new tenant's own "order-1"
        ("acme-ev-5", "duplicate", "order-1", 2, 5),      # the pre-migration row, not a copy
    ]
    assert query(db, "SELECT count(*) FROM named_events WHERE tenant='acme' AND id='acme-ev-5'"
                 ) == [(1,)]
    assert query(db, "SELECT tenant, stream, head_seq, last_position, last_kind"
                     " FROM named_streams WHERE stream='order-1' ORDER BY stream_id") == [
        ("globex", "order-1", 2, 4, "order_paid"),
        ("acme", "order-1", 4, 9, "order_paid"),
        ("umbrella", "order-1", 1, 10, "audit_logged"),
    ]
    # New names get the next ids after the migrated ones.
    assert query(db, "SELECT tenant_id FROM tenants WHERE tenant='umbrella'") == [(4,)]
    assert query(db, "SELECT kind_id FROM kinds WHERE kind='audit_logged'") == [(4,)]
    report = check_ledger(db)
    assert (report.events, report.streams) == (10, 6)


async def test_a_v2_file_the_migration_cannot_carry_whole_is_left_at_v2(tmp_path: Path) -> None:
    """The step fails at the events copy (after the dictionaries and streams were filled):
    an event whose stream has no head row has no stream id, which v3 refuses (NOT NULL).
    The transaction rolls back whole: the file is at version 2, every table as it was."""
    db = tmp_path / "ledger.db"
    V2File(db)
    conn = sqlite3.connect(db)
    conn.execute("DELETE FROM streams WHERE tenant='initech'")
    conn.commit()
    before = list(conn.iterdump())
    conn.close()

    with pytest.raises(sqlite3.IntegrityError, match="stream_id"):
        writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
        await writer.close()  # not reached while the migration refuses

    assert query(db, "SELECT value FROM meta WHERE key='schema_version'") == [("2",)]
    conn = sqlite3.connect(db)
    try:
        assert list(conn.iterdump()) == before  # no tenants, kinds or *_v3 table left
    finally:
        conn.close()
