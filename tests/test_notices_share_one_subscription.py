"""A client that waits for outcomes (`append(wait=True)`) receives every notice on one
subscription of its own, each message on its own inbox token: however many appends wait,
each gets its own event's outcome, the client's interest on the connection does not grow
with them, a client on a borrowed connection takes it back when closed, and an append
still waiting when the connection closes is told so at once rather than at its timeout."""

from __future__ import annotations

import asyncio
import time

import nats
import pytest
from conftest import RunningWorker
from harness import provision

from jetledger.client import LedgerClient
from jetledger.schemas import new_event
from jetledger.schemas.errors import LedgerTimeout
from jetledger.worker.natsserver import NatsServer


async def test_each_waiting_append_gets_its_own_outcome_on_one_subscription(
    worker: RunningWorker,
) -> None:
    nc = await nats.connect(worker.url)
    client = LedgerClient(nc, timeout=10)
    await client.append(new_event(tenant="t0", stream="s", kind="k", data={}), wait=True)
    subs = len(nc._subs)  # the connection's subscriptions, counted
    events = [new_event(tenant=f"t{i % 3}", stream=f"s{i % 5}", kind="k", data={"i": i})
              for i in range(300)]

    results = await asyncio.gather(*(client.append(e, wait=True) for e in events))

    assert [r.id for r in results] == [e.id for e in events]
    assert all(r.outcome == "inserted" and r.position for r in results)
    assert len({r.position for r in results}) == len(events)
    assert len(nc._subs) == subs
    await client.close()
    assert len(nc._subs) == subs - 1  # a borrowed connection outlives the client
    await nc.close()


async def test_a_closed_connection_ends_the_wait_at_once(nats_server: NatsServer) -> None:
    await provision(nats_server.url)  # a stream, and no worker: no notice will come
    nc = await nats.connect(nats_server.url)
    client = LedgerClient(nc, timeout=30)
    append = asyncio.create_task(
        client.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True))
    await asyncio.sleep(0.5)  # published and acked by JetStream: now waiting for a notice
    assert not append.done()

    t0 = time.monotonic()
    await nc.close()
    with pytest.raises(LedgerTimeout, match="lost the connection"):
        await asyncio.wait_for(append, 10)
    assert time.monotonic() - t0 < 3
