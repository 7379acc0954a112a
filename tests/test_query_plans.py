"""No listing scans the whole events table: every query shape is served by an index.

The plans are read from SQLite itself (EXPLAIN QUERY PLAN) on the statements the reader
really runs, on a ledger holding several tenants, kinds and streams: as the worker leaves it
(it never runs ANALYZE, so the planner has no statistics) and after ANALYZE. Names are
resolved inside each statement by subqueries: each must be a search of its unique index.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from jetledger.schemas.queries import EventsQuery, StreamsQuery
from jetledger.worker.reader import (
    _ENDS_SQL,
    _GET_SQL,
    _HEAD_SQL,
    _STATS_SQL,
    _encode_cursor,
    events_sql,
    streams_sql,
)
from jetledger.worker.schema import DDL

T0 = datetime(2026, 1, 1, tzinfo=UTC)
DAY = T0 + timedelta(days=1)


@pytest.fixture(scope="module", params=["no statistics", "after ANALYZE"])
def db(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
       ) -> sqlite3.Connection:
    path: Path = tmp_path_factory.mktemp("plans") / "ledger.db"
    conn = sqlite3.connect(path)
    conn.executescript(DDL)
    # Ids are the name's number + 1; stream s{i} belongs to tenant t{i % 20}.
    conn.executemany("INSERT INTO tenants VALUES (?,?)", [(i + 1, f"t{i}") for i in range(20)])
    conn.executemany("INSERT INTO kinds VALUES (?,?)", [(i + 1, f"k{i}") for i in range(12)])
    conn.executemany("INSERT INTO streams VALUES (?,?,?,?,?,?,?,?,?)",
                     [(i + 1, i % 20 + 1, f"s{i}", 50, i + 1, i + 8000, f"k{i % 12}", 0, 0)
                      for i in range(400)])
    rows = []
    for pos in range(1, 20001):
        corr = f"c{pos % 500}" if pos % 3 == 0 else None
        rows.append((pos, pos % 20 + 1, f"id{pos}", pos % 400 + 1, pos // 400 + 1,
                     pos % 12 + 1, pos * 1000, pos * 1000, corr, None, pos, b"h", b"b"))
    conn.executemany("INSERT INTO events (position, tenant_id, id, stream_id, seq, kind_id,"
                     " occurred_at, recorded_at, correlation_id, causation_id, js_seq,"
                     " content_hash, body) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    if request.param == "after ANALYZE":
        conn.execute("ANALYZE")
    conn.commit()
    return conn


def plan(db: sqlite3.Connection, sql: str, params: list[object]) -> tuple[str, list[str]]:
    """The plan of the statement itself (its loops and sorts), and the plan lines of the
    subqueries it runs (those nested under a SCALAR SUBQUERY node: the name lookups). A
    deferred row fetch (`position IN (SELECT position ...)`) is part of the statement: its
    list subquery's lines follow the outer search by primary key."""
    rows = db.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    in_subquery: dict[int, bool] = {0: False}
    main: list[str] = []
    sub: list[str] = []
    for node, parent, _, detail in rows:
        if detail.startswith("LIST SUBQUERY") and not in_subquery.get(parent, False):
            in_subquery[node] = False
            continue
        in_subquery[node] = in_subquery.get(parent, False) or "SUBQUERY" in detail
        (sub if in_subquery[node] else main).append(detail)
    return " | ".join(main), sub


def assert_names_by_unique_index(sub: list[str], tables: set[str]) -> None:
    """Each name is looked up once, in its dictionary (or streams) table's unique index."""
    searches = [line for line in sub if "SUBQUERY" not in line]
    assert {line.split()[1] for line in searches} == tables, sub
    for line in searches:
        assert line.startswith("SEARCH ") and "USING COVERING INDEX sqlite_autoindex_" in line, sub


# shape -> (query, the events index it must search)
SHAPES = {
    "tenant, newest first": (EventsQuery(order="desc"), "events_tenant_position"),
    "stream replay": (EventsQuery(stream="s23"), "events_stream_seq"),
    "stream after seq": (EventsQuery(stream="s23", after_seq=10), "events_stream_seq"),
    "kind": (EventsQuery(kinds=["k3"]), "events_tenant_position"),
    # One kind goes in as `kind_id = (subquery)`: with `IN (subquery)` this walked
    # events_tenant_time instead (the planner could not see it was one id).
    "kind + time range by occurrence": (
        EventsQuery(kinds=["k3"], time_from=T0, time_to=DAY, order_by="occurred_at"),
        "events_tenant_kind_time"),
    "time range by occurrence": (
        EventsQuery(time_from=T0, time_to=DAY, order_by="occurred_at"), "events_tenant_time"),
    "correlation": (EventsQuery(correlation_id="c9"), "events_tenant_correlation"),
    "after position": (EventsQuery(after_position=15000), "events_tenant_position"),
    "interleaved by occurrence, descending": (
        EventsQuery(order_by="occurred_at", order="desc"), "events_tenant_time"),
}


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_events_listing_uses_an_index(db: sqlite3.Connection, shape: str) -> None:
    query, index = SHAPES[shape]
    sql, params = events_sql("t3", query)
    main, sub = plan(db, sql, params)
    # SEARCH = index lookup bounded by the tenant (and more); SCAN would read every row.
    assert main.startswith(f"SEARCH events USING INDEX {index} ("), main
    assert "SCAN" not in main and "TEMP B-TREE" not in main, main
    tables = {"tenants"}
    if query.stream is not None:
        tables.add("streams")
    if query.kinds:
        tables.add("kinds")
    assert_names_by_unique_index(sub, tables)


