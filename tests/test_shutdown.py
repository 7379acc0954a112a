"""SIGTERM/SIGINT: the worker stops fetching, finishes (or rolls back) the batch in hand,
never acks what it did not commit, closes cleanly and exits 0; a restart completes the rest."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
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


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state == "Z":  # exited, waiting to be reaped by whoever is its parent now
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


@pytest.mark.parametrize("signals", [1, 2], ids=["one SIGINT drains", "a second exits now"])
def test_a_worker_on_its_embedded_server_never_leaves_the_server_running(
    tmp_path: Path, signals: int
) -> None:
    """The embedded nats-server runs in its own session (a terminal's Ctrl-C reaches only
    the worker, which drains first): however the worker stops, it stops the server."""
    # A long fetch: the stop waits for the pull request in flight, so a second signal
    # surely lands while the worker is still stopping.
    with subprocess.Popen(
        [sys.executable, "-m", "jetledger.client.cli", "worker", "--data-dir",
         str(tmp_path / "data"), "--port", "0", "--fetch-timeout", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ) as proc:
        server = 0
        try:
            assert proc.stdout is not None
            lines = iter(proc.stdout)
            if not any("jetledger worker ready" in line for line in lines):
                pytest.fail(f"the worker never got ready (exit {proc.wait()})")
            (server,) = _children(proc.pid)
            assert "nats-server" in Path(f"/proc/{server}/cmdline").read_text()
            proc.send_signal(signal.SIGINT)
            if signals == 2:
                assert any("SIGINT: stopping" in line for line in lines)
                proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == (0 if signals == 1 else 1)
            assert _gone(server, timeout=10), "the embedded nats-server outlived the worker"
        finally:
            if proc.poll() is None:
                proc.kill()
            if server and not _gone(server, timeout=0):
                os.kill(server, signal.SIGKILL)  # never leave one behind, even failing
