"""The single writer of a ledger file: one SQLite transaction per consumed batch.

Per batch: BEGIN IMMEDIATE; look up existing ids and stream heads; decide each message's
outcome (inserted / duplicate / conflict / rejected); write events, stream heads, rejections
and the JetStream position; COMMIT. Any error rolls the whole batch back, and the caller
must not ack: "nothing committed" is the only state a failed batch can leave behind. The
whole transaction is one call on the connection's own thread (`SqliteThread`).

A single event or an atomic batch is decided as one unit; each event of a bundle on its own
(in order, as if it were its own message), with a rejection row per refused event keyed by
(js_seq, item). A decision once committed is replayed, never re-made, on redelivery.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from jetledger.schemas import Event, Outcome
from jetledger.schemas.errors import ConflictError, ExpectedSeqMismatch, JetledgerError

from .ingest import BadItem, Candidate, Decoded
from .schema import DDL, MIGRATIONS, PRAGMAS, SCHEMA_VERSION
from .sqlite_thread import SqliteThread
from .times import to_micros

__all__ = ["CHECKPOINT_INTERVAL", "LedgerWriter", "StorageError", "WalState", "is_transient"]

T = TypeVar("T")

log = logging.getLogger("jetledger.worker")

_headers_enc = msgspec.msgpack.Encoder()


#: Seconds from one WAL checkpoint to the next, at least. A checkpoint copies each page the WAL
#: holds back into the file once, however many commits changed it since the last one. Small
#: commits (~100 a second at 5k events/s offered) each rewrite the same index leaves, so a
#: checkpoint after every one was most of the writer's I/O; a large batch takes about this
#: long to commit, so large ones still get one each. The WAL stays about this many seconds
#: of commits long. When ingest pauses, the last commits stay in the WAL (durable there, and
#: readers see them) until the next commit or `close`.
CHECKPOINT_INTERVAL = 0.1


class StorageError(Exception):
    """The database refused the batch; nothing of it was committed."""


@dataclass(frozen=True)
class WalState:
    """What the last WAL checkpoint found (`PRAGMA wal_checkpoint`): the frames (pages) the
    WAL held, and how many of them it copied into the ledger file. Fewer copied than held
    means a reader's snapshot still needs the rest: the WAL cannot start over, and grows."""

    frames: int
    checkpointed: int


#: Errors caused by what a message contains (a constraint it breaks, a value SQLite cannot
#: bind): retrying the same message cannot help, so the ingest loop isolates it instead.
_MESSAGE_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.ProgrammingError,
                   sqlite3.InterfaceError, sqlite3.NotSupportedError)


def is_transient(exc: BaseException) -> bool:
    """Locked, busy, full, read-only, I/O, even corrupt: a fault of the storage, not of any
    message, so the batch is held and retried until it clears (never turned into
    rejections)."""
    if isinstance(exc, _MESSAGE_ERRORS):
        return False
    return isinstance(exc, (sqlite3.Error, StorageError, MemoryError))


@dataclass(slots=True)
class _Head:
    stream_id: int
    seq: int
    first_position: int
    created_at: int


@dataclass(slots=True)
class _Existing:
    content_hash: bytes
    stream: str
    seq: int
    position: int


