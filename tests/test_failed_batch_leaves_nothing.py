"""A batch the database refuses leaves nothing behind, not even the tenant, kind and stream
names it brought: the ledger stores names once, in dictionary tables, and the writer keeps
the ids it has committed in memory. An id given inside a transaction that rolls back must be
forgotten with it, or the next batch would point its events at a name row that was never
written.

The refusal is a real SQLite error raised inside the writer's transaction (a trigger on the
file aborts the insert of one event), after the new names were given ids.

A caller that gives up (a stop, a timeout) does not split a transaction either: it ends on the
writer's thread, whole or not at all, and the batch, never acked, settles when it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest
from harness import check_ledger, query

from jetledger.client import encode, new_event
from jetledger.schemas import Event, Subjects
from jetledger.worker.ingest import Decoded, decode_message
from jetledger.worker.writer import LedgerWriter

subjects = Subjects()


def _messages(events: list[Event], first_js_seq: int) -> list[Decoded]:
    return [decode_message(subjects, subjects.event(ev.tenant, ev.kind), encode(ev), None, seq)
            for seq, ev in enumerate(events, start=first_js_seq)]


async def test_names_of_a_rolled_back_batch_are_written_again_by_the_next(
        tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    old = new_event(tenant="acme", stream="run-1", kind="step", data={})
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    try:
        await writer.commit(_messages([old], 1))
        boom = new_event(tenant="newco", stream="run-9", kind="tool_call", data={"x": 1})
        refused = [
            new_event(tenant="newco", stream="run-9", kind="plan", data={}),
            new_event(tenant="acme", stream="run-2", kind="tool_call", data={}),
            boom,
        ]
        conn = sqlite3.connect(db)
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON events"
                     f" WHEN NEW.id = '{boom.id}' BEGIN SELECT RAISE(ABORT, 'injected'); END")
        conn.commit()
        with pytest.raises(sqlite3.IntegrityError, match="injected"):
            await writer.commit(_messages(refused, 2))
        assert query(db, "SELECT tenant FROM tenants") == [("acme",)]
        assert query(db, "SELECT kind FROM kinds") == [("step",)]
        assert query(db, "SELECT stream FROM streams") == [("run-1",)]

        conn.execute("DROP TRIGGER refuse")
        conn.commit()
        conn.close()
        # Other new names first: they take the ids the rolled-back batch had given.
        other = new_event(tenant="other", stream="run-1", kind="review", data={})
        (first,) = await writer.commit(_messages([other], 5))
        outcomes = await writer.commit(_messages(refused, 2))
    finally:
        await writer.close()
    assert [(o.outcome, o.seq, o.position) for o in first] == [("inserted", 1, 2)]
    assert [(o.outcome, o.seq, o.position) for (o,) in outcomes] == [
        ("inserted", 1, 3), ("inserted", 1, 4), ("inserted", 2, 5)]
    # Every stored event joins to its names (check_ledger counts named_events, and finds no
    # name without events), each name once.
    assert check_ledger(db).events == 5
    assert query(db, "SELECT tenant, id, stream, seq, kind FROM named_events ORDER BY position"
                 ) == [(ev.tenant, ev.id, ev.stream, seq, ev.kind)
                       for ev, seq in zip([old, other, *refused], [1, 1, 1, 1, 2], strict=True)]
    assert query(db, "SELECT tenant_id, tenant FROM tenants ORDER BY tenant_id") == [
        (1, "acme"), (2, "other"), (3, "newco")]
    assert sorted(query(db, "SELECT kind FROM kinds")) == [
        ("plan",), ("review",), ("step",), ("tool_call",)]


async def test_a_commit_whose_caller_gives_up_ends_whole_or_not_at_all(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    events = [new_event(tenant=f"t{i % 7}", stream=f"run-{i % 50}", kind=f"k{i % 5}",
                        data={"i": i}) for i in range(20_000)]
    batch = _messages(events, 1)
    writer = await LedgerWriter.open(db, js_stream="JETLEDGER")
    try:
        task = asyncio.create_task(writer.commit(batch))
        await asyncio.sleep(0.02)  # the transaction is on the writer's thread now
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert task.cancelled()
        # Never acked, so JetStream delivers the batch again: after whatever the cancelled
        # transaction did, all of it is stored or none of it was.
        outcomes = await writer.commit(batch)
    finally:
        await writer.close()
    assert {o.outcome for outs in outcomes for o in outs} in ({"inserted"}, {"duplicate"})
    assert check_ledger(db).events == len(events)
    assert query(db, "SELECT count(*) FROM tenants") == [(7,)]
