"""NATS-side faults under a running worker, which must ride them out in the same process.

Case 4: nats-server is killed (SIGKILL, also after hanging), stopped gracefully, or put in
lame-duck mode and restarted while producers keep publishing; producers retry with the same
event until they get a definite answer. Case 7: NATS stays away for longer than a default
client's reconnect budget. Case 9, the worker's side: the server stops answering while the
worker acks. Verdict: every acked event stored once with its content, nothing unaccounted for
in the stream, nothing reordered.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import (
    ProducerLedger,
    WorkerProcess,
    count_events,
    ledger_client,
    produce,
    provision,
    read_stream,
    verify,
    wait_drained,
    wait_for_count,
)

from jetledger.worker.natsserver import NatsServer, NatsServerConfig

RESTARTS = 2  # per mode, while the producer runs
DOWN_FOR = 1.0  # seconds the server stays down each time


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A single JetStream server whose lame-duck mode ends in about two seconds (the duration
    minimum is 30 s, but a server with few clients exits after the grace period)."""
    srv = NatsServer(NatsServerConfig(
        store_dir=tmp_path / "nats", server_name="solo",
        extra_conf='lame_duck_duration: "30s"\nlame_duck_grace_period: "1s"',
    ))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


_sigkills = 0


def _sigkill(srv: NatsServer) -> None:
    """SIGKILL; every other time after freezing the server for a moment first (it hangs, then
    its supervisor kills it): a flush then waits on a PONG that can never come."""
    global _sigkills
    _sigkills += 1
    if _sigkills % 2 == 0:
        srv.pause()
        time.sleep(0.5)
    srv.kill()


def _graceful(srv: NatsServer) -> None:
    srv.stop()


def _lame_duck(srv: NatsServer) -> None:
    srv.lame_duck()
    deadline = time.monotonic() + 15
    while srv.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not srv.is_running(), "nats-server did not leave lame-duck mode"
    srv.stop()  # reap


MODES: dict[str, Callable[[NatsServer], None]] = {
    "sigkill": _sigkill, "graceful": _graceful, "lame_duck": _lame_duck,
}


@pytest.mark.parametrize("mode", [
    "sigkill", "graceful",
    pytest.param("lame_duck", marks=pytest.mark.slow),  # ~20 s: grace period, drain, exit
])
async def test_worker_resumes_after_nats_server_restart_without_loss(
    server: NatsServer, tmp_path: Path, mode: str
) -> None:
    await provision(server.url)
    # The commit delay puts the worker between receiving a batch and acking it most of the
    # time, so the restart lands in the window where acks meet a broken connection.
    worker = WorkerProcess(server.url, tmp_path / "ledger", extra_args=("--batch-size", "100"),
                           env={"JETLEDGER_COMMIT_DELAY": "0.2"})
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    stop = asyncio.Event()
    client = await ledger_client(server.url, timeout=0.5, attempts=1)
    try:
        producer = asyncio.create_task(
            produce(client, ledger, stop, limit=20_000, interval=0.002))
        pid = worker.pid
        for _ in range(RESTARTS):
            mark = await wait_for_count(db, count_events(db) + 200)
            await asyncio.to_thread(MODES[mode], server)
            await asyncio.sleep(DOWN_FOR)
            await asyncio.to_thread(server.start)
            # The same worker process must pick up events published after the restart.
            assert await wait_for_count(db, mark + 300, timeout=20) >= mark + 300, \
                worker.log_tail()
            assert worker.alive() and worker.pid == pid, worker.log_tail()
        stop.set()
        sent = await asyncio.wait_for(producer, 60)
        drained = await wait_drained(server.url, db, timeout=30)
        msgs = await read_stream(server.url)
    finally:
        stop.set()
        await client.close()
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.maybe == 0 and verdict.acked == sent
    stats = worker.stats()
    print(f"\ncase 4 {mode}: sent={sent} server_restarts={RESTARTS} {verdict.summary()} "
          f"attempts={ledger.attempts} producer_errors={dict(ledger.errors)} "
          f"worker={stats} consumer={drained}")


#: nats-py's default: a client closes for good after this many failed reconnect attempts.
DEFAULT_RECONNECT_ATTEMPTS = 60
_FAILED_CONNECT = r"NATS \(jetledger-worker-ingest\): .*(Connect call failed|refused)"


