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
    StreamHead,
    StreamsPage,
    StreamsQuery,
)

from .times import from_micros, to_micros

__all__ = ["LedgerReader"]

_EVENT_COLUMNS = "body, seq, position, recorded_at, js_seq"
_body_decoder = msgspec.msgpack.Decoder(Event)
_size_encoder = msgspec.msgpack.Encoder()
# Room for the page envelope, the cursor and headers inside max_payload.
_REPLY_OVERHEAD = 1024


def _encode_cursor(tag: str, value: int) -> str:
    return base64.urlsafe_b64encode(msgspec.msgpack.encode([tag, value])).decode().rstrip("=")


def _decode_cursor(tag: str, cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        got_tag, value = msgspec.msgpack.decode(raw, type=tuple[str, int])
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise InvalidQuery("cursor is not valid: pass back a next_cursor exactly as received")
    if got_tag != tag:
        raise InvalidQuery(f"cursor belongs to another kind of listing, not {tag!r}")
    return value


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
        if q.cursor is not None:
            where.append("position > ?" if q.order == "asc" else "position < ?")
            params.append(_decode_cursor("e", q.cursor))
        # Within one stream, seq and position rise together; ordering by seq lets SQLite
        # walk the (tenant, stream, seq) index instead of sorting.
        key = "seq" if q.stream is not None else "position"
        direction = "ASC" if q.order == "asc" else "DESC"
        sql = (
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE {' AND '.join(where)}"
            f" ORDER BY {key} {direction} LIMIT ?"
        )
        rows = await self._all_rows(sql, [*params, q.limit + 1])
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
        cursor = _encode_cursor("e", events[-1].position) if more and events else None
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
            "SELECT stream, head_seq, first_position, last_position, last_kind, created_at,"
            " updated_at FROM streams WHERE tenant = ? AND stream = ?",
            [tenant, stream],
        )
        if not rows:
            raise NotFound(f"stream {stream!r} has no events in tenant {tenant!r}")
        return _head(rows[0])

    async def streams(self, tenant: str, q: StreamsQuery) -> StreamsPage:
        where = "tenant = ?"
        params: list[Any] = [tenant]
        if q.cursor is not None:
            where += " AND last_position < ?"
            params.append(_decode_cursor("s", q.cursor))
        rows = await self._all_rows(
            "SELECT stream, head_seq, first_position, last_position, last_kind, created_at,"
            f" updated_at FROM streams WHERE {where} ORDER BY last_position DESC LIMIT ?",
            [*params, q.limit + 1],
        )
        heads = [_head(r) for r in rows[: q.limit]]
        cursor = _encode_cursor("s", heads[-1].last_position) if len(rows) > q.limit else None
        return StreamsPage(streams=heads, next_cursor=cursor)
