"""Every event is stored exactly once, however often it is published or redelivered, and
every consumed event ends in exactly one outcome: inserted, duplicate or conflict."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import msgspec
import nats
import pytest
from conftest import RunningWorker
from harness import check_ledger, query

from jetledger.client import (
    ConflictError,
    LedgerClient,
    RejectedError,
    encode,
    new_event,
)
from jetledger.schemas import Event, Subjects
from jetledger.worker.ingest import decode_message
from jetledger.worker.writer import LedgerWriter


async def test_republishing_the_same_event_stores_it_once(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    event = new_event(tenant="acme", stream="run", kind="k", data={"n": 1})
    results = [await ledger.append(event, wait=True) for _ in range(3)]
    assert [r.outcome for r in results] == ["inserted", "duplicate", "duplicate"]
    assert {(r.seq, r.position) for r in results} == {(1, 1)}
    assert len({r.js_seq for r in results}) == 3  # three copies in JetStream, one row
    report = check_ledger(worker.db_path)
    assert (report.events, report.rejections) == (1, 0)


async def test_dedupe_holds_after_jetstream_duplicate_window(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    event = new_event(tenant="acme", stream="run", kind="k", data={})
    await ledger.append(event, wait=True)
    await asyncio.sleep(0.3)  # the stream's duplicate window (the server minimum) is over
    again = await ledger.append(event, wait=True)
    assert again.outcome == "duplicate"
    assert check_ledger(worker.db_path).events == 1


async def test_same_id_different_content_is_a_conflict_and_the_original_stays(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    original = new_event(tenant="acme", stream="run", kind="k", data={"v": "original"})
    await ledger.append(original, wait=True)
    impostor = msgspec.structs.replace(original, data={"v": "rewritten"})
    with pytest.raises(ConflictError, match="already stored with different content") as err:
        await ledger.append(impostor, wait=True)
    assert isinstance(err.value, RejectedError) and err.value.event_id == original.id
    assert (await ledger.get(original.id)).data == {"v": "original"}
    rows = query(worker.db_path, "SELECT code, event_id, existing_hash, new_hash FROM rejections")
    assert len(rows) == 1
    code, event_id, existing_hash, new_hash = rows[0]
    assert (code, event_id) == ("conflict", original.id)
    assert len(existing_hash) == len(new_hash) == 32 and existing_hash != new_hash
    assert check_ledger(worker.db_path).events == 1


async def test_a_conflict_is_recorded_once_even_when_published_without_waiting(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    original = new_event(tenant="acme", stream="run", kind="k", data={"v": 1})
    await ledger.append(original, wait=True)
    await ledger.append(msgspec.structs.replace(original, data={"v": 2}))
    for _ in range(100):
        if query(worker.db_path, "SELECT count(*) FROM rejections")[0][0]:
            break
        await asyncio.sleep(0.05)
    assert query(worker.db_path, "SELECT code FROM rejections") == [("conflict",)]


async def test_same_id_in_two_tenants_is_two_events(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    for tenant in ("acme", "globex"):
        res = await ledger.append(
            new_event(tenant=tenant, id="shared-id", stream="s", kind="k", data={}), wait=True
        )
        assert res.outcome == "inserted"
    assert check_ledger(worker.db_path).events == 2


async def test_redelivered_messages_are_no_ops(worker: RunningWorker) -> None:
    """Publish the same bytes many times straight to JetStream, as a retrying producer or a
    redelivery would present them to the worker: one row."""
    event = new_event(tenant="acme", stream="run", kind="k", data={"x": 1})
    nc = await nats.connect(worker.url)
    try:
        js = nc.jetstream()
        for _ in range(20):
            await js.publish("jetledger.evt.acme.k", encode(event))
    finally:
        await nc.close()
    assert worker.worker.ingestor is not None
    stats = worker.worker.ingestor.stats
    # The ingest loop counts a batch after its commit returns: a commit is visible in the
    # file a moment before its outcomes are counted, so wait for the counts themselves.
    for _ in range(100):
        done = query(worker.db_path, "SELECT max(last_js_seq) FROM ingest_state")[0][0]
        if done == 20 and stats.inserted + stats.duplicate == 20:
            break
        await asyncio.sleep(0.05)
    assert (stats.inserted, stats.duplicate) == (1, 19)
    assert check_ledger(worker.db_path).events == 1


async def test_without_a_notice_the_outcome_is_decided_from_the_ledger_correctly(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    """The outcome notice is best effort. Here the worker refuses to notify (the inbox is not
    the tenant's own reply inbox), so the client falls back to asking the ledger, which must
    still tell inserted, duplicate and conflict apart."""
    original = new_event(tenant="acme", stream="run", kind="k", data={"v": 1})
    await ledger.append(original, wait=True)
    blind = await LedgerClient.connect(worker.url, tenant="acme",
                                       inbox_prefix="_INBOX_elsewhere", timeout=1)
    try:
        fresh = await blind.append(new_event(tenant="acme", stream="run", kind="k", data={}),
                                   wait=True)
        assert (fresh.outcome, fresh.seq) == ("inserted", 2)
        again = await blind.append(original, wait=True)
        assert (again.outcome, again.seq) == ("duplicate", 1)
        with pytest.raises(ConflictError, match="already stored with different content"):
            await blind.append(msgspec.structs.replace(original, data={"v": 2}), wait=True)
    finally:
        await blind.close()


async def test_a_redelivered_batch_wider_than_one_lookup_is_still_decided_from_the_ledger(
    tmp_path: Path,
) -> None:
    """The writer looks up a batch's stored ids, stream heads and earlier rejections with as
    few statements as SQLite's limit of 999 bound values allows. A batch that needs several of
    each (600 tenants, 1700 streams, 2103 messages) is redelivered: every event is a duplicate
    at its original seq and position, and each rejection that would pass now (in the first,
    middle and last thousand messages) stays rejected. Then every stream carries on from its
    real head."""
    subjects = Subjects()
    small = [new_event(tenant=f"t{i:03d}", stream=f"s{i % 3}", kind="k", data={"i": i})
             for i in range(600)]
    big = [new_event(tenant="big", stream=f"run{i % 1100}", kind="k", data={"i": i})
           for i in range(1500)]
    events = small + big

    def stale(stream: str) -> Event:
        # Each stream named here holds 1 event (or none) where this one is decided and 2 once
        # the batch is in: refused on the first delivery, it would pass on the second.
        return new_event(tenant="big", stream=stream, kind="k", data={}, expected_seq=2)

    sent = [stale("run0"), *events[:1600], stale("run5"), *events[1600:2050], stale("run399"),
            *events[2050:]]
    refused = {0, 1601, 2052}
    batch = [decode_message(subjects, f"jetledger.evt.{ev.tenant}.k", encode(ev), None, seq)
             for seq, ev in enumerate(sent, start=1)]
    heads = Counter((ev.tenant, ev.stream) for ev in events)
    following = [new_event(tenant=t, stream=s, kind="k", data={}) for t, s in heads]
    writer = await LedgerWriter.open(tmp_path / "ledger.db", js_stream="JETLEDGER")
    try:
        once = await writer.commit(batch)
        again = await writer.commit(batch)
        after = await writer.commit([
            decode_message(subjects, f"jetledger.evt.{ev.tenant}.k", encode(ev), None,
                           len(sent) + n) for n, ev in enumerate(following, start=1)])
    finally:
        await writer.close()
    assert [o.outcome for (o,) in once] == [
        "rejected" if i in refused else "inserted" for i in range(len(sent))]
    assert [(o.outcome, o.code, o.seq, o.position) for (o,) in again] == [
        (o.outcome, o.code, o.seq, o.position) if i in refused
        else ("duplicate", None, o.seq, o.position) for i, (o,) in enumerate(once)]
    assert all(again[i][0].code == "expected_seq_mismatch" for i in refused)
    assert [(o.outcome, o.seq) for (o,) in after] == [
        ("inserted", heads[(ev.tenant, ev.stream)] + 1) for ev in following]
    db = tmp_path / "ledger.db"
    assert check_ledger(db).events == len(events) + len(following)
    assert query(db, "SELECT js_seq FROM rejections ORDER BY js_seq") == [
        (i + 1,) for i in sorted(refused)]
