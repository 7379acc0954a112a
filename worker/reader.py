"""Read side of a ledger file: the queries the service answers, on read-only connections.

Readers never block the writer (WAL) and keep each read transaction to one statement, so
they never hold back WAL checkpoints for long.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import msgspec

from jetledger.schemas import Event, StoredEvent
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

__all__ = ["LedgerReader", "events_sql", "streams_sql"]

_EVENT_COLUMNS = "body, seq, position, recorded_at, js_seq"
_STREAM_COLUMNS = (
    "stream, head_seq, first_position, last_position, last_kind, created_at, updated_at"
)
_body_decoder = msgspec.msgpack.Decoder(Event)
_size_encoder = msgspec.msgpack.Encoder()
# Room for the page envelope, the cursor and headers inside max_payload.
_REPLY_OVERHEAD = 1024


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


def _stored(row: Any) -> StoredEvent:
    ev = _body_decoder.decode(row[0])
    return StoredEvent(
        **msgspec.structs.asdict(ev),
        seq=row[1],
        position=row[2],
        recorded_at=from_micros(row[3]),
        js_seq=row[4],
    )


def _head(row: Any) -> StreamHead:
    return StreamHead(
        stream=row[0], seq=row[1], first_position=row[2], last_position=row[3],
        last_kind=row[4], created_at=from_micros(row[5]), updated_at=from_micros(row[6]),
    )


def events_sql(tenant: str, q: EventsQuery) -> tuple[str, list[Any]]:
    """The one statement an events query runs (pure, so tests can EXPLAIN it)."""
    where = ["tenant = ?"]
    params: list[Any] = [tenant]
    if q.stream is not None:
        where.append("stream = ?")
        params.append(q.stream)
    if q.kinds:
        where.append(f"kind IN ({','.join('?' * len(q.kinds))})")
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
        # SQLite walk the (tenant, stream, seq) index instead of sorting.
        order = f"{'seq' if q.stream is not None else 'position'} {direction}"
    sql = (
        f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)}"
        f" ORDER BY {order} LIMIT ?"
    )
    return sql, [*params, q.limit + 1]


def streams_sql(tenant: str, q: StreamsQuery) -> tuple[str, list[Any]]:
    where = ["tenant = ?"]
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


class LedgerReader:
    """A small pool of read-only connections. Create with `await LedgerReader.open(...)`."""

    def __init__(self, pool: list[aiosqlite.Connection], max_reply_bytes: int) -> None:
        self._all = pool
        self._free: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in pool:
            self._free.put_nowait(conn)
        self.max_reply_bytes = max_reply_bytes

    @classmethod
    async def open(
        cls, path: Path, *, connections: int = 2, max_reply_bytes: int = 1024 * 1024
    ) -> LedgerReader:
        pool: list[aiosqlite.Connection] = []
        try:
            for _ in range(connections):
                conn = await aiosqlite.connect(f"file:{path}?mode=ro", uri=True)
                pool.append(conn)
                await conn.execute("PRAGMA query_only=1")
                await conn.execute("PRAGMA busy_timeout=5000")
        except BaseException:
            for conn in pool:
                await conn.close()
            raise
        return cls(pool, max_reply_bytes)

    async def close(self) -> None:
        for conn in self._all:
            await conn.close()

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[aiosqlite.Connection]:
        conn = await self._free.get()
        try:
            yield conn
        finally:
            self._free.put_nowait(conn)

    async def _all_rows(self, sql: str, params: list[Any]) -> list[Any]:
        async with self._conn() as conn, conn.execute(sql, params) as cur:
            return list(await cur.fetchall())

    async def events(self, tenant: str, q: EventsQuery) -> EventsPage:
        sql, params = events_sql(tenant, q)
        rows = await self._all_rows(sql, params)
        events: list[StoredEvent] = []
        size = _REPLY_OVERHEAD
        more = len(rows) > q.limit
        for row in rows[: q.limit]:
            event = _stored(row)
            size += len(_size_encoder.encode(event)) * 2  # JSON may be larger than msgpack
            if size > self.max_reply_bytes and events:
                more = True
                break
            events.append(event)
        cursor = None
        if more and events:
            last = events[-1]
            cursor = (
                _encode_cursor("t", to_micros(last.occurred_at), last.position)
                if q.order_by == "occurred_at"
                else _encode_cursor("e", last.position)
            )
        return EventsPage(events=events, next_cursor=cursor)

    async def get(self, tenant: str, event_id: str) -> StoredEvent:
        rows = await self._all_rows(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE tenant = ? AND id = ?",
            [tenant, event_id],
        )
        if not rows:
            raise NotFound(f"no event with id {event_id!r} in tenant {tenant!r}")
        return _stored(rows[0])

    async def head(self, tenant: str, stream: str) -> StreamHead:
        rows = await self._all_rows(
            f"SELECT {_STREAM_COLUMNS} FROM streams WHERE tenant = ? AND stream = ?",
            [tenant, stream],
        )
        if not rows:
            raise NotFound(f"stream {stream!r} has no events in tenant {tenant!r}")
        return _head(rows[0])

    async def streams(self, tenant: str, q: StreamsQuery) -> StreamsPage:
        """Ordered by creation (first_position): a stream's place never moves, so a cursor
        stays correct while events arrive; new streams only appear at the newest end."""
        rows = await self._all_rows(*streams_sql(tenant, q))
        heads = [_head(r) for r in rows[: q.limit]]
        cursor = _encode_cursor("s", heads[-1].first_position) if len(rows) > q.limit else None
        return StreamsPage(streams=heads, next_cursor=cursor)

    async def stream(self, tenant: str, stream: str) -> StreamRecord:
        head = await self.head(tenant, stream)
        rows = await self._all_rows(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE tenant = ? AND stream = ?"
            " AND seq IN (1, ?) ORDER BY seq",
            [tenant, stream, head.seq],
        )
        first, last = _stored(rows[0]), _stored(rows[-1])
        return StreamRecord(head=head, first=first, last=last)

    async def stats(self, tenant: str) -> TenantStats:
        """Counts from the stream heads (seqs are gap-free, so their sum is the number of
        events): one row per stream read, never a scan of the events."""
        rows = await self._all_rows(
            "SELECT coalesce(sum(head_seq), 0), count(*), max(last_position), max(updated_at)"
            " FROM streams WHERE tenant = ?", [tenant])
        events, streams, last_position, last_at = rows[0]
        (rejections,) = (await self._all_rows(
            "SELECT count(*) FROM rejections WHERE tenant = ?", [tenant]))[0]
        return TenantStats(
            events=events, streams=streams, rejections=rejections, last_position=last_position,
            last_recorded_at=from_micros(last_at) if last_at is not None else None)

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
        rows = await self._all_rows(
            "SELECT rid, js_seq, subject, code, reason, recorded_at, event_id, length(raw)"
            f" FROM rejections WHERE {' AND '.join(where)} ORDER BY rid {direction} LIMIT ?",
            [*params, q.limit + 1],
        )
        items = [
            RejectionInfo(rid=r[0], js_seq=r[1], subject=r[2], code=r[3], reason=r[4],
                          recorded_at=from_micros(r[5]), event_id=r[6], raw_size=r[7])
            for r in rows[: q.limit]
        ]
        cursor = _encode_cursor("r", items[-1].rid) if len(rows) > q.limit else None
        return RejectionsPage(rejections=items, next_cursor=cursor)
