"""Each question the four kinds of agent store ask has one call, answered by a real worker.

Execution/event store, experience store, append-only log keyed by id, coordination ledger.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
import pytest
from conftest import RunningWorker

from jetledger.client import (
    ConflictError,
    EscalationRecorded,
    EscalationResolved,
    LedgerClient,
    NotFound,
    StepCompleted,
    StepStarted,
    ToolCallStarted,
    new_event,
)

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


# --- execution / event store -----------------------------------------------------------


async def test_execution_store_replays_a_stream_in_order_and_incrementally(
    ledger: LedgerClient,
) -> None:
    for i in range(5):
        await ledger.append(new_event(tenant="acme", stream="exec-1",
                                      data=StepStarted(step_id=str(i), name="s")), wait=True)
        await ledger.append(new_event(tenant="acme", stream="exec-2", kind="noise", data={}),
                            wait=True)
    full = [e.seq async for e in ledger.iter_events(stream="exec-1", limit=2)]
    assert full == [1, 2, 3, 4, 5]
    incremental = await ledger.events(stream="exec-1", after_seq=3)
    assert [e.seq for e in incremental.events] == [4, 5]
    head = await ledger.stream_head("exec-1")
    assert head.seq == 5  # latest seq and number of events
    with pytest.raises(NotFound):
        await ledger.stream_head("exec-404")


async def test_streams_are_listed_newest_first_and_the_cursor_survives_new_events(
    ledger: LedgerClient,
) -> None:
    for i in range(6):
        await ledger.append(new_event(tenant="acme", stream=f"s{i}", kind="k", data={}),
                            wait=True)
    first = await ledger.streams(limit=2)
    assert [s.stream for s in first.streams] == ["s5", "s4"]
    # New events arrive while paging: to old streams and in new streams.
    await ledger.append(new_event(tenant="acme", stream="s1", kind="k", data={}), wait=True)
    await ledger.append(new_event(tenant="acme", stream="s9", kind="k", data={}), wait=True)
    rest = []
    cursor = first.next_cursor
    while cursor:
        page = await ledger.streams(limit=2, cursor=cursor)
        rest += [s.stream for s in page.streams]
        cursor = page.next_cursor
    assert rest == ["s3", "s2", "s1", "s0"]  # nothing skipped, nothing repeated
    oldest = await ledger.streams(order="asc", limit=1)
    assert oldest.streams[0].stream == "s0"


# --- experience store ------------------------------------------------------------------


async def test_experience_store_filters_combine(ledger: LedgerClient) -> None:
    kinds = [StepStarted(step_id="a", name="n"), ToolCallStarted(call_id="c", tool="t"),
             StepCompleted(step_id="a")]
    for i in range(12):
        await ledger.append(new_event(
            tenant="acme", stream=f"run-{i % 2}", data=kinds[i % 3],
            occurred_at=T0 + timedelta(minutes=i), correlation_id=f"c{i % 2}",
        ), wait=True)
    page = await ledger.events(
        kinds=["step_started", "step_completed"], correlation_id="c0", stream="run-0",
        time_from=T0 + timedelta(minutes=2), time_to=T0 + timedelta(minutes=8), limit=10,
    )
    minutes = [int((e.occurred_at - T0).total_seconds() // 60) for e in page.events]
    assert minutes == [2, 6, 8]  # i%2==0, i%3!=1, 2 <= i <= 8 (bounds inclusive)


async def test_a_time_range_pages_by_position_in_both_directions(ledger: LedgerClient) -> None:
    """Events happened in the reverse of their commit order, so the range's time index and
    the position order disagree; each page is still the next events by position, with
    nothing skipped or repeated, with and without a kind filter."""
    kinds = ["plan", "act", "observe"]
    positions: dict[str, list[int]] = {k: [] for k in kinds}
    for i in range(24):
        result = await ledger.append(new_event(
            tenant="acme", stream=f"run-{i % 3}", kind=kinds[i % 3], data={"i": i},
            occurred_at=T0 - timedelta(minutes=i)), wait=True)
        if 4 <= i <= 19:  # inside the range queried below
            assert result.position is not None
            positions[kinds[i % 3]].append(result.position)
    window = {"time_from": T0 - timedelta(minutes=19), "time_to": T0 - timedelta(minutes=4)}
    for kinds_asked in ([], ["plan", "observe"]):
        expected = sorted(p for k, ps in positions.items() if not kinds_asked or k in kinds_asked
                          for p in ps)
        for order in ("asc", "desc"):
            got = [e.position async for e in ledger.iter_events(
                kinds=kinds_asked, limit=3, order=order, **window)]
            assert got == (expected if order == "asc" else expected[::-1]), (kinds_asked, order)


async def test_events_caused_by_an_event(ledger: LedgerClient) -> None:
    cause = await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}),
                                wait=True)
    effects = [new_event(tenant="acme", stream="s", kind="k", data={"n": n},
                         causation_id=cause.id) for n in range(3)]
    for e in effects:
        await ledger.append(e, wait=True)
    await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
    caused = await ledger.events(causation_id=cause.id)
    assert [e.id for e in caused.events] == [e.id for e in effects]


async def test_engine_and_user_events_interleave_by_occurrence(ledger: LedgerClient) -> None:
    """Two sources commit in one order but happened in another: order_by=occurred_at."""
    engine = [T0 + timedelta(seconds=s) for s in (0, 2, 4)]
    user = [T0 + timedelta(seconds=s) for s in (1, 3, 5)]
    for t in engine:
        await ledger.append(new_event(tenant="acme", stream="engine", kind="tick", data={},
                                      occurred_at=t), wait=True)
    for t in user:
        await ledger.append(new_event(tenant="acme", stream="user", kind="input", data={},
                                      occurred_at=t), wait=True)
    got = [(e.stream, e.occurred_at) async for e in
           ledger.iter_events(order_by="occurred_at", limit=2)]
    assert [s for s, _ in got] == ["engine", "user"] * 3
    newest = await ledger.events(order_by="occurred_at", order="desc", limit=1)
    assert newest.events[0].occurred_at == user[-1]


# --- append-only log keyed by id -------------------------------------------------------


async def test_append_only_log_by_id(ledger: LedgerClient) -> None:
    entries = [new_event(tenant="acme", stream=f"doc-{i % 2}", kind="enhancement_applied",
                         id=f"enh-{i}", occurred_at=T0 + timedelta(seconds=10 - i),
                         data={"target": "doc", "change": f"edit {i}"}) for i in range(4)]
    for e in entries:
        await ledger.append(e, wait=True)
    assert (await ledger.get("enh-2")).data["change"] == "edit 2"
    with pytest.raises(NotFound, match="no event with id 'enh-9'"):
        await ledger.get("enh-9")
    by_stream = await ledger.events(stream="doc-0", order_by="occurred_at")
    assert [e.id for e in by_stream.events] == ["enh-2", "enh-0"]  # ascending by time
    everything = await ledger.events(order_by="occurred_at")
    assert [e.id for e in everything.events] == ["enh-3", "enh-2", "enh-1", "enh-0"]
    with pytest.raises(ConflictError):
        await ledger.append(msgspec.structs.replace(entries[0], data={"target": "x",
                                                                      "change": "y"}),
                            wait=True)


# --- coordination ledger ---------------------------------------------------------------


async def test_open_escalations_are_a_stream_listing(ledger: LedgerClient) -> None:
    for i in range(4):
        await ledger.append(new_event(
            tenant="acme", stream=f"esc-{i}",
            data=EscalationRecorded(escalation_id=f"esc-{i}", reason="needs a human")),
            wait=True)
    for i in (1, 3):
        await ledger.append(new_event(
            tenant="acme", stream=f"esc-{i}",
            data=EscalationResolved(escalation_id=f"esc-{i}", resolution="approved")),
            wait=True)
    open_items = await ledger.streams(last_kinds=["escalation_recorded"])
    assert [s.stream for s in open_items.streams] == ["esc-2", "esc-0"]
    record = await ledger.stream_record("esc-1")
    assert record.first.kind == "escalation_recorded"
    assert record.last.kind == "escalation_resolved"
    assert record.head.seq == 2


# --- pagination under concurrent writes ------------------------------------------------


async def test_event_pages_stay_correct_while_events_keep_arriving(
    ledger: LedgerClient,
) -> None:
    for i in range(20):
        await ledger.append(new_event(tenant="acme", stream="p", kind="k", data={"i": i}))
    writer_done = asyncio.Event()

    async def keep_writing() -> None:
        for i in range(20, 60):
            await ledger.append(new_event(tenant="acme", stream="p", kind="k", data={"i": i}))
            await asyncio.sleep(0.005)
        writer_done.set()

    task = asyncio.create_task(keep_writing())
    seen: list[int] = []
    cursor: str | None = None
    for _ in range(500):  # bounded
        if cursor is not None:
            page = await ledger.events(stream="p", limit=7, cursor=cursor)
        else:  # end of the listing so far: continue after the last position seen
            page = await ledger.events(stream="p", limit=7,
                                       after_position=seen[-1] if seen else 0)
        seen += [e.position for e in page.events]
        cursor = page.next_cursor
        if cursor is None:
            if writer_done.is_set() and len(seen) >= 60:
                break
            await asyncio.sleep(0.02)
    await task
    assert seen == list(range(1, 61))


# --- live tail -------------------------------------------------------------------------


async def test_tail_catches_up_then_follows_without_gaps_or_repeats(
    ledger: LedgerClient,
) -> None:
    for i in range(5):
        await ledger.append(new_event(tenant="acme", stream="t", kind="k", data={"i": i}),
                            wait=True)
    got: list[int] = []

    async def follow() -> None:
        async for event in ledger.tail(after_position=2, poll_interval=0.5):
            got.append(event.data["i"])
            if len(got) == 13:
                return

    task = asyncio.create_task(follow())
    for i in range(5, 15):
        await ledger.append(new_event(tenant="acme", stream="t", kind="k", data={"i": i}))
    await asyncio.wait_for(task, 10)
    assert got == list(range(2, 15))


async def test_tail_filters_like_events(ledger: LedgerClient) -> None:
    got: list[str] = []

    async def follow() -> None:
        async for event in ledger.tail(after_position=0, kinds=["wanted"], poll_interval=0.5):
            got.append(event.id)
            if len(got) == 2:
                return

    task = asyncio.create_task(follow())
    ids = []
    for kind in ("other", "wanted", "other", "wanted"):
        res = await ledger.append(new_event(tenant="acme", stream="t", kind=kind, data={}))
        if kind == "wanted":
            ids.append(res.id)
    await asyncio.wait_for(task, 10)
    assert got == ids


async def test_tail_from_now_skips_history(ledger: LedgerClient) -> None:
    await ledger.append(new_event(tenant="acme", stream="t", kind="old", data={}), wait=True)
    stream = ledger.tail(poll_interval=0.5)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.3)
    fresh = await ledger.append(new_event(tenant="acme", stream="t", kind="new", data={}))
    event = await asyncio.wait_for(first, 10)
    assert event.id == fresh.id
    await stream.aclose()  # type: ignore[attr-defined]


async def test_a_tail_left_by_break_closes_quietly_after_its_client(
        worker: RunningWorker) -> None:
    # The README's example: `break` out of `tail`, then the client closes; Python closes the
    # generator later (when it is collected, or at exit), with the connection gone.
    client = await LedgerClient.connect(worker.url, tenant="acme")
    await client.append(new_event(tenant="acme", stream="t", kind="k", data={}), wait=True)
    stream = client.tail(after_position=0, poll_interval=0.5)
    async for _ in stream:
        break
    await client.close()
    await stream.aclose()  # type: ignore[attr-defined]  # raised ConnectionClosedError


# --- a NATS service like any other -----------------------------------------------------


async def test_query_service_answers_the_nats_discovery_protocol(worker: RunningWorker) -> None:
    nc = await nats.connect(worker.url)
    try:
        ping = msgspec.json.decode((await nc.request("$SRV.PING.jetledger", b"")).data)
        assert ping["name"] == "jetledger" and ping["type"] == "io.nats.micro.v1.ping_response"
        info = msgspec.json.decode((await nc.request("$SRV.INFO.jetledger", b"")).data)
        names = {e["name"] for e in info["endpoints"]}
        assert names == {"events", "get", "head", "streams", "stream", "rejections", "stats"}
        assert all(e["queue_group"] == "jetledger" for e in info["endpoints"])
        stats = msgspec.json.decode((await nc.request("$SRV.STATS.jetledger", b"")).data)
        assert {e["name"] for e in stats["endpoints"]} == names
    finally:
        await nc.close()


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ("jetledger.q.acme.bogus", "unknown query op 'bogus'"),
        ("jetledger.q.acme.x.events", "not a jetledger query subject"),
        ("jetledger.q." + "t" * 70 + ".events", "is not valid"),
    ],
)
async def test_unknown_ops_and_bad_tenant_tokens_get_an_error_reply(
    worker: RunningWorker, subject: str, message: str
) -> None:
    nc = await nats.connect(worker.url)
    try:
        reply = await nc.request(subject, b"", timeout=2)
        assert reply.headers is not None and reply.headers["Nats-Service-Error-Code"] == "400"
        assert message in reply.headers["Nats-Service-Error"]
    finally:
        await nc.close()


async def test_internal_failures_answer_generically_without_details(
    worker: RunningWorker, ledger: LedgerClient
) -> None:
    """A handler bug must not leak SQL or exception reprs to the caller."""
    from jetledger.client import InternalError

    reader = worker.worker._reader  # noqa: SLF001 - break the read side on purpose
    assert reader is not None
    original = reader._run

    async def broken(fn: object) -> object:
        raise RuntimeError("SELECT secret FROM internals")

    reader._run = broken  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(InternalError) as err:
            await ledger.events()
        assert "secret" not in str(err.value) and "SELECT" not in str(err.value)
        assert "see its log" in str(err.value)
    finally:
        reader._run = original  # type: ignore[method-assign]


async def test_a_flood_of_queries_gets_fast_overloaded_answers(
    worker: RunningWorker, ledger: LedgerClient
) -> None:
    from jetledger.client import Overloaded

    reader = worker.worker._reader  # noqa: SLF001
    assert reader is not None
    original = reader._run
    gate = asyncio.Event()

    async def slow(fn: Any) -> Any:
        await gate.wait()
        return await original(fn)

    reader._run = slow  # type: ignore[method-assign]
    try:
        limit = worker.cfg.query_concurrency
        held = [asyncio.create_task(ledger.events()) for _ in range(limit)]
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Overloaded, match="already running"):
            await ledger.events()
        assert loop.time() - started < ledger.timeout  # an answer, not a timeout
        gate.set()
        pages = await asyncio.gather(*held)
        assert all(p.events == [] for p in pages)
    finally:
        reader._run = original  # type: ignore[method-assign]


async def test_replies_never_exceed_max_payload_pages_are_cut_with_a_cursor(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    nc = await nats.connect(worker.url)
    max_payload = nc.max_payload
    await nc.close()
    blob = "x" * (max_payload // 8)
    for i in range(12):  # ~1.5 x max_payload in total
        await ledger.append(new_event(tenant="acme", stream="big", kind="k",
                                      data={"i": i, "blob": blob}), wait=True)
    page = await ledger.events(stream="big", limit=12)
    assert 0 < len(page.events) < 12 and page.next_cursor is not None
    everything = [e.data["i"] async for e in ledger.iter_events(stream="big", limit=12)]
    assert everything == list(range(12))


async def test_tail_survives_a_worker_restart_without_gaps_or_repeats(
    worker_config: object,
) -> None:
    from jetledger.worker import Worker, WorkerConfig

    assert isinstance(worker_config, WorkerConfig)
    got: list[int] = []
    first = Worker(worker_config)
    await first.start()
    task = asyncio.create_task(first.run())
    client = await LedgerClient.connect(first.url, tenant="acme", timeout=1)
    try:
        async def follow() -> None:
            async for event in client.tail(after_position=0, poll_interval=0.3):
                got.append(event.data["i"])
                if len(got) == 10:
                    return

        follower = asyncio.create_task(follow())
        for i in range(5):
            await client.append(new_event(tenant="acme", stream="t", kind="k", data={"i": i}),
                                wait=True)
        first.request_stop()
        await task
        await first.close()  # the worker is gone: the tail keeps waiting, it does not end
        for i in range(5, 10):  # published while no worker runs: JetStream keeps them
            await client.append(new_event(tenant="acme", stream="t", kind="k", data={"i": i}))
        await asyncio.sleep(0.5)
        assert not follower.done()
        async with Worker(worker_config) as second:
            task2 = asyncio.create_task(second.run())
            await asyncio.wait_for(follower, 15)
            second.request_stop()
            await task2
    finally:
        await client.close()
    assert got == list(range(10))
