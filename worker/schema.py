"""The SQLite layout of a ledger file.

One writer per file. `position` is the global commit order (INTEGER PRIMARY KEY, assigned
explicitly, never deleted: gap-free). `prev_hash`/`hash` are reserved for the per-tenant hash
chain that will be computed in the commit transaction; they stay NULL until then.
Times are integer microseconds since the Unix epoch, UTC.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DDL", "MIGRATIONS", "PRAGMAS", "SCHEMA_VERSION"]

#: 2: rejections are keyed by (js_seq, item), so one bundle message can hold several.
SCHEMA_VERSION: Final = 2

#: For the write connection.
PRAGMAS: Final = (
    "PRAGMA journal_mode=WAL",
    # FULL: a committed batch survives power loss, so acking after commit is honest.
    "PRAGMA synchronous=FULL",
    # Insert cost is index upkeep: a batch touches leaf pages of seven indexes all over
    # the file. 64 MiB (default 2 MiB) keeps them cached between batches: +10% rows/s at
    # batch 2000 on 100k rows (docs/performance.md). Grows only as pages are used.
    "PRAGMA cache_size=-65536",
)

DDL: Final = """
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

#: version -> statements that bring a file of that version to the next, run in the write
#: transaction that also records the new version (all or nothing).
MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {
    # SQLite cannot drop the column constraint `js_seq UNIQUE`: rebuild the table, keeping
    # every row and its rid (cursors of the rejections query are rids). The layout is spelled
    # out, not taken from DDL: a migration must keep producing version 2 when DDL moves on.
    1: (
        """CREATE TABLE rejections_v2 (
            rid           INTEGER PRIMARY KEY,
            js_seq        INTEGER NOT NULL,
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
            UNIQUE (js_seq, item)
        )""",
        "INSERT INTO rejections_v2 (rid, js_seq, item, subject, tenant, event_id, code, reason,"
        " raw, headers, existing_hash, new_hash, recorded_at)"
        " SELECT rid, js_seq, 0, subject, tenant, event_id, code, reason, raw, headers,"
        " existing_hash, new_hash, recorded_at FROM rejections ORDER BY rid",
        "DROP TABLE rejections",
        "ALTER TABLE rejections_v2 RENAME TO rejections",
        "CREATE INDEX rejections_tenant ON rejections (tenant, rid)",
    ),
}