@pytest.mark.slow
async def test_worker_keeps_reconnecting_past_the_default_budget_and_resumes(
    server: NatsServer, tmp_path: Path
) -> None:
    """Case 7. NATS stays unreachable for more reconnect attempts than a default nats-py
    client makes before closing for good (60). The worker keeps trying, reports itself not
    ready meanwhile, and resumes consuming in the same process once NATS is back."""
    await provision(server.url)
    # 0.2 s between attempts instead of 1 s: the same 60+ attempts, in a fifth of the time.
    worker = WorkerProcess(server.url, tmp_path / "ledger",
                           extra_args=("--batch-size", "100", "--http-port", "0",
                                       "--reconnect-wait", "0.2"))
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    never = asyncio.Event()
    port = server.port
    try:
        async with await ledger_client(server.url) as client:
            await produce(client, ledger, never, limit=300, tag="before")
        assert await wait_for_count(db, 300) == 300
        assert (await asyncio.to_thread(worker.readyz))[0] == 200
        pid = worker.pid
        server.stop()
        down_at = time.monotonic()
        # Hold the port, bound but not listening: connects are refused exactly as with the
        # server down, and no other process can take the port meanwhile.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hold:
            hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            hold.bind(("127.0.0.1", port))
            deadline = time.monotonic() + 0.5 * DEFAULT_RECONNECT_ATTEMPTS
            failed = 0
            while time.monotonic() < deadline:
                failed = worker.log_count(_FAILED_CONNECT)
                if failed > DEFAULT_RECONNECT_ATTEMPTS or not worker.alive():
                    break
                await asyncio.sleep(0.2)
            assert failed > DEFAULT_RECONNECT_ATTEMPTS, worker.log_tail()
            status, body = await asyncio.to_thread(worker.readyz)
            assert status == 503 and not body["checks"]["nats"]["ok"], body
            assert worker.alive() and worker.pid == pid
        outage = time.monotonic() - down_at
        await asyncio.to_thread(server.start)
        async with await ledger_client(server.url) as client:
            await produce(client, ledger, never, limit=300, tag="after")
        drained = await wait_drained(server.url, db, timeout=30)
        assert (await asyncio.to_thread(worker.readyz))[0] == 200
        assert worker.alive() and worker.pid == pid
        msgs = await read_stream(server.url)
    finally:
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.acked == 600
    print(f"\ncase 7: outage={outage:.0f}s failed_reconnects={failed} {verdict.summary()} "
          f"worker={worker.stats()} consumer={drained}")


async def test_worker_survives_a_server_that_stops_answering_while_it_acks(
    server: NatsServer, tmp_path: Path
) -> None:
    """The server freezes (SIGSTOP) right when the worker acks a committed batch, for longer
    than the worker waits for the acks to be confirmed, then thaws: the late answer must not
    break the worker's connection (nats-py's flush would: its read loop dies on the late
    PONG), and the same worker goes on consuming."""
    await provision(server.url)
    # Each commit waits 0.5 s: the freeze below starts while the batch is received, not acked.
    worker = WorkerProcess(server.url, tmp_path / "ledger",
                           env={"JETLEDGER_COMMIT_DELAY": "0.5"})
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    never = asyncio.Event()
    try:
        async with await ledger_client(server.url, timeout=5.0) as client:
            for round_ in range(2):  # bounded: two freezes
                await produce(client, ledger, never, limit=1, start=round_, tag="frozen")
                await asyncio.sleep(0.2)
                server.pause()
                try:
                    await asyncio.sleep(3.0)  # beyond the worker's 2 s ack confirmation
                finally:
                    server.resume()
            pid = worker.pid
            await produce(client, ledger, never, limit=50, tag="after")
        drained = await wait_drained(server.url, db, timeout=15)
        assert worker.alive() and worker.pid == pid
        msgs = await read_stream(server.url)
    finally:
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.acked == 52
    stats = worker.stats()
    assert stats["ack_failures"] >= 1, "the freeze did not hit the ack confirmation"
    print(f"\ncase 9 (worker side): freezes=2 {verdict.summary()} worker={stats} "
          f"consumer={drained}")
