"""The worker sends its next pull request before it acks and notifies a committed batch
(`BatchPuller.prefetch`). That request's deliveries are the next fetch's, in JetStream order;
a request still out when the puller closes is waited for, so its deliveries are handed back
(to be nak'd) rather than dropped in flight, which would bring them back only after AckWait
and behind newer events where the consumer is bound rather than re-created."""

from __future__ import annotations

import asyncio
import time

import nats
from harness import publish_events, started_puller

from jetledger.worker.natsserver import NatsServer


def _seqs(msgs: list[nats.aio.msg.Msg]) -> list[int]:
    return [m.metadata.sequence.stream for m in msgs]


async def test_a_prefetched_request_is_the_next_fetch_in_order(nats_server: NatsServer) -> None:
    nc, puller = await started_puller(nats_server.url)
    await publish_events(nc.jetstream(), 0, 5)
    first = await puller.fetch(100, timeout=5)
    got = list(first)
    while len(got) < 5:
        got += await puller.fetch(100, timeout=2)

    await puller.prefetch(100, timeout=5)  # nothing pending yet: the request waits
    await puller.prefetch(100, timeout=5)  # one request out at a time: a no-op
    await publish_events(nc.jetstream(), 5, 5)
    while len(got) < 10:
        more = await puller.fetch(100, timeout=5)
        assert more, "the prefetched request's deliveries must come to the next fetch"
        got += more
    assert _seqs(got) == list(range(1, 11))
    # Nothing left out: an idle fetch ends empty at its timeout.
    assert await puller.fetch(100, timeout=0.3) == []
    await nc.close()


async def test_close_hands_back_what_a_prefetched_request_delivered(
    nats_server: NatsServer
) -> None:
    nc, puller = await started_puller(nats_server.url)
    await publish_events(nc.jetstream(), 0, 20)

    await puller.prefetch(100, timeout=5)
    left = await puller.close()  # at once: the deliveries are still on their way

    assert _seqs(left) == list(range(1, 21))
    await nc.close()


async def test_close_with_an_idle_prefetched_request_ends_by_its_expiry(
    nats_server: NatsServer
) -> None:
    nc, puller = await started_puller(nats_server.url)

    await puller.prefetch(100, timeout=0.5)
    t0 = time.monotonic()
    assert await asyncio.wait_for(puller.close(), 5) == []
    assert time.monotonic() - t0 < 2
    await nc.close()
