"""An events page the reader joins from pieces is byte for byte msgspec's encoding of the
same page decoded (`EventsPage` of `StoredEvent`s): for every event of the reply tests, for
pages that share or do not share a recorded_at, and for pages cut short by the reply's size
(where the next_cursor must point at the last event served)."""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec
import pytest
from test_query_replies import ASSIGNED, EVENTS

from jetledger.schemas.codec import JSON, MSGPACK, canonical_bytes, encode
from jetledger.schemas.queries import EventsPage, EventsQuery
from jetledger.worker import reader as reader_mod
from jetledger.worker.reader import LedgerReader, Row, stored_event


def _rows(n_times: int) -> list[Row]:
    rows: list[Row] = []
    for i, event in enumerate(EVENTS.values()):
        seq, position, recorded_at, js_seq = ASSIGNED[i % n_times]
        rows.append((canonical_bytes(event), seq, position + i, recorded_at, js_seq, 0))
    return rows


def _reference(rows: list[Row], served: int, limit: int, content_type: str) -> bytes:
    cursor = None
    if served < len(rows) or len(rows) > limit:
        cursor = reader_mod._encode_cursor("e", rows[served - 1][2])
    return encode(EventsPage(events=[stored_event(r) for r in rows[:served]],
                             next_cursor=cursor), content_type)


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
@pytest.mark.parametrize("n_times", [1, len(ASSIGNED)])
@pytest.mark.parametrize("limit", [1, 15, 16, 17, 1000])
def test_page_is_msgspecs_encoding(monkeypatch: pytest.MonkeyPatch, content_type: str,
                                   n_times: int, limit: int) -> None:
    rows = _rows(n_times)
    monkeypatch.setattr(reader_mod, "_rows", lambda conn, sql, params: rows[: limit + 1])
    conn: Any = sqlite3.connect(":memory:")
    reader = LedgerReader([conn], max_reply_bytes=1 << 30)
    got = reader._events_page(conn, "acme", EventsQuery(limit=limit), content_type)
    served = min(limit, len(rows))
    assert got == _reference(rows[: limit + 1], served, limit, content_type)


@pytest.mark.parametrize("budget_events", [1, 2, 7, 20])
def test_page_cut_by_size_is_msgspecs_encoding(monkeypatch: pytest.MonkeyPatch,
                                                budget_events: int) -> None:
    rows = _rows(len(ASSIGNED))
    monkeypatch.setattr(reader_mod, "_rows", lambda conn, sql, params: rows[:1001])
    sizes = [len(reader_mod.spliced_event(r)) * 2 for r in rows]
    # Room for exactly `budget_events` events (the reader counts each twice, for JSON).
    budget = reader_mod._REPLY_OVERHEAD + sum(sizes[:budget_events])
    conn = sqlite3.connect(":memory:")
    reader = LedgerReader([conn], max_reply_bytes=budget)
    got = reader._events_page(conn, "acme", EventsQuery(limit=1000), MSGPACK)
    assert got == _reference(rows, budget_events, 1000, MSGPACK)
    page = msgspec.msgpack.decode(got, type=EventsPage)
    assert len(page.events) == budget_events and page.next_cursor is not None
