"""A worker killed with SIGKILL at any point and restarted ends with every acked event
stored exactly once, positions and per-stream seqs gap-free."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from harness import WorkerProcess, check_ledger, provision, query

from jetledger.client import LedgerClient, new_event
from jetledger.worker.natsserver import NatsServer

TENANTS = ("acme", "globex", "initech")


async def _publish(url: str, n: int, start: int = 0) -> set[tuple[str, str]]:
    """Publish n events over three tenants and five streams; returns the (tenant, id) set."""
    ids: set[tuple[str, str]] = set()
    await provision(url)
    async with await LedgerClient.connect(url) as client:
        for i in range(start, start + n):
            tenant = TENANTS[i % 3]
            event = new_event(tenant=tenant, stream=f"run-{i % 5}", kind="tick",
                              id=f"e{i:06d}", data={"i": i, "pad": "x" * 200})
            await client.append(event)
            ids.add((tenant, event.id))
    return ids


def _wait_for_count(db: Path, n: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    count = -1
    while time.monotonic() < deadline:
        if db.exists():
            count = query(db, "SELECT count(*) FROM events")[0][0]
            if count >= n:
                return int(count)
        time.sleep(0.1)
    return count


@pytest.mark.parametrize("crash_at", ["before_commit", "after_commit", "after_ack"])
async def test_killed_at_a_crash_point_and_restarted_stores_everything_once(
    nats_server: NatsServer, tmp_path: Path, crash_at: str
) -> None:
    expected = await _publish(nats_server.url, 1500)
    data_dir = tmp_path / "ledger"
    crashing = WorkerProcess(nats_server.url, data_dir, crash_at=crash_at, crash_after=2,
                             extra_args=("--batch-size", "200"))
    crashing.start()
    assert crashing.wait(30) == -9  # it really died by SIGKILL at that point
    crashing.close()
    db = data_dir / "ledger.db"
    committed_before_restart = query(db, "SELECT count(*) FROM events")[0][0]
    assert committed_before_restart == (400 if crash_at == "before_commit" else 600)

    healthy = WorkerProcess(nats_server.url, data_dir, extra_args=("--batch-size", "200"))
    healthy.start()
    try:
        assert await asyncio.to_thread(_wait_for_count, db, len(expected)) == len(expected)
        await asyncio.sleep(0.3)  # let any stray redelivery arrive: it must be a no-op
    finally:
        assert healthy.stop() == 0, healthy.log_tail()
        healthy.close()
    report = check_ledger(db)
    assert report.ids == expected and report.rejections == 0


async def test_repeated_sigkill_under_a_continuous_producer_loses_and_duplicates_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "ledger"
    expected: set[tuple[str, str]] = set()
    producer = asyncio.create_task(_publish(nats_server.url, 3000))
    kills = 0
    for _ in range(4):  # bounded: four kill/restart rounds while the producer runs
        proc = WorkerProcess(nats_server.url, data_dir, extra_args=("--batch-size", "100"))
        proc.start()
        await asyncio.sleep(0.4)
        proc.kill()
        proc.close()
        kills += 1
    expected |= await asyncio.wait_for(producer, 60)
    final = WorkerProcess(nats_server.url, data_dir)
    final.start()
    try:
        db = data_dir / "ledger.db"
        assert await asyncio.to_thread(_wait_for_count, db, len(expected)) == len(expected)
    finally:
        assert final.stop() == 0, final.log_tail()
        final.close()
    report = check_ledger(data_dir / "ledger.db")
    assert kills == 4 and report.ids == expected
