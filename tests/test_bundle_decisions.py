"""A bundle (`EventBatch` with `atomic=False`, on `<prefix>.batch.<tenant>`) is decided event
by event, in order, exactly as if each event were its own message: one event's conflict,
stale expected_seq or invalid envelope leaves the others stored, and each refused event is
one rejection row (keyed by the message's js_seq and the event's item) with its own bytes.
Published here with plain nats-py, as a producer in any language would."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import nats
from conftest import RunningWorker
from harness import WorkerProcess, check_ledger, provision, query, wait_drained

from jetledger.client import LedgerClient, Outcome, new_event
from jetledger.schemas import JSON, Event, EventBatch, Subjects, encode
from jetledger.schemas.codec import canonical_bytes, decode_event
from jetledger.worker.ingest import decode_message
from jetledger.worker.natsserver import NatsServer
from jetledger.worker.writer import LedgerWriter

JSON_HEADERS = {"Content-Type": JSON}


def _ev(id_: str, stream: str = "s", *, tenant: str = "acme", expected_seq: int | None = None,
        **data: Any) -> Event:
    return new_event(tenant=tenant, stream=stream, kind="k", id=id_, data=data,
                     expected_seq=expected_seq,
                     occurred_at=datetime(2026, 1, 1, tzinfo=UTC))


def _bundle(items: list[bytes]) -> bytes:
    """A JSON bundle of events already encoded one by one (some maybe invalid)."""
    return b'{"events":[' + b",".join(items) + b'],"atomic":false}'


async def _publish(url: str, subject: str, data: bytes, *, notify: bool = True
                   ) -> tuple[int, list[Outcome] | None]:
    nc = await nats.connect(url)
    try:
        headers = dict(JSON_HEADERS)
        sub = None
        if notify:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox, max_msgs=1)
            headers["Jetledger-Notify"] = inbox
        js_seq = (await nc.jetstream().publish(subject, data, headers=headers)).seq
        if sub is None:
            return js_seq, None
        msg = await sub.next_msg(timeout=10)
        return js_seq, msgspec.msgpack.decode(msg.data, type=list[Outcome])
    finally:
        await nc.close()


def _hash(event: Event) -> bytes:
    return hashlib.sha256(canonical_bytes(decode_event(encode(event)))).digest()


async def test_each_event_of_a_bundle_is_decided_on_its_own(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    stored = _ev("orig", v=1)
    await ledger.append(stored, wait=True)  # stream s at seq 1
    conflicting = _ev("orig", v=2)
    items = [
        encode(_ev("a"), JSON),                       # 1 inserted, s:2
        encode(conflicting, JSON),                    # 2 conflict
        encode(_ev("b", expected_seq=2), JSON),       # 3 inserted, s:3 (a moved the head)
        encode(stored, JSON),                         # 4 duplicate
        encode(_ev("c", expected_seq=0), JSON),       # 5 rejected: s is at 3
        b'{"id":"bad","tenant":"acme","kind":"k"}',   # 6 rejected: not a valid envelope
        encode(_ev("a"), JSON),                       # 7 duplicate of item 1
        encode(_ev("n", "t", expected_seq=0), JSON),  # 8 inserted, t:1
        encode(msgspec.structs.replace(_ev("dot"), kind="k.x"), JSON),  # 9 rejected: kind
    ]
    js_seq, outs = await _publish(worker.url, "jetledger.batch.acme", _bundle(items))
    assert outs is not None
    assert [(o.id, o.outcome, o.code, o.stream, o.seq) for o in outs] == [
        ("a", "inserted", None, "s", 2),
        ("orig", "conflict", "conflict", None, None),
        ("b", "inserted", None, "s", 3),
        ("orig", "duplicate", None, "s", 1),
        ("c", "rejected", "expected_seq_mismatch", None, None),
        ("bad", "rejected", "invalid_event", None, None),
        ("a", "duplicate", None, "s", 2),
        ("n", "inserted", None, "t", 1),
        ("dot", "rejected", "invalid_event", None, None),
    ]
    assert outs[4].actual_seq == 3
    assert [o.position for o in outs if o.outcome == "inserted"] == [2, 3, 4]
    rows = query(worker.db_path,
                 "SELECT js_seq, item, subject, tenant, event_id, code, reason, raw,"
                 " existing_hash, new_hash FROM rejections ORDER BY item")
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        (js_seq, 2, "jetledger.batch.acme", "acme", "orig", "conflict"),
        (js_seq, 5, "jetledger.batch.acme", "acme", "c", "expected_seq_mismatch"),
        (js_seq, 6, "jetledger.batch.acme", "acme", "bad", "invalid_event"),
        (js_seq, 9, "jetledger.batch.acme", "acme", "dot", "invalid_event"),
    ]
    assert [r[7] for r in rows] == [items[1], items[4], items[5], items[8]]  # its own bytes
    assert (rows[0][8], rows[0][9]) == (_hash(stored), _hash(conflicting))
    assert "is at seq 3, not at the expected 0" in rows[1][6]
    assert "missing required field" in rows[2][6]
    assert "kind 'k.x' is not valid" in rows[3][6]
    assert check_ledger(worker.db_path).events == 4
    # The query side shows each refused event of the bundle.
    page = await ledger.rejections(order="asc")
    assert [(r.js_seq, r.event_id, r.code) for r in page.rejections] == \
        [(js_seq, "orig", "conflict"), (js_seq, "c", "expected_seq_mismatch"),
         (js_seq, "bad", "invalid_event"), (js_seq, "dot", "invalid_event")]


async def test_a_bundle_naming_another_tenant_or_not_decoding_is_rejected_whole(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    other = _bundle([encode(_ev("x1"), JSON), encode(_ev("x2", tenant="globex"), JSON)])
    seq1, outs1 = await _publish(worker.url, "jetledger.batch.acme", other)
    broken = b'{"events":[{"id":"y"}],"atomic":"no"}'
    seq2, outs2 = await _publish(worker.url, "jetledger.batch.acme", broken)
    assert outs1 is not None and outs2 is not None
    assert [(o.outcome, o.code) for o in outs1 + outs2] == [("rejected", "invalid_event")] * 2
    assert "differs from subject tenant" in (outs1[0].reason or "")
    assert query(worker.db_path, "SELECT js_seq, item, raw FROM rejections ORDER BY rid") == [
        (seq1, 0, other), (seq2, 0, broken)]
    assert check_ledger(worker.db_path).events == 0


async def test_an_atomic_batch_keeps_its_all_or_nothing_bytes_and_meaning() -> None:
    """`atomic` is omitted when true, so an atomic batch encodes exactly as before the
    field existed (older workers read it alike); a bundle says `"atomic":false`."""
    events = [_ev("a"), _ev("b")]
    assert b"atomic" not in encode(EventBatch(events=events), JSON)
    assert b'"atomic":false' in encode(EventBatch(events=events, atomic=False), JSON)


async def test_a_redelivered_bundle_replays_every_decision(tmp_path: Path) -> None:
    """Deterministic, at the writer: a bundle whose stale expected_seq event would pass on
    redelivery (events after it in the same batch moved the head there) stays rejected, its
    conflict stays a conflict, its inserts become duplicates; no row is written twice."""
    subjects = Subjects()
    writer = await LedgerWriter.open(tmp_path / "ledger.db", js_stream="JETLEDGER")
    try:
        first = [decode_message(subjects, "jetledger.evt.acme.k", encode(_ev(f"t{i}", "t")),
                                None, i) for i in (1, 2, 3)]
        await writer.commit(first)  # stream t at seq 3
        orig = _ev("orig", "u", v=1)
        await writer.commit([decode_message(subjects, "jetledger.evt.acme.k", encode(orig),
                                            None, 4)])
        bundle = EventBatch(events=[_ev("y", "t", expected_seq=5), _ev("w", "t"),
                                    _ev("orig", "u", v=2)], atomic=False)
        batch = [
            decode_message(subjects, "jetledger.batch.acme", encode(bundle), None, 5),
            decode_message(subjects, "jetledger.evt.acme.k", encode(_ev("t5", "t")), None, 6),
        ]
        once = await writer.commit(batch)
        again = await writer.commit(batch)
    finally:
        await writer.close()
    assert [(o.id, o.outcome) for o in once[0]] == [
        ("y", "rejected"), ("w", "inserted"), ("orig", "conflict")]
    assert [(o.id, o.outcome, o.code) for o in again[0]] == [
        ("y", "rejected", "expected_seq_mismatch"), ("w", "duplicate", None),
        ("orig", "conflict", "conflict")]
    assert (again[0][1].seq, again[0][1].position) == (once[0][1].seq, once[0][1].position)
    db = tmp_path / "ledger.db"
    assert query(db, "SELECT js_seq, item, event_id FROM rejections ORDER BY rid") == [
        (5, 1, "y"), (5, 3, "orig")]
    assert check_ledger(db).events == 6


async def test_a_bundle_redelivered_after_a_crash_after_commit_keeps_every_outcome(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The real thing: the worker is killed after committing the batch holding the bundle
    and before acking it; the restarted worker gets it again and changes nothing."""
    url = nats_server.url
    await provision(url)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for i in (1, 2, 3):
            await js.publish("jetledger.evt.acme.k", encode(_ev(f"t{i}", "t")))
        await js.publish("jetledger.evt.acme.k", encode(_ev("orig", "u", v=1)))
        bundle = EventBatch(events=[_ev("y", "t", expected_seq=5), _ev("w", "t"),
                                    _ev("orig", "u", v=2)], atomic=False)
        await js.publish("jetledger.batch.acme", encode(bundle))
        await js.publish("jetledger.evt.acme.k", encode(_ev("t5", "t")))
    finally:
        await nc.close()
    data_dir = tmp_path / "ledger"
    crashing = WorkerProcess(url, data_dir, crash_at="after_commit")
    crashing.start()
    assert crashing.wait(30) == -9
    crashing.close()
    db = data_dir / "ledger.db"
    before = query(db, "SELECT js_seq, item, event_id, code FROM rejections ORDER BY rid")
    healthy = WorkerProcess(url, data_dir)
    healthy.start()
    try:
        await wait_drained(url, db, timeout=20)
        await asyncio.sleep(0.2)
    finally:
        assert healthy.stop() == 0, healthy.log_tail()
        healthy.close()
    stats = healthy.stats()  # everything came again, and nothing of it was new
    assert (stats["messages"], stats["inserted"], stats["rejected"], stats["conflict"]) == \
        (6, 0, 1, 1), stats
    after = query(db, "SELECT js_seq, item, event_id, code FROM rejections ORDER BY rid")
    assert after == before == [(5, 1, "y", "expected_seq_mismatch"), (5, 3, "orig", "conflict")]
    report = check_ledger(db)
    assert report.ids == {("acme", i) for i in ("t1", "t2", "t3", "orig", "w", "t5")}


async def test_a_bundle_rejected_whole_stays_whole_on_redelivery(tmp_path: Path) -> None:
    """A whole-message rejection (item 0: here an "internal" one, as the ingest loop stores a
    message that keeps failing) is never taken for its first event's: on redelivery none of
    the bundle's events is stored."""
    from jetledger.schemas.errors import InternalError
    from jetledger.worker.ingest import Decoded

    subjects = Subjects()
    data = encode(EventBatch(events=[_ev("p1"), _ev("p2")], atomic=False))
    writer = await LedgerWriter.open(tmp_path / "ledger.db", js_stream="JETLEDGER")
    try:
        poisoned = Decoded(js_seq=1, subject="jetledger.batch.acme", raw=data, headers=None,
                           tenant="acme", error=InternalError("failed 3 times"))
        await writer.commit([poisoned])
        (outs,) = await writer.commit(
            [decode_message(subjects, "jetledger.batch.acme", data, None, 1)])
    finally:
        await writer.close()
    assert [(o.id, o.outcome, o.code) for o in outs] == [
        ("p1", "rejected", "internal"), ("p2", "rejected", "internal")]
    assert check_ledger(tmp_path / "ledger.db").events == 0
