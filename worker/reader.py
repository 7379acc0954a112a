"""Read side of a ledger file: the queries the service answers, on read-only connections.

Readers never block the writer (WAL) and keep each read transaction to one statement, so
they never hold back WAL checkpoints for long.

Each query runs whole in a reader thread (plain `sqlite3`, one connection per thread): the
statement, and turning its rows into the reply's bytes. SQLite releases the GIL while it
steps, and the caller's event loop (shared with ingest) only sends and receives; a query is
one hand-off to a thread and back, not one per cursor call.

Events are not decoded to be served: the stored `body` is the canonical MessagePack of the
`Event` (a map in field order, defaults omitted), and a `StoredEvent` is that map followed by
`seq`, `position`, `recorded_at` and `js_seq`. So a MessagePack reply splices the stored bytes
(map header bumped by 4, the four pairs appended), byte for byte what encoding the decoded
`StoredEvent` gives (tests/test_query_replies.py). JSON replies still decode and encode.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import queue
import sqlite3
import struct
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final, TypeVar

import msgspec

from jetledger.schemas import Event, StoredEvent
from jetledger.schemas.codec import JSON, MSGPACK, encode
from jetledger.schemas.errors import InvalidQuery, NotFound
from jetledger.schemas.queries import (
    EventsPage,
    EventsQuery,
    RejectionInfo,
    RejectionsPage,
    RejectionsQuery,
    StreamHead,
    StreamRecord,
    StreamsPage,
    StreamsQuery,
    TenantStats,
)

from .times import from_micros, to_micros

__all__ = [
    "LedgerReader",
    "events_sql",
    "spliced_event",
    "stored_event",
    "streams_sql",
]

T = TypeVar("T")
#: body, seq, position, recorded_at, js_seq, occurred_at
Row = tuple[bytes, int, int, int, int, int]

_EVENT_COLUMNS = "body, seq, position, recorded_at, js_seq, occurred_at"
_STREAM_COLUMNS = (
    "stream, head_seq, first_position, last_position, last_kind, created_at, updated_at"
)
_body_decoder = msgspec.msgpack.Decoder(Event)
_msgpack = msgspec.msgpack.Encoder()
# Room for the page envelope, the cursor and headers inside max_payload.
_REPLY_OVERHEAD = 1024


class _Assigned(msgspec.Struct, kw_only=True):
    """What the worker adds to an `Event` to make a `StoredEvent`: its fields, in its order."""

    seq: int
    position: int
    recorded_at: msgspec.msgpack.Ext  # a datetime, pre-encoded: see _timestamp
    js_seq: int


_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_U32_I64 = struct.Struct(">Iq")


# Cached: every event of a commit has the same recorded_at, so a page holds few distinct ones
# (1.15 µs a call, about a third of splicing an event). Ext is immutable, so sharing is safe.
@functools.lru_cache(maxsize=1024)
def _timestamp(micros: int) -> msgspec.msgpack.Ext:
    """`from_micros(micros)` as msgspec encodes a datetime (the MessagePack timestamp
    extension, -1, in its shortest form), without building the datetime: that was half the
    cost of a spliced event."""
    secs, us = divmod(micros, 1_000_000)
    nanos = us * 1000
    if secs >> 34 == 0:  # 0 <= secs < 2**34
        data64 = (nanos << 34) | secs
        if data64 >> 32 == 0:
            return msgspec.msgpack.Ext(-1, _U32.pack(data64))
        return msgspec.msgpack.Ext(-1, _U64.pack(data64))
    return msgspec.msgpack.Ext(-1, _U32_I64.pack(nanos, secs))


class _RawEventsPage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """`EventsPage` with each event already encoded (encodes to the same bytes)."""

    events: list[msgspec.Raw]
    next_cursor: str | None = None


class _RawStreamRecord(msgspec.Struct, kw_only=True):
    """`StreamRecord` with both events already encoded (encodes to the same bytes)."""

    head: StreamHead
    first: msgspec.Raw
    last: msgspec.Raw


def _check_layout() -> None:
    """Splicing is only right while the types have the layout it assumes: fail at import,
    not with subtly different replies, if someone changes them."""

    def names(cls: type[msgspec.Struct]) -> tuple[str, ...]:
        return tuple(f.encode_name for f in msgspec.structs.fields(cls))

    extra = msgspec.structs.fields(_Assigned)
    stored = msgspec.structs.fields(StoredEvent)[-len(extra):]
    ok = (
        names(StoredEvent) == names(Event) + names(_Assigned)
        # Always present, so always appended: omit_defaults never drops them.
        and all(f.required for f in stored)
        # The widest stored map (every Event field) stays a fixmap after the bump.
        and len(names(StoredEvent)) <= 15
        and names(_RawEventsPage) == names(EventsPage)
        and names(_RawStreamRecord) == names(StreamRecord)
    )
    if not ok:
        raise RuntimeError("StoredEvent/EventsPage/StreamRecord changed: update the reader")


_check_layout()
_EXTRA: Final = len(msgspec.structs.fields(_Assigned))
#: fixmap header of n pairs -> header of n + 4 (still a fixmap: at most 15 pairs)
_HEADS: Final = {h: bytes((h + _EXTRA,)) for h in range(0x80, 0x90 - _EXTRA)}
# `data` is the only Event field whose default the stored map can still hold: a typed payload
# whose fields are all defaults encodes as an empty map, and once decoded (as a dict) it equals
# the default `{}`, which omit_defaults leaves out of the reply. Such bodies take the slow path.
_EMPTY_DATA: Final = b"\xa4data\x80"


def stored_event(row: Row) -> StoredEvent:
    """The stored event, decoded (for JSON replies, and the reference for `spliced_event`)."""
    ev = _body_decoder.decode(row[0])
    return StoredEvent(
        **msgspec.structs.asdict(ev),
        seq=row[1],
        position=row[2],
        recorded_at=from_micros(row[3]),
        js_seq=row[4],
    )


def spliced_event(row: Row) -> bytes:
    """The MessagePack of `stored_event(row)`, built from the stored bytes without decoding."""
    body = row[0]
    head = _HEADS.get(body[0])  # None: not a fixmap with room for 4 more pairs
    if head is not None and _EMPTY_DATA not in body:
        assigned = _msgpack.encode(
            _Assigned(seq=row[1], position=row[2], recorded_at=_timestamp(row[3]),
                      js_seq=row[4]))
        # Its own map header dropped from `assigned`: the pairs only.
        return b"".join((head, body[1:], assigned[1:]))
    return _msgpack.encode(stored_event(row))


def _encode_cursor(tag: str, *values: int) -> str:
    """Opaque to callers: the sort key of the last row served, tagged with the listing."""
    raw = msgspec.msgpack.encode([tag, *values])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(tag: str, cursor: str, n: int = 1) -> list[int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got = msgspec.msgpack.decode(raw, type=list[str | int])
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        got = []
    values = got[1:]
    if len(values) != n or not all(isinstance(v, int) for v in values) or not got:
        raise InvalidQuery("cursor is not valid: pass back a next_cursor exactly as received")
    if got[0] != tag:
        raise InvalidQuery("cursor belongs to another listing or ordering; start over without it")
    return [int(v) for v in values]


def _head(row: Any) -> StreamHead:
    return StreamHead(
        stream=row[0], seq=row[1], first_position=row[2], last_position=row[3],
        last_kind=row[4], created_at=from_micros(row[5]), updated_at=from_micros(row[6]),
    )


# Names are resolved inside the one statement (each read is one snapshot), by uncorrelated
# subqueries that SQLite runs once, each a search of a unique index; the result then bounds
# the events index like a bound parameter did. An unknown name gives NULL: matches nothing.
_TENANT_ID: Final = "(SELECT tenant_id FROM tenants WHERE tenant = ?)"
_STREAM_ID: Final = (
    f"(SELECT stream_id FROM streams WHERE tenant_id = {_TENANT_ID} AND stream = ?)")


def _kind_ids(kinds: list[str]) -> str:
    # One scalar subquery per kind: the planner then knows the ids are as many as the names
    # (as with `kind IN (?,?)`). `IN (SELECT ... WHERE kind IN (?,?))` it guesses holds ~25,
    # and with one kind it cannot see the `=` that `kind IN (?)` became: it then walked
    # (tenant_id, occurred_at) or (tenant_id, position) where v2 searched the kind's range.
    one = "(SELECT kind_id FROM kinds WHERE kind = ?)"
    if len(kinds) == 1:
        return f"kind_id = {one}"
    return f"kind_id IN ({','.join([one] * len(kinds))})"


# Statements of fixed shape (module level, so tests can EXPLAIN them).
_GET_SQL: Final = f"SELECT {_EVENT_COLUMNS} FROM events WHERE tenant_id = {_TENANT_ID} AND id = ?"
_HEAD_SQL: Final = (f"SELECT {_STREAM_COLUMNS}, stream_id FROM streams"
                    f" WHERE tenant_id = {_TENANT_ID} AND stream = ?")
# By the id from the head's read: an id never changes nor moves to another stream, and events
# 1 and head.seq are there for good, whatever was committed in between.
_ENDS_SQL: Final = (f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_id = ?"
                    " AND seq IN (1, ?) ORDER BY seq")
# One statement, so one snapshot: the rejections counted are those of the same commits.
_STATS_SQL: Final = ("SELECT coalesce(sum(head_seq), 0), count(*), max(last_position),"
                     " max(updated_at), (SELECT count(*) FROM rejections WHERE tenant = ?)"
                     f" FROM streams WHERE tenant_id = {_TENANT_ID}")


def events_sql(tenant: str, q: EventsQuery) -> tuple[str, list[Any]]:
    """The one statement an events query runs (pure, so tests can EXPLAIN it)."""
    where = [f"tenant_id = {_TENANT_ID}"]
    params: list[Any] = [tenant]
    if q.stream is not None:
        # The tenant stays bounded too (redundant): the planner keeps the choices it had
        # with (tenant, stream, seq), e.g. walking (tenant_id, occurred_at) in order.
        where.append(f"stream_id = {_STREAM_ID}")
        params.extend((tenant, q.stream))
    if q.kinds:
        where.append(_kind_ids(q.kinds))
        params.extend(q.kinds)
    if q.correlation_id is not None:
        where.append("correlation_id = ?")
        params.append(q.correlation_id)
    if q.causation_id is not None:
        where.append("causation_id = ?")
        params.append(q.causation_id)
    if q.time_from is not None and q.time_to is not None and q.time_from > q.time_to:
        raise InvalidQuery("time_from is after time_to: the range is empty")
    if q.time_from is not None:
        where.append("occurred_at >= ?")
        params.append(to_micros(q.time_from))
    if q.time_to is not None:
        where.append("occurred_at <= ?")
        params.append(to_micros(q.time_to))
    if q.after_seq is not None:
        if q.stream is None:
            raise InvalidQuery("after_seq needs a stream: seqs count events per stream")
        where.append("seq > ?")
        params.append(q.after_seq)
    if q.after_position is not None:
        where.append("position > ?")
        params.append(q.after_position)
    cmp = ">" if q.order == "asc" else "<"
    direction = "ASC" if q.order == "asc" else "DESC"
    if q.order_by == "occurred_at":
        if q.cursor is not None:
            where.append(f"(occurred_at, position) {cmp} (?, ?)")
            params.extend(_decode_cursor("t", q.cursor, 2))
        order = f"occurred_at {direction}, position {direction}"
    else:
        if q.cursor is not None:
            where.append(f"position {cmp} ?")
            params.extend(_decode_cursor("e", q.cursor))
        # Within one stream, seq and position rise together; ordering by seq lets
        # SQLite walk the (stream_id, seq) index instead of sorting.
        order = f"{'seq' if q.stream is not None else 'position'} {direction}"
    where_sql = " AND ".join(where)
    ranged = q.time_from is not None or q.time_to is not None
    if q.order_by == "occurred_at" or q.stream is not None or not ranged:
        sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE {where_sql} ORDER BY {order} LIMIT ?"
        return sql, [*params, q.limit + 1]
    # A time range ordered by position: the range is found on a time index and sorted by
    # position. Deferred row fetch: the inner select reads that index alone and sorts
    # integers, and only the page's rows are read, each once. Reading and sorting every row
    # of the range (two pages' worth) made the benchmark's page SQL 0.70 ms p50, against
    # 0.44 this way (docs/performance.md, round 9).
    index = ""
    if q.kinds and q.correlation_id is None and q.causation_id is None:
        # Named, not left to the planner: without statistics (the worker never runs
        # ANALYZE) it walked the tenant's positions for two kinds, filtering every event
        # since the tenant's first (215 ms a page at 1M events, growing with the ledger).
        index = " INDEXED BY events_tenant_kind_time"
    sql = (
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE position IN (SELECT position FROM events"
        f"{index} WHERE {where_sql} ORDER BY {order} LIMIT ?) ORDER BY {order}"
    )
    return sql, [*params, q.limit + 1]


def streams_sql(tenant: str, q: StreamsQuery) -> tuple[str, list[Any]]:
    # last_kind is still a name in streams (no kinds subquery): the listing returns it.
    where = [f"tenant_id = {_TENANT_ID}"]
    params: list[Any] = [tenant]
    if q.last_kinds:
        where.append(f"last_kind IN ({','.join('?' * len(q.last_kinds))})")
        params.extend(q.last_kinds)
    if q.cursor is not None:
        where.append("first_position > ?" if q.order == "asc" else "first_position < ?")
        params.extend(_decode_cursor("s", q.cursor))
    direction = "ASC" if q.order == "asc" else "DESC"
    sql = (f"SELECT {_STREAM_COLUMNS} FROM streams WHERE {' AND '.join(where)}"
           f" ORDER BY first_position {direction} LIMIT ?")
    return sql, [*params, q.limit + 1]


def _rows(conn: sqlite3.Connection, sql: str, params: list[Any]) -> list[Any]:
    cur = conn.execute(sql, params)
    try:
        return cur.fetchall()
    finally:
        cur.close()


def _connect(path: Path) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions, each statement is its own read.
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("PRAGMA query_only=1")
        conn.execute("PRAGMA busy_timeout=5000")
    except BaseException:
        conn.close()
        raise
    return conn


class LedgerReader:
    """Read-only connections, each used by one query at a time from a thread of its own.

    Create with `await LedgerReader.open(...)`. Query methods return the reply's bytes in the
    requested content type (MessagePack or JSON).
    """

    def __init__(self, pool: list[sqlite3.Connection], max_reply_bytes: int) -> None:
        self._all = pool
        self._free: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        for conn in pool:
            self._free.put(conn)
        # As many threads as connections: a thread never waits for a connection. Two (the
        # default): on 2 cores, 4 served no more pages (341 vs 349/s at c=32) and each extra
        # thread running SQL takes a share of the CPU from ingest.
        self._threads = ThreadPoolExecutor(max_workers=len(pool),
                                           thread_name_prefix="jetledger-reader")
        self.max_reply_bytes = max_reply_bytes

    @classmethod
    async def open(
        cls, path: Path, *, connections: int = 2, max_reply_bytes: int = 1024 * 1024
    ) -> LedgerReader:
        def connect_all() -> list[sqlite3.Connection]:
            pool: list[sqlite3.Connection] = []
            try:
                for _ in range(connections):
                    pool.append(_connect(path))
            except BaseException:
                for conn in pool:
                    conn.close()
                raise
            return pool

        return cls(await asyncio.to_thread(connect_all), max_reply_bytes)

    async def close(self) -> None:
        def close_all() -> None:
            self._threads.shutdown(wait=True)
            for conn in self._all:
                conn.close()

        await asyncio.to_thread(close_all)

    def _with_conn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._free.get()
        try:
            return fn(conn)
        finally:
            self._free.put(conn)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn` with a connection of its own, in a reader thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, self._with_conn, fn)

    def _events_page(
        self, conn: sqlite3.Connection, tenant: str, q: EventsQuery, content_type: str
    ) -> bytes:
        rows: list[Row] = _rows(conn, *events_sql(tenant, q))
        more = len(rows) > q.limit
        served: list[bytes] = []
        size = _REPLY_OVERHEAD
        for row in rows[: q.limit]:
            event = spliced_event(row)
            size += len(event) * 2  # JSON may be larger than msgpack
            if size > self.max_reply_bytes and served:
                more = True
                break
            served.append(event)
        cursor = None
        if more and served:
            last = rows[len(served) - 1]
            cursor = (
                _encode_cursor("t", last[5], last[2])
                if q.order_by == "occurred_at"
                else _encode_cursor("e", last[2])
            )
        if content_type == JSON:
            return encode(EventsPage(events=[stored_event(r) for r in rows[: len(served)]],
                                     next_cursor=cursor), JSON)
        return _msgpack.encode(
            _RawEventsPage(events=[msgspec.Raw(e) for e in served], next_cursor=cursor))

    async def events(self, tenant: str, q: EventsQuery, content_type: str = MSGPACK) -> bytes:
        """An `EventsPage`, encoded."""
        return await self._run(lambda conn: self._events_page(conn, tenant, q, content_type))

    async def get(self, tenant: str, event_id: str, content_type: str = MSGPACK) -> bytes:
        """A `StoredEvent`, encoded."""

        def one(conn: sqlite3.Connection) -> bytes:
            rows: list[Row] = _rows(conn, _GET_SQL, [tenant, event_id])
            if not rows:
                raise NotFound(f"no event with id {event_id!r} in tenant {tenant!r}")
            if content_type == JSON:
                return encode(stored_event(rows[0]), JSON)
            return spliced_event(rows[0])

        return await self._run(one)

    async def head(self, tenant: str, stream: str) -> StreamHead:
        return await self._run(lambda conn: self._head_of(conn, tenant, stream)[1])

    @staticmethod
    def _head_of(conn: sqlite3.Connection, tenant: str, stream: str) -> tuple[int, StreamHead]:
        """The stream's id and head."""
        rows = _rows(conn, _HEAD_SQL, [tenant, stream])
        if not rows:
            raise NotFound(f"stream {stream!r} has no events in tenant {tenant!r}")
        return rows[0][7], _head(rows[0])

    async def streams(self, tenant: str, q: StreamsQuery) -> StreamsPage:
        """Ordered by creation (first_position): a stream's place never moves, so a cursor
        stays correct while events arrive; new streams only appear at the newest end."""
        sql, params = streams_sql(tenant, q)
        rows = await self._run(lambda conn: _rows(conn, sql, params))
        heads = [_head(r) for r in rows[: q.limit]]
        cursor = _encode_cursor("s", heads[-1].first_position) if len(rows) > q.limit else None
        return StreamsPage(streams=heads, next_cursor=cursor)

    async def stream(self, tenant: str, stream: str, content_type: str = MSGPACK) -> bytes:
        """A `StreamRecord`, encoded."""

        def record(conn: sqlite3.Connection) -> bytes:
            stream_id, head = self._head_of(conn, tenant, stream)
            rows: list[Row] = _rows(conn, _ENDS_SQL, [stream_id, head.seq])
            first, last = rows[0], rows[-1]
            if content_type == JSON:
                return encode(StreamRecord(head=head, first=stored_event(first),
                                           last=stored_event(last)), JSON)
            return _msgpack.encode(_RawStreamRecord(
                head=head, first=msgspec.Raw(spliced_event(first)),
                last=msgspec.Raw(spliced_event(last))))

        return await self._run(record)

    async def stats(self, tenant: str) -> TenantStats:
        """Counts from the stream heads (seqs are gap-free, so their sum is the number of
        events): one row per stream read, never a scan of the events."""

        def counts(conn: sqlite3.Connection) -> TenantStats:
            events, streams, last_position, last_at, rejections = _rows(
                conn, _STATS_SQL, [tenant, tenant])[0]
            return TenantStats(
                events=events, streams=streams, rejections=rejections,
                last_position=last_position,
                last_recorded_at=from_micros(last_at) if last_at is not None else None)

        return await self._run(counts)

    async def rejections(self, tenant: str, q: RejectionsQuery) -> RejectionsPage:
        where = ["tenant = ?"]
        params: list[Any] = [tenant]
        if q.codes:
            where.append(f"code IN ({','.join('?' * len(q.codes))})")
            params.extend(q.codes)
        if q.cursor is not None:
            where.append("rid > ?" if q.order == "asc" else "rid < ?")
            params.extend(_decode_cursor("r", q.cursor))
        direction = "ASC" if q.order == "asc" else "DESC"
        sql = ("SELECT rid, js_seq, subject, code, reason, recorded_at, event_id, length(raw)"
               f" FROM rejections WHERE {' AND '.join(where)} ORDER BY rid {direction} LIMIT ?")
        rows = await self._run(lambda conn: _rows(conn, sql, [*params, q.limit + 1]))
        items = [
            RejectionInfo(rid=r[0], js_seq=r[1], subject=r[2], code=r[3], reason=r[4],
                          recorded_at=from_micros(r[5]), event_id=r[6], raw_size=r[7])
            for r in rows[: q.limit]
        ]
        cursor = _encode_cursor("r", items[-1].rid) if len(rows) > q.limit else None
        return RejectionsPage(rejections=items, next_cursor=cursor)