_INSERT_EVENT = (
    "INSERT INTO events (position, tenant_id, id, stream_id, seq, kind_id, occurred_at,"
    " recorded_at, correlation_id, causation_id, js_seq, content_hash, body)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_UPSERT_STREAM = (
    "INSERT INTO streams (stream_id, tenant_id, stream, head_seq, first_position,"
    " last_position, last_kind, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (stream_id) DO UPDATE SET head_seq=excluded.head_seq,"
    " last_position=excluded.last_position, last_kind=excluded.last_kind,"
    " updated_at=excluded.updated_at"
)
# Where new ids start: read inside the write lock with the position, in one statement.
_NEXT_IDS = (
    "SELECT (SELECT coalesce(max(position), 0) FROM events),"
    " (SELECT coalesce(max(stream_id), 0) FROM streams),"
    " (SELECT coalesce(max(tenant_id), 0) FROM tenants),"
    " (SELECT coalesce(max(kind_id), 0) FROM kinds)"
)
_INSERT_REJECTION = (
    "INSERT OR IGNORE INTO rejections (js_seq, item, subject, tenant, event_id, code, reason,"
    " raw, headers, existing_hash, new_hash, recorded_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)

#: (code, reason, event_id) of a rejection committed on an earlier delivery.
_Decision = tuple[str, str, str | None]
_UPSERT_STATE = (
    "INSERT INTO ingest_state (js_stream, last_js_seq, ack_floor) VALUES (?,?,?)"
    " ON CONFLICT (js_stream) DO UPDATE SET"
    " last_js_seq=max(last_js_seq, excluded.last_js_seq),"
    " ack_floor=max(ack_floor, excluded.ack_floor)"
)


class _Names:
    """One dictionary table (tenants, kinds): name -> integer id, in `ids`. An id once
    committed never changes, so `ids` keeps them for the writer's life. Ids given inside a
    transaction are in `ids` too, and are taken out again if it rolls back."""

    def __init__(self, table: str, name: str) -> None:
        self.ids: dict[str, int] = {}
        self._new: list[tuple[int, str]] = []
        self._next = 1
        self._lookup = f"SELECT {name}, {name}_id FROM {table} WHERE {name} IN ({{marks}})"
        self.insert = f"INSERT INTO {table} ({name}_id, {name}) VALUES (?,?)"

    def begin(self, db: sqlite3.Connection, names: dict[str, None], last_id: int) -> None:
        """Inside the write lock: the ids of `names` not known yet, from the file (committed
        by this writer before it started, or by another); new ids count from `last_id`."""
        self._next = last_id + 1
        missing = [(name,) for name in names if name not in self.ids]
        for sql, params in _lookups(self._lookup, missing):
            for name, id_ in db.execute(sql, params).fetchall():
                self.ids[name] = id_

    def add(self, name: str) -> int:
        """A new id for `name`, to be inserted with the transaction (`new`)."""
        id_ = self.ids[name] = self._next
        self._next += 1
        self._new.append((id_, name))
        return id_

    @property
    def new(self) -> list[tuple[int, str]]:
        return self._new

    def committed(self) -> None:
        self._new = []

    def rolled_back(self) -> None:
        for _, name in self._new:
            del self.ids[name]
        self._new = []


class LedgerWriter:
    """Owns the write connection. Create with `await LedgerWriter.open(...)`.

    A commit runs whole on the connection's thread (`_transaction`); the writer's state
    (next ids, names) is only touched there, one commit at a time."""

    def __init__(self, db: SqliteThread, js_stream: str, checkpointer: SqliteThread,
                 checkpoint_interval: float = CHECKPOINT_INTERVAL) -> None:
        self._db = db
        self._js_stream = js_stream
        self._position = 0
        self._pending_floor = 0
        # The WAL is copied back into the file from this second connection (its own
        # thread) after a commit, overlapping the ingest loop's next fetch and decode,
        # instead of by SQLite's autocheckpoint inside COMMIT on the write path.
        self._checkpointer = checkpointer
        self._checkpoint: asyncio.Task[None] | None = None
        self._checkpoint_interval = checkpoint_interval
        self._next_checkpoint = 0.0  # time.monotonic() from which the next one may start
        #: The last checkpoint's report (None before the first), and the failed ones.
        self.wal: WalState | None = None
        self.checkpoint_failures = 0
        self._tenants = _Names("tenants", "tenant")
        self._kinds = _Names("kinds", "kind")
        self._last_ids = (0, 0, 0)  # stream, tenant, kind: the highest in the file

    @classmethod
    async def open(
        cls, path: Path, *, js_stream: str, busy_timeout_ms: int = 5000,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
    ) -> LedgerWriter:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await SqliteThread.open(functools.partial(_connect, path, busy_timeout_ms),
                                     "jetledger-writer")
        try:
            checkpointer = await SqliteThread.open(
                functools.partial(_connect_checkpointer, path, busy_timeout_ms),
                "jetledger-checkpoint")
            try:
                writer = cls(db, js_stream, checkpointer, checkpoint_interval)
                await db.run(writer._load_position)
            except BaseException:
                await checkpointer.close()
                raise
        except BaseException:
            await db.close()
            raise
        return writer

    async def close(self) -> None:
        try:
            await self._checkpoint_done()
        finally:
            try:
                await self._checkpointer.close()
            finally:
                # The last connection to close checkpoints and removes the WAL.
                await self._db.close()

    def _load_position(self, db: sqlite3.Connection) -> None:
        position, stream_id, tenant_id, kind_id = db.execute(_NEXT_IDS).fetchone()
        self._position = int(position)
        self._last_ids = (int(stream_id), int(tenant_id), int(kind_id))

    async def ingest_state(self) -> tuple[int, int]:
        """(last committed JetStream seq, recorded ack floor) for this ledger's stream."""
        row = await self._db.run(lambda db: db.execute(
            "SELECT last_js_seq, ack_floor FROM ingest_state WHERE js_stream=?",
            (self._js_stream,)).fetchone())
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def note_ack_floor(self, floor: int) -> None:
        """Record the consumer's ack floor with the next commit. (A commit running now reads
        the old floor or this one: either is a floor, and the next commit records the max.)"""
        self._pending_floor = max(self._pending_floor, floor)

    async def commit(self, batch: list[Decoded]) -> list[list[Outcome]]:
        """Commit one batch; returns the outcomes of each message, in order.

        Raises (after rolling back) if the database refuses: nothing is committed then.
        """
        # A checkpoint that has copied the whole WAL lets this transaction restart the log
        # from its start: waiting for it keeps the WAL one checkpoint interval long.
        await self._checkpoint_done()
        # If the caller is cancelled meanwhile, the transaction still ends, committed or
        # rolled back, on its thread: unacked either way, so a redelivery settles it.
        outcomes = await self._db.run(self._transaction, batch)
        now = time.monotonic()
        if now >= self._next_checkpoint:
            self._next_checkpoint = now + self._checkpoint_interval
            self._checkpoint = asyncio.create_task(self._run_checkpoint())
        return outcomes

    def _transaction(self, db: sqlite3.Connection, batch: list[Decoded]) -> list[list[Outcome]]:
        if db.in_transaction:
            # A ROLLBACK that failed (I/O error) left it open: BEGIN would fail forever.
            _rollback(db)
        db.execute("BEGIN IMMEDIATE")
        try:
            # Read inside the write lock, not cached: after any failed commit the truth is
            # the file, so positions stay gap-free whatever was rolled back.
            self._load_position(db)
            outcomes = self._write(db, batch)
            db.execute("COMMIT")
        except BaseException:
            self._tenants.rolled_back()
            self._kinds.rolled_back()
            _rollback(db)
            raise
        self._tenants.committed()
        self._kinds.committed()
        return outcomes

    async def _run_checkpoint(self) -> None:
        """A failure is logged and counted, not raised: the WAL only grows until a later
        checkpoint succeeds, and every commit stays durable."""
        try:
            self.wal = await self._checkpointer.run(_wal_checkpoint)
        except Exception as exc:  # any failure (even a closed connection) stays out of commits
            self.checkpoint_failures += 1
            log.warning("WAL checkpoint failed (%s); the WAL keeps growing until one succeeds",
                        exc)

    async def _checkpoint_done(self) -> None:
        task, self._checkpoint = self._checkpoint, None
        if task is not None:
            # Never raises the task's outcome (it logs its own failure) and never cancels it:
            # a caller cancelled here leaves it running, ahead of anything else on its
            # connection (a connection's thread runs its calls in order).
            await asyncio.wait((task,))

    def _existing(
        self, db: sqlite3.Connection, events: list[Event]
    ) -> dict[tuple[str, str], _Existing]:
        # dict.fromkeys: in order, each (tenant, id) once (a batch may repeat one). A tenant
        # without an id has no events yet.
        tenant_ids = self._tenants.ids
        wanted = dict.fromkeys((tid, ev.id) for ev in events
                               if (tid := tenant_ids.get(ev.tenant)) is not None)
        found: dict[tuple[str, str], _Existing] = {}
        for sql, params in _lookups(_EXISTING, list(wanted)):
            for row in db.execute(sql, params).fetchall():
                found[(row[0], row[1])] = _Existing(row[2], row[3], row[4], row[5])
        return found

    def _decided(
        self, db: sqlite3.Connection, batch: list[Decoded]
    ) -> dict[tuple[int, int], _Decision]:
        """Rejections committed on an earlier delivery of this batch's messages, by
        (js_seq, item): item 0 is a whole message, n >= 1 the n-th event of a bundle."""
        found: dict[tuple[int, int], _Decision] = {}
        for sql, params in _lookups(_DECIDED, [(msg.js_seq,) for msg in batch]):
            for row in db.execute(sql, params).fetchall():
                found[(row[0], row[1])] = (row[2], row[3], row[4])
        return found

    def _heads(self, db: sqlite3.Connection, events: list[Event]) -> dict[tuple[str, str], _Head]:
        tenant_ids = self._tenants.ids
        wanted = dict.fromkeys((tid, ev.stream) for ev in events
                               if (tid := tenant_ids.get(ev.tenant)) is not None)
        heads: dict[tuple[str, str], _Head] = {}
        for sql, params in _lookups(_HEADS, list(wanted)):
            for row in db.execute(sql, params).fetchall():
                heads[(row[0], row[1])] = _Head(row[2], row[3], row[4], row[5])
        return heads

    def _write(self, db: sqlite3.Connection, batch: list[Decoded]) -> list[list[Outcome]]:
        now = time.time_ns() // 1000
        last_stream_id, last_tenant_id, last_kind_id = self._last_ids
        events = [c.event for m in batch for c in m.events]  # every lookup walks these
        self._tenants.begin(db, dict.fromkeys(ev.tenant for ev in events), last_tenant_id)
        self._kinds.begin(db, dict.fromkeys(ev.kind for ev in events), last_kind_id)
        existing = self._existing(db, events)
        heads = self._heads(db, events)
        decided = self._decided(db, batch)
        position = self._position
        tenants, tenant_ids = self._tenants, self._tenants.ids
        kinds, kind_ids = self._kinds, self._kinds.ids
        event_rows: list[tuple[Any, ...]] = []
        rejection_rows: list[tuple[Any, ...]] = []
        touched: dict[tuple[str, str], tuple[int, str]] = {}  # -> (last position, last kind)
        results: list[list[Outcome]] = []
        max_js = 0

        def insert(msg: Decoded, cand: Candidate, seq: int) -> Outcome:
            nonlocal position, last_stream_id
            ev = cand.event
            position += 1
            skey = (ev.tenant, ev.stream)
            head = heads.get(skey)
            if head is None:
                last_stream_id += 1
                head = heads[skey] = _Head(last_stream_id, 0, position, now)
            head.seq = seq
            tenant_id = tenant_ids.get(ev.tenant)
            if tenant_id is None:
                tenant_id = tenants.add(ev.tenant)
            kind_id = kind_ids.get(ev.kind)
            if kind_id is None:
                kind_id = kinds.add(ev.kind)
            event_rows.append((
                position, tenant_id, ev.id, head.stream_id, seq, kind_id,
                to_micros(ev.occurred_at), now, ev.correlation_id, ev.causation_id,
                msg.js_seq, cand.content_hash, cand.body,
            ))
            touched[skey] = (position, ev.kind)
            existing[(ev.tenant, ev.id)] = _Existing(cand.content_hash, ev.stream, seq, position)
            return Outcome(id=ev.id, outcome="inserted", stream=ev.stream, seq=seq,
                           position=position)

        def decide_bundle(msg: Decoded) -> list[Outcome]:
            """Each event alone, in order: what the events before it did is already seen."""
            outs: list[Outcome] = []
            for it in msg.items():
                earlier = decided.get((msg.js_seq, it.item))
                if earlier is not None:
                    event_id = it.event_id if isinstance(it, BadItem) else it.event.id
                    outs.append(_replayed(earlier, event_id))
                    continue
                if isinstance(it, BadItem):
                    rejection_rows.append(_rejection_row(
                        msg, it.error, now, item=it.item, raw=it.raw, event_id=it.event_id))
                    outs.append(_rejected(msg, it.error, it.event_id or ""))
                    continue
                ev = it.event
                refused = _refusal(it, existing.get((ev.tenant, ev.id)),
                                   heads.get((ev.tenant, ev.stream)))
                if isinstance(refused, Outcome):
                    outs.append(refused)  # a duplicate
                elif refused is not None:
                    err, old_hash, new_hash = refused
                    rejection_rows.append(_rejection_row(
                        msg, err, now, old_hash, new_hash, item=it.item,
                        raw=msg.item_raw(it.item), event_id=ev.id))
                    outs.append(_rejected(msg, err, ev.id))
                else:
                    head = heads.get((ev.tenant, ev.stream))
                    outs.append(insert(msg, it, (head.seq if head is not None else 0) + 1))
            return outs

        for msg in batch:
            max_js = max(max_js, msg.js_seq)
            whole = decided.get((msg.js_seq, 0))
            if whole is not None:
                # Rejected on an earlier delivery: the outcome of a message never changes,
                # even if it would pass now (the stream head moved on to its expected_seq).
                ids = [c.event.id if isinstance(c, Candidate) else c.event_id
                       for c in msg.items()]
                if len(ids) > 1:
                    results.append([_replayed(whole, i) for i in ids])
                else:
                    results.append([_replayed(whole, whole[2] or msg.event_id)])
                continue
            if msg.error is not None:
                rejection_rows.append(_rejection_row(msg, msg.error, now))
                results.append([_rejected(msg, msg.error)])
                continue
            if msg.bundle:
                results.append(decide_bundle(msg))
                continue
            # Decide the message on a scratch copy so an atomic batch applies all or nothing.
            plan: list[tuple[Candidate, int]] = []
            outs: list[Outcome] = []
            scratch: dict[tuple[str, str], int] = {}
            failure: tuple[JetledgerError, bytes | None, bytes | None] | None = None
            duplicates = 0
            for cand in msg.events:
                ev = cand.event
                key = (ev.tenant, ev.id)
                prior = existing.get(key)
                if prior is not None:
                    if prior.content_hash == cand.content_hash:
                        duplicates += 1
                        outs.append(Outcome(id=ev.id, outcome="duplicate", stream=prior.stream,
                                            seq=prior.seq, position=prior.position))
                        continue
                    failure = (
                        ConflictError(
                            f"event id {ev.id!r} is already stored with different content "
                            f"(at position {prior.position}); the original stays",
                            event_id=ev.id,
                        ),
                        prior.content_hash,
                        cand.content_hash,
                    )
                    break
                skey = (ev.tenant, ev.stream)
                head = scratch.get(skey)
                if head is None:
                    h = heads.get(skey)
                    head = h.seq if h is not None else 0
                if ev.expected_seq is not None and ev.expected_seq != head:
                    failure = (
                        ExpectedSeqMismatch(
                            f"stream {ev.stream!r} is at seq {head}, not at the expected "
                            f"{ev.expected_seq}",
                            event_id=ev.id,
                            actual_seq=head,
                        ),
                        None,
                        None,
                    )
                    break
                scratch[skey] = head + 1
                plan.append((cand, head + 1))
            if failure is None and plan and duplicates:
                failure = (
                    ConflictError("part of this atomic batch is already stored and part is "
                                  "not; nothing of it was stored"),
                    None,
                    None,
                )
            if failure is not None:
                err, old_hash, new_hash = failure
                rejection_rows.append(_rejection_row(msg, err, now, old_hash, new_hash))
                results.append([_rejected(msg, err, cand.event.id) for cand in msg.events])
                continue
            for cand, seq in plan:
                outs.append(insert(msg, cand, seq))
            results.append(outs)

        for names in (tenants, kinds):
            if names.new:
                db.executemany(names.insert, names.new)
        if event_rows:
            db.executemany(_INSERT_EVENT, event_rows)
        if touched:
            stream_rows = []
            for (tenant, stream), (last, kind) in touched.items():
                h = heads[(tenant, stream)]
                stream_rows.append((h.stream_id, tenant_ids[tenant], stream, h.seq,
                                    h.first_position, last, kind, h.created_at, now))
            db.executemany(_UPSERT_STREAM, stream_rows)
        if rejection_rows:
            db.executemany(_INSERT_REJECTION, rejection_rows)
        floor = self._pending_floor
        db.execute(_UPSERT_STATE, (self._js_stream, max_js, floor))
        self._position = position
        return results


def _connect(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    """The write connection, on its own thread: pragmas, migrations, layout."""
    # isolation_level=None: we issue BEGIN IMMEDIATE ourselves (a deferred transaction
    # that upgrades to a write can fail with SQLITE_BUSY_SNAPSHOT, ignoring busy_timeout).
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        for pragma in PRAGMAS:
            db.execute(pragma)
        _migrate(db, path)
        _create(db)
        db.execute("PRAGMA wal_autocheckpoint=0")
    except BaseException:
        db.close()
        raise
    return db


def _connect_checkpointer(path: Path, busy_timeout_ms: int) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        # FULL: the checkpoint syncs the ledger file before the WAL may be reused.
        db.execute("PRAGMA synchronous=FULL")
    except BaseException:
        db.close()
        raise
    return db


def _rollback(db: sqlite3.Connection) -> None:
    try:
        db.execute("ROLLBACK")
    except sqlite3.Error:
        pass  # SQLite may have rolled back already (disk full does that)


def _wal_checkpoint(conn: sqlite3.Connection) -> WalState:
    """One PASSIVE checkpoint: never blocks the writer or readers."""
    _busy, frames, checkpointed = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return WalState(frames=int(frames), checkpointed=int(checkpointed))


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# A commit's lookups: each is one statement for the whole batch, fetched whole (a statement
# per tenant stepped through a cursor made ~70 statements a commit, when each was also a
# round trip to aiosqlite's thread).
# The (tenant, key) pairs come as a VALUES list; CROSS JOIN keeps it the outer loop, so each
# pair is one search of the unique index (`(tenant, id) IN (VALUES ...)` scans the table).
_EXISTING = (
    "SELECT t.tenant, e.id, e.content_hash, s.stream, e.seq, e.position"
    " FROM (VALUES {marks}) AS v CROSS JOIN events AS e"
    " ON e.tenant_id = v.column1 AND e.id = v.column2"
    " CROSS JOIN streams AS s ON s.stream_id = e.stream_id"
    " CROSS JOIN tenants AS t ON t.tenant_id = e.tenant_id"
)
_HEADS = (
    "SELECT t.tenant, s.stream, s.stream_id, s.head_seq, s.first_position, s.created_at"
    " FROM (VALUES {marks}) AS v CROSS JOIN streams AS s"
    " ON s.tenant_id = v.column1 AND s.stream = v.column2"
    " CROSS JOIN tenants AS t ON t.tenant_id = s.tenant_id"
)
_DECIDED = "SELECT js_seq, item, code, reason, event_id FROM rejections WHERE js_seq IN ({marks})"

#: Bound values per statement: SQLite's lowest limit (before 3.32), so any build takes it.
_MAX_VARIABLES = 999


def _shape(n: int, cap: int) -> int:
    """How many rows a lookup of n binds: n rounded up to a power of two from 8, at most
    `cap`. A handful of statement texts stay prepared in the connection's statement cache;
    one text per batch was prepared on every commit and filled the cache with statements
    never used again (peak RSS draining 1M events: 143 MB that way, 123 MB with shapes)."""
    size = 8
    while size < n:
        size *= 2
    return min(size, cap)


@functools.lru_cache(maxsize=64)
def _marks(rows: int, width: int) -> str:
    """`rows` placeholders, or rows of `width` placeholders for a VALUES list."""
    one = "?" if width == 1 else "(" + ",".join("?" * width) + ")"
    return ",".join([one] * rows)


def _padded(values: list[T], size: int) -> list[T]:
    """`values` repeated at the end to `size` items: a repeated key finds the same row again,
    which the caller's dict keeps once."""
    return values + values[-1:] * (size - len(values))


def _lookups(template: str, keys: list[tuple[Any, ...]]) -> list[tuple[str, list[Any]]]:
    """Statements (text, parameters) that look up every key (a js_seq, or a (tenant, key)
    pair for a VALUES list), each binding at most `_MAX_VARIABLES` values."""
    if not keys:
        return []
    width = len(keys[0])
    per_statement = _MAX_VARIABLES // width
    statements: list[tuple[str, list[Any]]] = []
    for chunk in _chunks(keys, per_statement):
        size = _shape(len(chunk), per_statement)
        params = [value for key in _padded(chunk, size) for value in key]
        statements.append((template.format(marks=_marks(size, width)), params))
    return statements


def _refusal(
    cand: Candidate, prior: _Existing | None, head: _Head | None
) -> Outcome | tuple[JetledgerError, bytes | None, bytes | None] | None:
    """Why one event of a bundle is not inserted: a duplicate (its Outcome), a conflict or a
    stale expected_seq (error, existing hash, new hash); None if it is to be inserted."""
    ev = cand.event
    if prior is not None:
        if prior.content_hash == cand.content_hash:
            return Outcome(id=ev.id, outcome="duplicate", stream=prior.stream, seq=prior.seq,
                           position=prior.position)
        return (ConflictError(f"event id {ev.id!r} is already stored with different content "
                              f"(at position {prior.position}); the original stays",
                              event_id=ev.id),
                prior.content_hash, cand.content_hash)
    at = head.seq if head is not None else 0
    if ev.expected_seq is not None and ev.expected_seq != at:
        return (ExpectedSeqMismatch(f"stream {ev.stream!r} is at seq {at}, not at the "
                                    f"expected {ev.expected_seq}", event_id=ev.id,
                                    actual_seq=at),
                None, None)
    return None


def _replayed(decision: _Decision, event_id: str | None) -> Outcome:
    code, reason, _ = decision
    return Outcome(id=event_id or decision[2] or "",
                   outcome="conflict" if code == "conflict" else "rejected",
                   code=code, reason=reason)


def _rejected(msg: Decoded, err: JetledgerError, event_id: str | None = None) -> Outcome:
    """`event_id` None: the message's own (a single event's); "" names no event."""
    return Outcome(
        id=event_id if event_id is not None else msg.event_id or "",
        outcome="conflict" if isinstance(err, ConflictError) else "rejected",
        code=err.code,
        reason=err.message,
        actual_seq=err.actual_seq if isinstance(err, ExpectedSeqMismatch) else None,
    )


def _rejection_row(
    msg: Decoded,
    err: JetledgerError,
    now: int,
    existing_hash: bytes | None = None,
    new_hash: bytes | None = None,
    *,
    item: int = 0,
    raw: bytes | None = None,
    event_id: str | None = None,
) -> tuple[Any, ...]:
    """A whole message's rejection (item 0: its bytes), or one bundle event's (its bytes,
    its id); subject and headers are the message's."""
    if event_id is None:
        event_id = getattr(err, "event_id", None) or (msg.event_id if not item else None)
    headers = _headers_enc.encode(msg.headers) if msg.headers else None
    return (msg.js_seq, item, msg.subject, msg.tenant, event_id, err.code, err.message,
            raw if raw is not None else msg.raw, headers, existing_hash, new_hash, now)


def _create(db: sqlite3.Connection) -> None:
    """The layout and its version row in one transaction (no-ops on a file that has them): a
    crash in between would leave a file that later starts take for version 1."""
    try:
        db.executescript(
            f"BEGIN IMMEDIATE;\n{DDL}\nINSERT OR IGNORE INTO meta (key, value)"
            f" VALUES ('schema_version', '{SCHEMA_VERSION}');\nCOMMIT;")
    except BaseException:
        _rollback(db)
        raise


def _file_version(db: sqlite3.Connection) -> int | None:
    """The schema version of an existing ledger file; None for a new (empty) one."""
    tables = {row[0] for row in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name IN ('meta','rejections')")}
    if "meta" in tables:
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is not None:
            return int(row[0])
    # Created by a version that crashed before recording its version: version 1 had it.
    return 1 if "rejections" in tables else None


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Bring an older ledger file to SCHEMA_VERSION in place, one transaction per step (a
    crash leaves the file at its old version or the new one, never in between)."""
    version = _file_version(db)
    if version is None or version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StorageError(f"{path} has ledger schema version {version}; this jetledger "
                           f"knows up to {SCHEMA_VERSION}: upgrade jetledger")
    while version < SCHEMA_VERSION:
        # Said before it starts: a step may rewrite every event (seconds per million rows).
        log.warning("migrating ledger %s from schema version %d to %d", path, version,
                    version + 1)
        started = time.monotonic()
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            version += 1
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
                " ON CONFLICT (key) DO UPDATE SET value=excluded.value", (str(version),))
            db.execute("COMMIT")
        except BaseException:
            _rollback(db)
            raise
        log.warning("ledger %s is at schema version %d (%.1f s)", path, version,
                    time.monotonic() - started)
    # A step can leave a WAL as large as the file: give the space back now.
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
