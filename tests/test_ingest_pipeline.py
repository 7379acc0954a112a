"""The worker's receive path: batches commit in JetStream order; `BatchPuller` returns what is
pending at once, waits for the first message when nothing is, ends empty at its timeout,
reports a deleted consumer, and tells a delivery from a status message by its reply subject,
so a producer's own `Status` header can neither hide an event nor stall the ledger."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import nats
import pytest
from harness import (
    CONSUMER,
    STREAM,
    make_event,
    provision,
    publish_events,
    query,
    started_puller,
)
from nats.js.errors import APIError

from jetledger.schemas import CONTENT_TYPE, MSGPACK, Subjects, encode
from jetledger.worker.config import WorkerConfig
from jetledger.worker.consumer import Ingestor
from jetledger.worker.natsserver import NatsServer
from jetledger.worker.writer import LedgerWriter

SUBJECTS = Subjects("jetledger")


async def _run_worker(url: str, tmp_path: Path, n: int, batch_size: int) -> IngestorRun:
    run = IngestorRun(url, tmp_path, batch_size)
    await run.start()
    await run.wait_for(n)
    await run.stop()
    return run


class IngestorRun:
    """An Ingestor in this process on a real server and a real ledger file."""

    def __init__(self, url: str, tmp_path: Path, batch_size: int) -> None:
        self.url = url
        self.cfg = WorkerConfig(nats_url=url, data_dir=tmp_path / "ledger",
                                batch_size=batch_size, fetch_timeout=0.5)

    async def start(self) -> None:
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.nc = await nats.connect(self.url)
        self.writer = await LedgerWriter.open(self.cfg.db_path, js_stream=STREAM)
        self.ingestor = Ingestor(self.nc, self.nc.jetstream(), self.writer, self.cfg)
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(self.ingestor.run(self.stop_event))

    async def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ingestor.stats.messages < n:
            assert not self.task.done(), self.task.exception()
            assert time.monotonic() < deadline, self.ingestor.stats.line()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 10)
        await self.writer.close()
        await self.nc.close()


async def test_small_batches_commit_in_jetstream_order(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await provision(nats_server.url)
    nc = await nats.connect(nats_server.url)
    await publish_events(nc.jetstream(), 0, 1000)
    await nc.close()

    run = await _run_worker(nats_server.url, tmp_path, 1000, batch_size=37)

    rows = query(run.cfg.db_path, "SELECT js_seq FROM events ORDER BY position")
    assert [r[0] for r in rows] == list(range(1, 1001))
    assert run.ingestor.stats.batches >= 1000 // 37


async def test_a_producer_set_status_header_is_an_ordinary_event(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    await provision(nats_server.url)
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await publish_events(js, 0, 1)
    await publish_events(js, 1, 1, headers={"Status": "503"})
    await publish_events(js, 2, 1, headers={"Status": "404", "Description": "No Messages"})
    await publish_events(js, 3, 1)
    await nc.close()

    run = await _run_worker(nats_server.url, tmp_path, 4, batch_size=10)

    assert query(run.cfg.db_path, "SELECT count(*) FROM events") == [(4,)]
    assert run.ingestor.stats.resubscribes == 0


async def test_puller_returns_pending_messages_at_once_and_keeps_order(
    nats_server: NatsServer
) -> None:
    nc, puller = await started_puller(nats_server.url)
    await publish_events(nc.jetstream(), 0, 25)

    t0 = time.monotonic()
    first = await puller.fetch(10, timeout=5)
    rest = await puller.fetch(100, timeout=5)
    elapsed = time.monotonic() - t0

    seqs = [m.metadata.sequence.stream for m in first + rest]
    assert seqs == list(range(1, 26))
    assert elapsed < 2, "a partly filled batch must not wait for the timeout"
    await nc.close()


async def test_puller_waits_for_the_first_message_and_ends_empty_when_idle(
    nats_server: NatsServer
) -> None:
    nc, puller = await started_puller(nats_server.url)

    t0 = time.monotonic()
    assert await puller.fetch(100, timeout=0.5) == []
    assert 0.4 < time.monotonic() - t0 < 3

    async def publish_later() -> None:
        await asyncio.sleep(0.3)
        await publish_events(nc.jetstream(), 0, 3)

    later = asyncio.create_task(publish_later())
    t0 = time.monotonic()
    got = await puller.fetch(100, timeout=5)
    await later
    assert got and time.monotonic() - t0 < 3
    while len(got) < 3:
        got += await puller.fetch(100, timeout=1)
    assert [m.metadata.sequence.stream for m in got] == [1, 2, 3]
    await nc.close()


async def test_puller_bounds_a_batch_by_bytes_and_returns_it_at_once(
    nats_server: NatsServer
) -> None:
    """Messages can be bundles of up to max_payload: a batch is bounded in bytes too, and
    a batch cut short by the byte bound comes back at once, the rest in the next ones."""
    nc, puller = await started_puller(nats_server.url)
    js = nc.jetstream()
    pad = "x" * (256 * 1024)
    n = 40  # ~10 MiB: more than the smallest byte bound
    for i in range(n):
        event = msgspec.structs.replace(make_event(i), data={"pad": pad})
        await js.publish(SUBJECTS.event(event.tenant, event.kind), encode(event),
                         headers={CONTENT_TYPE: MSGPACK})

    got: list[int] = []
    t0 = time.monotonic()
    first = await puller.fetch(1000, timeout=5)
    assert time.monotonic() - t0 < 2, "a batch cut by the byte bound must not wait"
    assert 0 < len(first) < n
    assert sum(len(m.data) for m in first) <= 2 * nc.max_payload + 8 * 1024 * 1024
    got += [m.metadata.sequence.stream for m in first]
    while len(got) < n:
        more = await puller.fetch(1000, timeout=5)
        assert more, "the rest must follow"
        got += [m.metadata.sequence.stream for m in more]
    assert got == list(range(1, n + 1))
    await nc.close()


async def test_puller_reports_a_deleted_consumer(nats_server: NatsServer) -> None:
    nc, puller = await started_puller(nats_server.url)
    await nc.jetstream().delete_consumer(STREAM, CONSUMER)

    with pytest.raises(APIError):
        await puller.fetch(10, timeout=2)
    await nc.close()
