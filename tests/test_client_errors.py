"""The client refuses what cannot work before sending anything, and every failure reaches the
caller as a typed error whose message says what was wrong and what to do."""

from __future__ import annotations

from datetime import datetime

import msgspec
import nats
import pytest
from conftest import RunningWorker
from harness import stream_messages

from jetledger.client import (
    Event,
    EventTooLarge,
    InvalidEvent,
    InvalidInput,
    InvalidQuery,
    InvalidToken,
    JetledgerError,
    LedgerClient,
    LedgerTimeout,
    Unavailable,
    new_event,
)
from jetledger.worker.natsserver import NatsServer


@pytest.mark.parametrize("tenant", ["a.b", "a b", "*", ">", "", "x" * 65, "ünï"])
def test_tenant_that_is_not_one_subject_token_is_refused(tenant: str) -> None:
    with pytest.raises(InvalidToken, match="letters, digits, '-' or '_'"):
        new_event(tenant=tenant, stream="s", kind="k", data={})


async def test_invalid_events_are_refused_before_anything_is_sent(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    ok = new_event(tenant="acme", stream="s", kind="k", data={})
    bad = [
        msgspec.structs.replace(ok, occurred_at=datetime(2026, 1, 1)),  # naive
        msgspec.structs.replace(ok, kind="has.dot"),
        msgspec.structs.replace(ok, stream=""),
        msgspec.structs.replace(ok, id="x" * 129),
        msgspec.structs.replace(ok, expected_seq=-1),
        new_event(tenant="acme", stream="s", kind="step_started", data={"name": "no id"}),
    ]
    for event in bad:
        with pytest.raises(InvalidEvent) as err:
            await ledger.append(event)
        assert isinstance(err.value, InvalidInput) and isinstance(err.value, JetledgerError)
    with pytest.raises(InvalidInput, match="one tenant"):
        await ledger.append_batch([ok, new_event(tenant="other", stream="s", kind="k", data={})])
    assert await stream_messages(worker.url) == 0


async def test_too_large_event_is_refused_before_sending_and_the_connection_survives(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    nc = await nats.connect(worker.url)
    max_payload = nc.max_payload
    await nc.close()
    # Payload alone under max_payload, payload + headers + subject over it.
    probe = new_event(tenant="acme", stream="s", kind="k", data={"blob": ""})
    base = len(msgspec.msgpack.encode(probe))
    near = new_event(tenant="acme", stream="s", kind="k",
                     data={"blob": "x" * (max_payload - base - 10)})
    assert len(msgspec.msgpack.encode(near)) < max_payload
    with pytest.raises(EventTooLarge, match="exceeds the server's max_payload"):
        await ledger.append(near)
    with pytest.raises(EventTooLarge):
        await ledger.append(new_event(tenant="acme", stream="s", kind="k",
                                      data={"blob": "x" * (max_payload + 1)}))
    stored = await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}),
                                 wait=True)
    assert stored.outcome == "inserted"  # same connection, still fine


async def test_publishing_with_no_stream_says_to_start_the_worker(
    nats_server: NatsServer,
) -> None:
    async with await LedgerClient.connect(nats_server.url) as client:
        with pytest.raises(Unavailable, match="start the jetledger worker"):
            await client.append(new_event(tenant="acme", stream="s", kind="k", data={}))


async def test_querying_with_no_worker_says_so(nats_server: NatsServer) -> None:
    async with await LedgerClient.connect(nats_server.url, tenant="acme") as client:
        with pytest.raises(Unavailable, match="no jetledger worker answers"):
            await client.events()


async def test_connecting_to_nothing_is_unavailable() -> None:
    with pytest.raises(Unavailable, match="cannot connect to NATS"):
        await LedgerClient.connect("nats://127.0.0.1:1", connect_timeout=0.5,
                                   max_reconnect_attempts=0)


async def test_waiting_for_a_worker_that_is_not_running_times_out_clearly(
    worker: RunningWorker,
) -> None:
    async with await LedgerClient.connect(worker.url, tenant="acme", timeout=1) as client:
        worker.worker.request_stop()
        await worker.task  # ingest stopped; the query side still answers
        with pytest.raises(LedgerTimeout, match="is not stored yet: the worker is behind"):
            await client.append(new_event(tenant="acme", stream="s", kind="k", data={}),
                                wait=True)


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        ({"limit": 0}, "Expected `int` >= 1"),
        ({"limit": 5000}, "Expected `int` <= 1000"),
        ({"cursor": "garbage!"}, "cursor is not valid"),
        ({"after_seq": 3}, "after_seq needs a stream"),
        ({"time_from": datetime.fromisoformat("2026-02-01T00:00:00+00:00"),
          "time_to": datetime.fromisoformat("2026-01-01T00:00:00+00:00")}, "range is empty"),
        ({"kinds": ["not a token"]}, "malformed EventsQuery"),
    ],
)
async def test_bad_queries_get_a_clear_error_reply(
    ledger: LedgerClient, filters: dict[str, object], message: str
) -> None:
    with pytest.raises(InvalidQuery, match=message):
        await ledger.events(**filters)  # type: ignore[arg-type]


async def test_query_for_an_invalid_tenant_token_is_refused_locally(
    ledger: LedgerClient,
) -> None:
    with pytest.raises(InvalidToken):
        await ledger.events(tenant="a.b")


async def test_raw_malformed_query_body_gets_an_error_reply_not_a_timeout(
    worker: RunningWorker,
) -> None:
    nc = await nats.connect(worker.url)
    try:
        reply = await nc.request("jetledger.q.acme.events", b"\xc1garbage", timeout=2)
        assert reply.headers is not None
        assert reply.headers["Nats-Service-Error-Code"] == "400"
        assert reply.headers["Nats-Service-Error"].startswith("invalid_query:")
    finally:
        await nc.close()


def test_event_type_is_the_wire_type() -> None:
    assert Event.__struct_fields__[:5] == ("id", "tenant", "kind", "stream", "occurred_at")


async def test_a_closed_connection_is_unavailable_not_a_raw_nats_error(
    worker: RunningWorker,
) -> None:
    nc = await nats.connect(worker.url)
    client = LedgerClient(nc, tenant="acme")
    await nc.close()  # e.g. the reconnect budget ran out
    with pytest.raises(Unavailable, match="ConnectionClosedError"):
        await client.append(new_event(tenant="acme", stream="s", kind="k", data={}))
    with pytest.raises(Unavailable, match="ConnectionClosedError"):
        await client.events()
