"""A producer appends through the client and reads the events back through the worker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import nats
import pytest
from conftest import RunningWorker
from harness import check_ledger

from jetledger.client import (
    JSON,
    LedgerClient,
    NotFound,
    StepCompleted,
    StepStarted,
    ToolCallStarted,
    encode,
    new_event,
    typed_data,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)


async def test_append_waits_for_commit_and_reports_seq_and_position(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    first = await ledger.append(
        new_event(tenant="acme", stream="run-1", data=StepStarted(step_id="s1", name="plan")),
        wait=True,
    )
    second = await ledger.append(
        new_event(tenant="acme", stream="run-1", data=StepCompleted(step_id="s1")), wait=True
    )
    assert (first.outcome, first.seq, first.position) == ("inserted", 1, 1)
    assert (second.outcome, second.seq, second.position) == ("inserted", 2, 2)
    stored = await ledger.get(first.id)
    assert stored.kind == "step_started" and stored.seq == 1 and stored.js_seq == first.js_seq
    assert typed_data(stored) == StepStarted(step_id="s1", name="plan")
    assert stored.recorded_at.tzinfo is not None
    check_ledger(worker.db_path)


async def test_append_without_wait_returns_once_jetstream_stored_it(
    ledger: LedgerClient,
) -> None:
    result = await ledger.append(
        new_event(tenant="acme", stream="run-2", kind="note", data={"text": "hi"})
    )
    assert result.outcome == "accepted" and result.js_seq is not None
    stored = [e async for e in _eventually(ledger, "run-2", 1)]
    assert stored[0].id == result.id and stored[0].data == {"text": "hi"}


async def _eventually(ledger: LedgerClient, stream: str, n: int):  # type: ignore[no-untyped-def]
    import asyncio

    for _ in range(100):
        page = await ledger.events(stream=stream)
        if len(page.events) >= n:
            for e in page.events:
                yield e
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{stream} never reached {n} events")


async def test_stream_head_and_stream_listing(ledger: LedgerClient) -> None:
    for stream in ("a", "b", "a"):
        await ledger.append(new_event(tenant="acme", stream=stream, kind="x", data={}), wait=True)
    head = await ledger.stream_head("a")
    assert (head.seq, head.first_position, head.last_position, head.last_kind) == (2, 1, 3, "x")
    page = await ledger.streams()
    assert [s.stream for s in page.streams] == ["b", "a"]  # newest (last created) first
    with pytest.raises(NotFound, match="'zzz' has no events"):
        await ledger.stream_head("zzz")


async def test_events_filter_by_kind_correlation_time_and_position(ledger: LedgerClient) -> None:
    datas = [StepStarted(step_id="1", name="n"), ToolCallStarted(call_id="c", tool="t"),
             StepCompleted(step_id="1")]
    for i in range(9):
        await ledger.append(new_event(
            tenant="acme", stream=f"run-{i % 2}", data=datas[i % 3],
            occurred_at=T0 + timedelta(minutes=i), correlation_id=f"corr-{i % 3}",
        ), wait=True)
    by_kind = await ledger.events(kinds=["tool_call_started"])
    assert [e.kind for e in by_kind.events] == ["tool_call_started"] * 3
    by_corr = await ledger.events(correlation_id="corr-0")
    assert [e.position for e in by_corr.events] == [1, 4, 7]
    window = await ledger.events(time_from=T0 + timedelta(minutes=2),
                                 time_to=T0 + timedelta(minutes=4))
    assert [e.position for e in window.events] == [3, 4, 5]  # both bounds inclusive
    after = await ledger.events(after_position=7)
    assert [e.position for e in after.events] == [8, 9]
    replay = await ledger.events(stream="run-1", after_seq=2)
    assert [e.seq for e in replay.events] == [3, 4]
    newest = await ledger.events(order="desc", limit=2)
    assert [e.position for e in newest.events] == [9, 8]


async def test_pages_chain_by_cursor_in_both_orders(ledger: LedgerClient) -> None:
    events = [new_event(tenant="acme", stream="s", kind="k", data={"i": i}) for i in range(7)]
    await ledger.append_batch(events, wait=True)
    asc = [e.data["i"] async for e in ledger.iter_events(limit=3)]
    assert asc == list(range(7))
    desc = [e.data["i"] async for e in ledger.iter_events(limit=3, order="desc")]
    assert desc == list(reversed(range(7)))


async def test_any_nats_client_can_publish_json_by_the_wire_format(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    """What the README documents for other languages: JSON body, Content-Type header."""
    nc = await nats.connect(worker.url)
    try:
        body = {
            "id": "evt-json-1", "tenant": "acme", "kind": "step_started", "stream": "run-j",
            "occurred_at": "2026-01-01T10:00:00+02:00",
            "data": {"step_id": "s", "name": "from-json"},
        }
        ack = await nc.jetstream().publish(
            "jetledger.evt.acme.step_started", msgspec.json.encode(body),
            headers={"Content-Type": "application/json"},
        )
        assert ack.seq >= 1
    finally:
        await nc.close()
    stored = [e async for e in _eventually(ledger, "run-j", 1)][0]
    assert stored.id == "evt-json-1"
    assert stored.occurred_at == datetime(2026, 1, 1, 8, tzinfo=UTC)
    assert stored.data == {"step_id": "s", "name": "from-json"}


async def test_json_client_reads_replies_in_json(worker: RunningWorker) -> None:
    client = await LedgerClient.connect(worker.url, tenant="acme", content_type=JSON)
    try:
        res = await client.append(new_event(tenant="acme", stream="j", kind="k", data={}),
                                  wait=True)
        assert (await client.get(res.id)).id == res.id
        nc = await nats.connect(worker.url)
        try:
            reply = await nc.request("jetledger.q.acme.get", encode({"id": res.id}, JSON),
                                     headers={"Content-Type": JSON})
            assert msgspec.json.decode(reply.data)["position"] == 1
        finally:
            await nc.close()
    finally:
        await client.close()
