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
#: 3: tenants, kinds and streams are integer keys in events (dictionary tables).
SCHEMA_VERSION: Final = 3

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

-- Names are stored once, in a dictionary table each, and the events and their indexes hold
-- integer keys: smaller index entries, so a commit writes fewer pages (a third fewer WAL
-- frames in the prototype) and the storage path inserts 1.2-2.1x faster (docs/performance.md,
-- round 6). An id, once given to a name, never changes: readers resolve names inside their
-- one statement.
CREATE TABLE IF NOT EXISTS tenants (
    tenant_id INTEGER PRIMARY KEY,
    tenant    TEXT    NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS kinds (
    kind_id INTEGER PRIMARY KEY,
    kind    TEXT    NOT NULL UNIQUE
);

-- One row per (tenant, stream), ids in creation order: the head used to assign seqs and to
-- list streams.
CREATE TABLE IF NOT EXISTS streams (
    stream_id      INTEGER PRIMARY KEY,
    tenant_id      INTEGER NOT NULL,
    stream         TEXT    NOT NULL,
    head_seq       INTEGER NOT NULL,
    first_position INTEGER NOT NULL,
    last_position  INTEGER NOT NULL,
    last_kind      TEXT    NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    UNIQUE (tenant_id, stream)
);
CREATE INDEX IF NOT EXISTS streams_tenant_created ON streams (tenant_id, first_position);
CREATE INDEX IF NOT EXISTS streams_tenant_last_kind
    ON streams (tenant_id, last_kind, first_position);

CREATE TABLE IF NOT EXISTS events (
    position       INTEGER PRIMARY KEY,
    tenant_id      INTEGER NOT NULL,
    id             TEXT    NOT NULL,
    stream_id      INTEGER NOT NULL,
    seq            INTEGER NOT NULL,
    kind_id        INTEGER NOT NULL,
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
CREATE UNIQUE INDEX IF NOT EXISTS events_tenant_id ON events (tenant_id, id);
CREATE UNIQUE INDEX IF NOT EXISTS events_stream_seq ON events (stream_id, seq);
CREATE INDEX IF NOT EXISTS events_tenant_position ON events (tenant_id, position);
CREATE INDEX IF NOT EXISTS events_tenant_time ON events (tenant_id, occurred_at);
CREATE INDEX IF NOT EXISTS events_tenant_kind_time ON events (tenant_id, kind_id, occurred_at);
CREATE INDEX IF NOT EXISTS events_tenant_correlation
    ON events (tenant_id, correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_tenant_causation
    ON events (tenant_id, causation_id) WHERE causation_id IS NOT NULL;

-- The same rows with their names, for people and tools reading the file (sqlite3 CLI, tests).
-- A migration that rebuilds events or streams drops these first; DDL recreates them.
CREATE VIEW IF NOT EXISTS named_events AS
    SELECT e.position, t.tenant, e.id, s.stream, e.seq, k.kind, e.occurred_at, e.recorded_at,
           e.correlation_id, e.causation_id, e.js_seq, e.content_hash, e.body, e.prev_hash,
           e.hash
    FROM events AS e
    JOIN tenants AS t ON t.tenant_id = e.tenant_id
    JOIN streams AS s ON s.stream_id = e.stream_id
    JOIN kinds AS k ON k.kind_id = e.kind_id;
CREATE VIEW IF NOT EXISTS named_streams AS
    SELECT t.tenant, s.stream, s.head_seq, s.first_position, s.last_position, s.last_kind,
           s.created_at, s.updated_at, s.stream_id
    FROM streams AS s JOIN tenants AS t ON t.tenant_id = s.tenant_id;

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
    # Names become integer keys: fill the dictionaries from the events (ids in order of first
    # appearance), copy streams (ids in creation order) and events (same positions, every
    # other column as it was) into new tables, swap them in, then build the indexes, once,
    # over the full tables. Each name is looked up through a UNIQUE index; LEFT JOIN, so
    # events stay the outer loop (read in position order, no sort) and a name without its row
    # is NULL, which NOT NULL refuses: the step fails whole rather than drop a row. The
    # layout is spelled out, not taken from DDL: a migration must keep producing version 3.
    2: (
        # Version 2 has no views; a rebuilt table must not be referenced by one when renamed.
        "DROP VIEW IF EXISTS named_events",
        "DROP VIEW IF EXISTS named_streams",
        """CREATE TABLE tenants (
            tenant_id INTEGER PRIMARY KEY,
            tenant    TEXT    NOT NULL UNIQUE
        )""",
        """CREATE TABLE kinds (
            kind_id INTEGER PRIMARY KEY,
            kind    TEXT    NOT NULL UNIQUE
        )""",
        # min(position) per tenant is read off events_tenant_position (tenant, position).
        "INSERT INTO tenants (tenant_id, tenant)"
        " SELECT row_number() OVER (ORDER BY min(position)), tenant"
        " FROM events GROUP BY tenant ORDER BY min(position)",
        "INSERT INTO kinds (kind_id, kind)"
        " SELECT row_number() OVER (ORDER BY min(position)), kind"
        " FROM events GROUP BY kind ORDER BY min(position)",
        """CREATE TABLE streams_v3 (
            stream_id      INTEGER PRIMARY KEY,
            tenant_id      INTEGER NOT NULL,
            stream         TEXT    NOT NULL,
            head_seq       INTEGER NOT NULL,
            first_position INTEGER NOT NULL,
            last_position  INTEGER NOT NULL,
            last_kind      TEXT    NOT NULL,
            created_at     INTEGER NOT NULL,
            updated_at     INTEGER NOT NULL,
            UNIQUE (tenant_id, stream)
        )""",
        "INSERT INTO streams_v3 (stream_id, tenant_id, stream, head_seq, first_position,"
        " last_position, last_kind, created_at, updated_at)"
        " SELECT row_number() OVER (ORDER BY s.first_position, s.tenant, s.stream),"
        " t.tenant_id, s.stream, s.head_seq, s.first_position, s.last_position, s.last_kind,"
        " s.created_at, s.updated_at"
        " FROM streams AS s LEFT JOIN tenants AS t ON t.tenant = s.tenant"
        " ORDER BY s.first_position, s.tenant, s.stream",
        """CREATE TABLE events_v3 (
            position       INTEGER PRIMARY KEY,
            tenant_id      INTEGER NOT NULL,
            id             TEXT    NOT NULL,
            stream_id      INTEGER NOT NULL,
            seq            INTEGER NOT NULL,
            kind_id        INTEGER NOT NULL,
            occurred_at    INTEGER NOT NULL,
            recorded_at    INTEGER NOT NULL,
            correlation_id TEXT,
            causation_id   TEXT,
            js_seq         INTEGER NOT NULL,
            content_hash   BLOB    NOT NULL,
            body           BLOB    NOT NULL,
            prev_hash      BLOB,
            hash           BLOB
        )""",
        "INSERT INTO events_v3 (position, tenant_id, id, stream_id, seq, kind_id, occurred_at,"
        " recorded_at, correlation_id, causation_id, js_seq, content_hash, body, prev_hash,"
        " hash)"
        " SELECT e.position, t.tenant_id, e.id, s.stream_id, e.seq, k.kind_id, e.occurred_at,"
        " e.recorded_at, e.correlation_id, e.causation_id, e.js_seq, e.content_hash, e.body,"
        " e.prev_hash, e.hash"
        " FROM events AS e"
        " LEFT JOIN tenants AS t ON t.tenant = e.tenant"
        " LEFT JOIN streams_v3 AS s ON s.tenant_id = t.tenant_id AND s.stream = e.stream"
        " LEFT JOIN kinds AS k ON k.kind = e.kind"
        " ORDER BY e.position",
        "DROP TABLE events",
        "DROP TABLE streams",
        "ALTER TABLE events_v3 RENAME TO events",
        "ALTER TABLE streams_v3 RENAME TO streams",
        "CREATE INDEX streams_tenant_created ON streams (tenant_id, first_position)",
        "CREATE INDEX streams_tenant_last_kind ON streams (tenant_id, last_kind, first_position)",
        "CREATE UNIQUE INDEX events_tenant_id ON events (tenant_id, id)",
        "CREATE UNIQUE INDEX events_stream_seq ON events (stream_id, seq)",
        "CREATE INDEX events_tenant_position ON events (tenant_id, position)",
        "CREATE INDEX events_tenant_time ON events (tenant_id, occurred_at)",
        "CREATE INDEX events_tenant_kind_time ON events (tenant_id, kind_id, occurred_at)",
        "CREATE INDEX events_tenant_correlation ON events (tenant_id, correlation_id)"
        " WHERE correlation_id IS NOT NULL",
        "CREATE INDEX events_tenant_causation ON events (tenant_id, causation_id)"
        " WHERE causation_id IS NOT NULL",
    ),
}