def test_get_by_id_uses_the_unique_index(db: sqlite3.Connection) -> None:
    main, sub = plan(db, _GET_SQL, ["t3", "id3"])
    assert main == "SEARCH events USING INDEX events_tenant_id (tenant_id=? AND id=?)", main
    assert_names_by_unique_index(sub, {"tenants"})


def test_stream_record_reads_the_head_then_two_events_by_key(db: sqlite3.Connection) -> None:
    main, sub = plan(db, _HEAD_SQL, ["t3", "s23"])
    assert main.startswith("SEARCH streams USING INDEX sqlite_autoindex_streams_1"
                           " (tenant_id=? AND stream=?)"), main
    assert_names_by_unique_index(sub, {"tenants"})
    main, sub = plan(db, _ENDS_SQL, [24, 50])
    assert main == "SEARCH events USING INDEX events_stream_seq (stream_id=? AND seq=?)", main
    assert sub == []


def test_stats_read_the_tenants_stream_heads(db: sqlite3.Connection) -> None:
    main, sub = plan(db, _STATS_SQL, ["t3", "t3"])
    assert main.startswith("SEARCH streams USING INDEX") and "(tenant_id=?)" in main, main
    # The rejections count, in the same statement (one snapshot), searches its index.
    assert "SEARCH rejections USING COVERING INDEX rejections_tenant (tenant=?)" in sub, sub
    assert_names_by_unique_index(
        [line for line in sub if "rejections" not in line], {"tenants"})


@pytest.mark.parametrize(("query", "index"), [
    (StreamsQuery(), "streams_tenant_created"),
    (StreamsQuery(last_kinds=["k1"]), "streams_tenant_last_kind"),
], ids=["streams", "streams by last kind"])
def test_streams_listing_uses_an_index(
    db: sqlite3.Connection, query: StreamsQuery, index: str
) -> None:
    sql, params = streams_sql("t3", query)
    main, sub = plan(db, sql, params)
    assert main.startswith(f"SEARCH streams USING INDEX {index} ("), main
    assert "TEMP B-TREE" not in main, main
    assert_names_by_unique_index(sub, {"tenants"})


@pytest.mark.parametrize("kinds", [["k3"], ["k3", "k5"]], ids=["one kind", "two kinds"])
@pytest.mark.parametrize("cursor", [None, _encode_cursor("e", 15000)],
                         ids=["first page", "next page"])
def test_kind_and_time_range_by_position_searches_the_range_then_sorts_it(
    db: sqlite3.Connection, kinds: list[str], cursor: str | None,
) -> None:
    """The page shape the benchmark measures: the index alone bounds the range and its
    positions are sorted (never a scan of the tenant), then only the page's rows are read,
    by primary key; see docs/queries.md. Several kinds go in as one scalar subquery each:
    under `IN (subquery)` the planner guessed ~25 ids and walked the tenant's positions from
    the cursor instead; and the index is named, since without statistics it walked the
    tenant's positions for several kinds anyway."""
    sql, params = events_sql("t3", EventsQuery(
        kinds=kinds, time_from=T0, time_to=T0 + timedelta(seconds=30), limit=100,
        cursor=cursor))
    main, sub = plan(db, sql, params)
    assert main == ("SEARCH events USING INTEGER PRIMARY KEY (rowid=?)"
                    " | SEARCH events USING COVERING INDEX events_tenant_kind_time"
                    " (tenant_id=? AND kind_id=? AND occurred_at>? AND occurred_at<?)"
                    " | USE TEMP B-TREE FOR ORDER BY"), main
    assert_names_by_unique_index(sub, {"tenants", "kinds"})
    assert sum("SEARCH kinds" in line for line in sub) == len(kinds), sub


def test_time_range_by_position_sorts_positions_from_the_time_index_alone(
    db: sqlite3.Connection,
) -> None:
    """Without a kind: the range is searched in events_tenant_time (covering: positions
    only), then the page's rows are read by primary key."""
    sql, params = events_sql("t3", EventsQuery(time_from=T0, time_to=DAY, limit=100))
    main, sub = plan(db, sql, params)
    assert main == ("SEARCH events USING INTEGER PRIMARY KEY (rowid=?)"
                    " | SEARCH events USING COVERING INDEX events_tenant_time"
                    " (tenant_id=? AND occurred_at>? AND occurred_at<?)"
                    " | USE TEMP B-TREE FOR ORDER BY"), main
    assert_names_by_unique_index(sub, {"tenants"})
