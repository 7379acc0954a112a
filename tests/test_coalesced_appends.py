"""Concurrent `append`s of one tenant travel together as bundles (far fewer JetStream messages,
each one fsynced by the server), and yet each append gets its own result, exactly as if it
had been sent alone: its own seq, its own conflict or expected_seq mismatch, its own
validation error; a publish whose outcome is unknown is unknown to every member."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path

import msgspec
import pytest
from conftest import RunningWorker
from harness import (
    ProducerLedger,
    WorkerProcess,
    append_definitely,
    check_ledger,
    ledger_client,
    provision,
    query,
    read_stream,
    stream_messages,
    verify,
    wait_drained,
)

from jetledger.client import (
    AppendResult,
    ConflictError,
    EventTooLarge,
    ExpectedSeqMismatch,
    InvalidEvent,
    LedgerClient,
    OutcomeUnknown,
    encode,
    new_event,
)
from jetledger.schemas import Event
from jetledger.worker.natsserver import NatsServer


def _ev(stream: str = "s", **kw: object) -> Event:
    return new_event(tenant="acme", stream=stream, kind="k", data=dict(kw.pop("data", {})),
                     **kw)  # type: ignore[arg-type]


async def _together(*appends: Awaitable[AppendResult]) -> list[AppendResult | BaseException]:
    """Start the appends in one turn of the loop: the first takes the tenant's free slot and
    goes alone, the others queue behind it and leave as one bundle when it is acked."""
    return await asyncio.gather(*appends, return_exceptions=True)


async def test_many_concurrent_appends_become_few_messages_each_with_its_own_result(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    events = [_ev(f"s{i % 3}", data={"i": i}) for i in range(300)]
    waited = await asyncio.gather(*(ledger.append(e, wait=i % 2 == 0)
                                    for i, e in enumerate(events)))
    messages = await stream_messages(worker.url)
    assert messages < len(events) // 5, messages  # bundles, not one message per event
    assert [r.id for r in waited] == [e.id for e in events]
    for i, r in enumerate(waited):
        assert r.js_seq is not None
        if i % 2 == 0:  # waited: the worker's own outcome for this event
            assert r.outcome == "inserted" and r.stream == f"s{i % 3}"
        else:
            assert r.outcome == "accepted"
    stored = {row[0]: row[1:] for row in query(
        worker.db_path, "SELECT id, stream, seq, position, js_seq FROM named_events")}
    for e, r in zip(events, waited, strict=True):
        assert stored[e.id][3] == r.js_seq  # the message it really travelled in
        if r.outcome == "inserted":
            assert (r.stream, r.seq, r.position) == stored[e.id][:3]
    assert check_ledger(worker.db_path).events == len(events)


async def test_a_conflict_inside_a_bundle_is_that_events_alone(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    original = _ev(data={"v": 1})
    await ledger.append(original, wait=True)
    clash = msgspec.structs.replace(original, data={"v": 2})
    first, before, conflicting, after = await _together(
        ledger.append(_ev("t"), wait=True),
        ledger.append(b := _ev(data={"n": "before"}), wait=True),
        ledger.append(clash, wait=True),
        ledger.append(_ev(data={"n": "after"}), wait=True),
    )
    assert isinstance(first, AppendResult) and isinstance(before, AppendResult)
    assert isinstance(after, AppendResult)
    assert isinstance(conflicting, ConflictError) and conflicting.event_id == original.id
    assert (before.outcome, before.seq, after.outcome, after.seq) == ("inserted", 2,
                                                                      "inserted", 3)
    assert before.js_seq == after.js_seq != first.js_seq  # one bundle, after the lone one
    rows = query(worker.db_path, "SELECT js_seq, item, subject, event_id, code, reason, raw,"
                                 " existing_hash IS NOT NULL, new_hash IS NOT NULL"
                                 " FROM rejections")
    assert rows == [(before.js_seq, 2, "jetledger.batch.acme", original.id, "conflict",
                     str(conflicting), encode(clash), 1, 1)]
    assert (await ledger.get(b.id)).seq == 2
    assert check_ledger(worker.db_path).events == 4


async def test_an_expected_seq_mismatch_inside_a_bundle_is_that_events_alone(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    results = await _together(
        ledger.append(_ev("other"), wait=True),
        ledger.append(_ev("q", expected_seq=0), wait=True),   # wins the head
        ledger.append(loser := _ev("q", expected_seq=0), wait=True),
        ledger.append(_ev("q", expected_seq=1), wait=True),   # sees the winner: stored
        ledger.append(_ev("q"), wait=False),                  # accepted at the ack
    )
    _, won, lost, next_, unconditional = results
    assert isinstance(won, AppendResult) and won.seq == 1
    assert isinstance(lost, ExpectedSeqMismatch)
    assert (lost.actual_seq, lost.event_id) == (1, loser.id)
    assert isinstance(next_, AppendResult) and next_.seq == 2
    assert isinstance(unconditional, AppendResult) and unconditional.outcome == "accepted"
    assert unconditional.js_seq == won.js_seq  # the same bundle
    assert query(worker.db_path, "SELECT item, event_id, code FROM rejections") == [
        (2, loser.id, "expected_seq_mismatch")]
    await asyncio.sleep(0.3)
    assert check_ledger(worker.db_path).events == 4


async def test_the_same_event_twice_in_one_bundle_is_stored_once(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    event = _ev()
    _, one, two = await _together(ledger.append(_ev("x"), wait=True),
                                  ledger.append(event, wait=True),
                                  ledger.append(event, wait=True))
    assert isinstance(one, AppendResult) and isinstance(two, AppendResult)
    assert (one.outcome, two.outcome) == ("inserted", "duplicate")
    assert one.js_seq == two.js_seq and (one.seq, one.position) == (two.seq, two.position)
    assert check_ledger(worker.db_path).events == 2


async def test_a_bad_event_is_refused_alone_before_it_joins_a_bundle(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    naive = msgspec.structs.replace(_ev(), occurred_at=datetime(2026, 1, 1))
    huge = _ev(data={"blob": "x" * (ledger._nc.max_payload + 10)})
    results = await _together(ledger.append(_ev("x")), ledger.append(_ev(), wait=True),
                              ledger.append(naive), ledger.append(huge),
                              ledger.append(_ev(), wait=True))
    assert isinstance(results[2], InvalidEvent) and isinstance(results[3], EventTooLarge)
    assert [isinstance(r, AppendResult) for r in results] == [True, True, False, False, True]
    assert results[1].js_seq == results[4].js_seq  # type: ignore[union-attr]


async def test_cancelling_one_append_leaves_the_rest_of_its_bundle_alone(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    tasks = [asyncio.create_task(ledger.append(_ev(data={"i": i}), wait=True))
             for i in range(6)]
    await asyncio.sleep(0)  # every task has appended: task 0 in flight, the rest queued
    tasks[3].cancel()  # never sent
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    ok = [r for r in done if isinstance(r, AppendResult)]
    assert len(ok) == 5 and all(r.outcome == "inserted" for r in ok)
    assert len({r.js_seq for r in ok}) == 2  # the lone one, then one bundle
    # Cancelled after its bundle left: the others still get their outcomes.
    tasks = [asyncio.create_task(ledger.append(_ev(data={"j": j}), wait=True))
             for j in range(4)]
    await asyncio.sleep(0)
    while ledger._lanes["acme"].queue:  # until the bundle is taken (sent)
        await asyncio.sleep(0.001)
    tasks[2].cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert [r.outcome for r in done if isinstance(r, AppendResult)] == ["inserted"] * 3
    await asyncio.sleep(0.3)
    assert check_ledger(worker.db_path).events == 9  # the one taken was sent all the same


async def test_an_append_given_up_while_queued_is_never_sent_even_if_its_bundle_leaves_first(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    """A caller's timeout racing its bundle's departure: cancelling a task cancels the future
    it awaits at once, but its own clean-up runs a turn later. A bundle taken in between
    must leave that append out: its caller was told it failed."""
    events = [_ev(data={"i": i}) for i in range(4)]
    tasks = [asyncio.create_task(ledger.append(e, wait=True)) for e in events]
    await asyncio.sleep(0)  # task 0 in flight, 1..3 queued
    lane = ledger._lanes["acme"]
    assert len(lane.queue) == 3
    tasks[2].cancel()  # its future is cancelled now, its clean-up not yet run
    bundle = ledger._take("acme", lane)  # a bundle leaving in that same turn
    assert [p.event.id for p in bundle] == [events[1].id, events[3].id]
    lane.queue.extendleft(reversed(bundle))  # hand them back: the lane sends them itself
    done = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(done[2], asyncio.CancelledError)
    assert [r.outcome for r in done if isinstance(r, AppendResult)] == ["inserted"] * 3
    await asyncio.sleep(0.3)
    assert query(worker.db_path, "SELECT count(*) FROM events WHERE id=?",
                 (events[2].id,)) == [(0,)]


async def test_coalescing_off_sends_one_message_per_event(worker: RunningWorker) -> None:
    async with await LedgerClient.connect(worker.url, tenant="acme", coalesce=False) as client:
        before = await stream_messages(worker.url)
        results = await asyncio.gather(*(client.append(_ev(data={"i": i})) for i in range(40)))
        assert len({r.js_seq for r in results}) == 40
        assert await stream_messages(worker.url) - before == 40


TIMEOUT = 0.3
ATTEMPTS = 2


async def test_outcome_unknown_reaches_every_append_of_a_bundle(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    """The server is frozen while five appends are made together: the lone first one and
    the bundle of the other four are never confirmed, so each of the five raises its own
    OutcomeUnknown; appended again after the thaw, each is stored exactly once."""
    url = nats_server.url
    await provision(url)
    worker = WorkerProcess(url, tmp_path / "ledger")
    worker.start()
    ledger = ProducerLedger()
    events = [new_event(tenant="acme", stream="s", kind="k", id=f"frozen-{i}", data={"i": i})
              for i in range(5)]
    try:
        async with await ledger_client(url, timeout=TIMEOUT, attempts=ATTEMPTS) as client:
            for e in events:
                ledger.settle(ledger.attempt(e), "unknown")
            nats_server.pause()
            started = time.monotonic()
            try:
                # Bounded: two publishes in a row (the lone one, then the bundle), each
                # giving up after its attempts.
                results = await asyncio.wait_for(
                    _together(*(client.append(e, wait=i % 2 == 0)
                                for i, e in enumerate(events))), 15)
            finally:
                nats_server.resume()
            assert time.monotonic() - started < 15
            assert all(isinstance(r, OutcomeUnknown) for r in results), results
            assert len({id(r) for r in results}) == 5  # each append its own error
            assert "frozen-1" in str(results[1]) and "frozen-4" in str(results[4])
            for e in events:  # the producer's move: append again until definite
                state = await append_definitely(client, e, ledger,
                                                deadline=time.monotonic() + 10)
                assert state == "acked"
        await wait_drained(url, worker.data_dir / "ledger.db", timeout=20)
        msgs = await read_stream(url)
    finally:
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(worker.data_dir / "ledger.db", ledger, stream_msgs=msgs).assert_clean()
    assert verdict.events == 5


@pytest.mark.parametrize("wait", [False, True])
async def test_append_batch_stays_atomic_with_coalescing_on(
    ledger: LedgerClient, worker: RunningWorker, wait: bool
) -> None:
    stored = _ev()
    await ledger.append(stored, wait=True)
    batch = [_ev(), msgspec.structs.replace(stored, data={"v": 2})]
    if wait:
        with pytest.raises(ConflictError):
            await ledger.append_batch(batch, wait=True)
    else:
        await ledger.append_batch(batch)
        await asyncio.sleep(0.5)
    assert check_ledger(worker.db_path).events == 1
    assert query(worker.db_path, "SELECT item FROM rejections") == [(0,)]


async def test_a_bundle_over_the_streams_max_msg_size_is_sent_again_in_halves(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    """The stream's max_msg_size (an operator's setting the client cannot see) refuses a
    bundle definitely, so nothing of it is stored: the client sends it again in halves, and
    each append still gets its own result."""
    from harness import admin_connect

    from jetledger.worker.jetstream import stream_config

    admin = await admin_connect(worker.url)
    try:
        await admin.jetstream().update_stream(stream_config(worker.cfg, max_msg_size=2048))
    finally:
        await admin.close()
    events = [_ev(data={"i": i, "pad": "x" * 500}) for i in range(9)]
    results = await _together(*(ledger.append(e, wait=True) for e in events))
    assert all(isinstance(r, AppendResult) and r.outcome == "inserted" for r in results), \
        results
    assert sorted(r.seq for r in results if isinstance(r, AppendResult)) == list(range(1, 10))
    assert 2 < len({r.js_seq for r in results if isinstance(r, AppendResult)}) < 9
    assert check_ledger(worker.db_path).events == 9


async def test_without_a_notice_each_waiting_append_of_a_bundle_is_decided_from_the_ledger(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    """The worker notifies only reply inboxes (`_INBOX…`): on another inbox prefix no notice
    comes, and each waiting member of the bundle asks the ledger for its own event."""
    original = _ev(data={"v": 1})
    await ledger.append(original, wait=True)
    async with await LedgerClient.connect(worker.url, tenant="acme", inbox_prefix="NOBOX",
                                          timeout=1.5) as client:
        _, a, clash, accepted, b = await _together(
            client.append(_ev("x"), wait=True),
            client.append(_ev(), wait=True),
            client.append(msgspec.structs.replace(original, data={"v": 2}), wait=True),
            client.append(_ev()),
            client.append(_ev(), wait=True),
        )
    assert isinstance(a, AppendResult) and isinstance(b, AppendResult)
    assert (a.outcome, a.seq, b.outcome, b.seq) == ("inserted", 2, "inserted", 4)
    assert isinstance(clash, ConflictError) and clash.event_id == original.id
    assert isinstance(accepted, AppendResult) and accepted.outcome == "accepted"
    assert a.js_seq == b.js_seq == accepted.js_seq


async def test_a_waiting_append_waits_its_own_timeout_not_a_longer_one_queued_beside_it(
    worker: RunningWorker,
) -> None:
    """Without a notice (another inbox prefix, as above) a waiting append asks the ledger
    when its own timeout has passed. Queued together with an append that waits longer, it
    leaves in a bundle of its own: one notice serves a bundle, and a shared one would have
    held it to the longer timeout."""
    async with await LedgerClient.connect(worker.url, tenant="acme", inbox_prefix="NOBOX",
                                          timeout=5.0) as client:
        lead = asyncio.create_task(client.append(_ev("lead")))  # takes the free slot
        quick = asyncio.create_task(client.append(_ev("q"), wait=True, timeout=0.2))
        patient = asyncio.create_task(client.append(_ev("p"), wait=True, timeout=2.5))
        started = time.monotonic()
        result = await quick
        assert time.monotonic() - started < 1.5  # not the 2.5 s of the one beside it
        assert not patient.done()
        assert result.outcome == "inserted"  # decided from the ledger
        assert (await patient).outcome == "inserted"
        assert (await lead).outcome == "accepted"
        assert result.js_seq != (await patient).js_seq  # two messages
