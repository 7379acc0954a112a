"""Case 8: the durable consumer is deleted under a running worker, twice, while producers
publish. The worker notices on its next fetch, recreates the consumer from the position its
own ledger recorded (never later than what it committed), and carries on in the same process:
nothing lost, replays are no-ops, nothing unaccounted for in the stream."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from harness import (
    CONSUMER,
    STREAM,
    ProducerLedger,
    WorkerProcess,
    admin_connect,
    count_events,
    ledger_client,
    produce,
    provision,
    query,
    read_stream,
    verify,
    wait_drained,
    wait_for_count,
)

from jetledger.worker.natsserver import NatsServer

DELETIONS = 2
_RECREATED = re.compile(r"creating consumer \S+ from sequence (\d+)")


async def test_deleted_consumer_is_recreated_from_the_ledgers_floor_without_loss(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    await provision(url)
    worker = WorkerProcess(url, tmp_path / "ledger",
                           extra_args=("--batch-size", "100", "--floor-interval", "0.3"))
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    stop = asyncio.Event()
    admin = await admin_connect(url)
    floors: list[tuple[int, int]] = []  # (recorded floor, committed) when deleted
    try:
        async with await ledger_client(url) as client:
            producer = asyncio.create_task(
                produce(client, ledger, stop, limit=20_000, interval=0.002))
            pid = worker.pid
            for _ in range(DELETIONS):
                mark = await wait_for_count(db, count_events(db) + 300)
                floor, committed = query(
                    db, "SELECT ack_floor, last_js_seq FROM ingest_state")[0]
                await admin.jetstream().delete_consumer(STREAM, CONSUMER)
                floors.append((int(floor), int(committed)))
                assert await wait_for_count(db, mark + 300, timeout=20) >= mark + 300, \
                    worker.log_tail()
                assert worker.alive() and worker.pid == pid
            stop.set()
            sent = await asyncio.wait_for(producer, 60)
        drained = await wait_drained(url, db, timeout=30)
        msgs = await read_stream(url)
    finally:
        stop.set()
        await admin.close()
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    # No loss: every message of the stream is stored or rejected, whatever the restarts.
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    # The first creation (sequence 1) is the start; then one per deletion, each from the
    # floor the ledger had recorded (at least the one seen just before the deletion), not
    # from the beginning of the stream.
    starts = [int(m) for m in _RECREATED.findall(worker.log_text())]
    assert len(starts) == 1 + DELETIONS, worker.log_tail()
    for start, (floor, _) in zip(starts[1:], floors, strict=True):
        assert start >= floor + 1 > 1, (starts, floors)
    assert verdict.acked == sent
    stats = worker.stats()
    assert stats["resubscribes"] >= DELETIONS
    print(f"\ncase 8: deletions={DELETIONS} recreated_from={starts[1:]} floors={floors} "
          f"{verdict.summary()} worker={stats} consumer={drained}")
