"""SIGTERM/SIGINT: the worker stops fetching, finishes (or rolls back) the batch in hand,
never acks what it did not commit, closes cleanly and exits 0; a restart completes the rest."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import nats
import pytest
from harness import WorkerProcess, check_ledger, provision, query

from jetledger.client import LedgerClient, new_event
from jetledger.worker.natsserver import NatsServer

N = 3000


async def _backlog(url: str) -> None:
    await provision(url)
    async with await LedgerClient.connect(url) as client:
        for i in range(N):
            await client.append(new_event(tenant=("a", "b")[i % 2], stream=f"s{i % 7}",
                                          kind="tick", id=f"e{i}", data={"i": i}))


async def _acked_up_to(url: str) -> int:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info("JETLEDGER", "jetledger-worker")
        return info.ack_floor.stream_seq if info.ack_floor else 0
    finally:
        await nc.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_mid_drain_exits_0_and_never_acks_uncommitted(
    nats_server: NatsServer, tmp_path: Path, sig: signal.Signals
) -> None:
    await _backlog(nats_server.url)
    data_dir = tmp_path / "ledger"
    proc = WorkerProcess(nats_server.url, data_dir, extra_args=("--batch-size", "100"))
    proc.start()
    try:
        await asyncio.sleep(0.15)  # mid-drain
        assert proc.proc is not None
        proc.proc.send_signal(sig)
        assert await asyncio.to_thread(proc.wait, 15) == 0, proc.log_tail()
    finally:
        proc.close()
    db = data_dir / "ledger.db"
    committed = query(db, "SELECT coalesce(max(last_js_seq), 0) FROM ingest_state")[0][0]
    assert await _acked_up_to(nats_server.url) <= committed  # acked ⊆ committed
    assert check_ledger(db).events == committed  # every committed message is whole

    again = WorkerProcess(nats_server.url, data_dir)
    again.start()
    try:
        for _ in range(200):
            if query(db, "SELECT count(*) FROM events")[0][0] == N:
                break
            await asyncio.sleep(0.1)
    finally:
        assert again.stop() == 0, again.log_tail()
        again.close()
    report = check_ledger(db)
    assert report.events == N and report.rejections == 0
