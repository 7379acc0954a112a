"""The running worker as an operator sees it: Prometheus metrics, /healthz and /readyz (a
refusing database shows up there), start-up checks (quick_check, NATS sync_interval), and a
graceful SIGTERM within the stop timeout."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from harness import WorkerProcess, query
from prometheus_client.parser import text_string_to_metric_families

from jetledger.client import ConflictError, LedgerClient, NotFound, new_event
from jetledger.worker import Worker, WorkerConfig
from jetledger.worker.health import StartupError, check_database
from jetledger.worker.natsserver import NatsServer, NatsServerConfig


def _config(tmp_path: Path, url: str, **kw: Any) -> WorkerConfig:
    return WorkerConfig(data_dir=tmp_path / "ledger", nats_url=url, ack_wait=5.0,
                        fetch_timeout=0.2, floor_interval=0.5, http_port=0,
                        consumer_info_interval=0.2, **kw)


def _get(url: str, method: str = "GET") -> tuple[int, bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


async def _http(url: str, method: str = "GET") -> tuple[int, bytes]:
    return await asyncio.to_thread(_get, url, method)


async def _metrics(worker: Worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, body = await _http(worker.http_url + "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def _until(check: Any, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in {timeout}s (last: {value!r})")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _running(cfg: WorkerConfig) -> AsyncIterator[Worker]:
    async with Worker(cfg) as worker:
        task = asyncio.create_task(worker.run())
        try:
            yield worker
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 10)


async def test_metrics_count_outcomes_batches_queries_and_probes_answer(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    async with _running(_config(tmp_path, nats_server.url)) as worker:
        ready = await _until(lambda: _ready(worker))
        assert ready["checks"]["consumer"]["ok"] and ready["checks"]["storage"]["ok"]
        async with await LedgerClient.connect(worker.url, tenant="acme") as client:
            first = new_event(tenant="acme", stream="s", kind="k", data={"a": 1})
            await client.append(first, wait=True)
            await client.append(first, wait=True)  # duplicate
            with pytest.raises(ConflictError):
                await client.append(new_event(tenant="acme", stream="s", kind="k",
                                              id=first.id, data={"a": 2}), wait=True)
            await client.append_batch([new_event(tenant="acme", stream="b", kind="k", data={})
                                       for _ in range(2)], wait=True)
            nc = await nats.connect(worker.url)
            await nc.jetstream().publish("jetledger.evt.acme.k", b"not an event")
            await nc.close()
            assert (await client.get(first.id)).id == first.id
            with pytest.raises(NotFound):
                await client.get("no-such-event")

        async def settled() -> Any:
            m = await _metrics(worker)
            return m if m[("jetledger_events_total", (("outcome", "rejected"),))] == 1 else None

        m = await _until(settled)
        events = {o: m[("jetledger_events_total", (("outcome", o),))]
                  for o in ("inserted", "duplicate", "conflict", "rejected")}
        assert events == {"inserted": 3, "duplicate": 1, "conflict": 1, "rejected": 1}
        assert m[("jetledger_messages_received_total", ())] == 5
        batches = m[("jetledger_batches_total", ())]
        assert m[("jetledger_commit_duration_seconds_count", ())] == batches >= 1
        assert m[("jetledger_commit_batch_messages_sum", ())] == 5
        assert m[("jetledger_query_requests_total", (("op", "get"), ("outcome", "ok")))] >= 1
        assert m[("jetledger_query_requests_total",
                  (("op", "get"), ("outcome", "not_found")))] == 1
        assert m[("jetledger_storage_failing", ())] == 0
        assert m[("jetledger_ready", ())] == 1
        # No reader held a snapshot: each checkpoint copied the whole WAL back.
        assert m[("jetledger_wal_frames", ())] >= 1
        assert m[("jetledger_wal_frames_not_checkpointed", ())] == 0
        assert m[("jetledger_wal_checkpoint_failures_total", ())] == 0

        async def drained() -> Any:
            m = await _metrics(worker)
            return m[("jetledger_consumer_pending_messages", ())] == 0 and m[
                ("jetledger_consumer_ack_pending_messages", ())] == 0
        await _until(drained)
        assert await _http(worker.http_url + "/healthz") == (200, b"ok\n")
        assert (await _http(worker.http_url + "/nope"))[0] == 404
        assert (await _http(worker.http_url + "/readyz", "POST"))[0] == 405
        assert (await _http(worker.http_url + "/readyz", "HEAD")) == (200, b"")


async def _ready(worker: Worker) -> Any:
    status, body = await _http(worker.http_url + "/readyz")
    doc = json.loads(body)
    assert (status == 200) == doc["ready"]
    return doc if doc["ready"] else None


async def test_readiness_fails_while_the_database_refuses_commits_and_recovers(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    cfg = _config(tmp_path, nats_server.url, sqlite_busy_timeout_ms=50, max_retry_delay=0.2)
    async with _running(cfg) as worker:
        await _until(lambda: _ready(worker))
        lock = sqlite3.connect(cfg.db_path, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")  # as a stuck writer or a read-only file would
            async with await LedgerClient.connect(worker.url, tenant="acme") as client:
                event = new_event(tenant="acme", stream="s", kind="k", data={})
                await client.append(event)

            async def refused() -> Any:
                status, body = await _http(worker.http_url + "/readyz")
                doc = json.loads(body)
                return doc if status == 503 and not doc["checks"]["storage"]["ok"] else None

            doc = await _until(refused)
            assert "locked" in doc["checks"]["storage"]["detail"]
            assert doc["checks"]["nats"]["ok"] and doc["checks"]["consumer"]["ok"]
            m = await _metrics(worker)
            assert m[("jetledger_storage_failing", ())] == 1 and m[("jetledger_ready", ())] == 0
            assert m[("jetledger_storage_retries_total", ())] >= 1
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await _until(lambda: _ready(worker))
        assert query(cfg.db_path, "SELECT id FROM events") == [(event.id,)]


def _corrupt_ledger(path: Path) -> None:
    path.parent.mkdir(parents=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT)")
    conn.execute("CREATE INDEX tb ON t (b)")
    conn.executemany("INSERT INTO t (b) VALUES (?)", [(f"v{i:05d}" * 5,) for i in range(3000)])
    conn.commit()
    conn.close()
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    last = len(data) // page - 2
    data[last * page + 8:(last + 1) * page] = b"\xff" * (page - 8)  # a torn page
    path.write_bytes(bytes(data))


async def test_a_damaged_ledger_file_stops_start_up_with_a_clear_message(tmp_path: Path) -> None:
    cfg = WorkerConfig(data_dir=tmp_path / "ledger", nats_url="nats://127.0.0.1:1")
    _corrupt_ledger(cfg.db_path)
    before = cfg.db_path.read_bytes()
    with pytest.raises(StartupError, match="fails PRAGMA quick_check: On tree page"):
        async with Worker(cfg):
            pass
    out = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "jetledger.client.cli", "worker", "--data-dir",
         str(cfg.data_dir), "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert "not starting: ledger file" in out.stderr and "jetledger rebuild" in out.stderr
    assert cfg.db_path.read_bytes() == before  # the check never writes
    cfg.db_path.write_bytes(b"not a database" * 512)
    with pytest.raises(StartupError, match="fails PRAGMA quick_check: file is not a database"):
        check_database(cfg.db_path)


async def test_start_up_warns_when_nats_does_not_sync_every_write(
    nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lazy = NatsServer(NatsServerConfig(store_dir=tmp_path / "lazy", sync_always=False,
                                       http_port=0))
    lazy.start()
    try:
        async with _running(_config(tmp_path / "a", lazy.url,
                                        nats_monitor_url=lazy.http_url)):
            pass
    finally:
        lazy.stop()
    warned = [r for r in caplog.records if "does not fsync every JetStream write" in r.message]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING
    caplog.clear()
    async with _running(_config(tmp_path / "b", nats_server.url,
                                    nats_monitor_url=nats_server.http_url)):
        pass
    assert not [r for r in caplog.records if "fsync" in r.message]
    async with _running(_config(tmp_path / "c", nats_server.url,
                                    nats_monitor_url="http://127.0.0.1:1")):
        pass
    assert [r for r in caplog.records if "could not read http://127.0.0.1:1/varz" in r.message]


async def test_sigterm_stops_within_the_stop_timeout_even_mid_retry_and_loses_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    data_dir = tmp_path / "ledger"
    args = ("--stop-timeout", "5", "--fetch-timeout", "0.2", "--sqlite-busy-timeout-ms", "50",
            "--max-retry-delay", "0.2", "--log-format", "json")
    worker = WorkerProcess(nats_server.url, data_dir, extra_args=args)
    worker.start()
    lock = None
    try:
        await asyncio.sleep(0.3)  # let the first (empty) commit create the schema
        lock = sqlite3.connect(data_dir / "ledger.db", isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        async with await LedgerClient.connect(nats_server.url, tenant="acme") as client:
            event = new_event(tenant="acme", stream="s", kind="k", data={})
            await client.append(event)
        await _until(_log_has(worker, "database refused the batch"))
        started = time.monotonic()
        code = await asyncio.to_thread(worker.stop, 10)
        elapsed = time.monotonic() - started
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        worker.close()
    assert code == 0, worker.log_tail()
    assert elapsed < 5, elapsed
    assert query(data_dir / "ledger.db", "SELECT count(*) FROM events") == [(0,)]
    # The batch was left unacked: the next run stores it.
    again = WorkerProcess(nats_server.url, data_dir, extra_args=args)
    again.start()
    try:
        async def stored() -> bool:
            rows = query(data_dir / "ledger.db", "SELECT id FROM events")
            return rows == [(event.id,)]
        await _until(stored)
    finally:
        assert again.stop() == 0
        again.close()


def _log_has(worker: WorkerProcess, text: str) -> Any:
    async def check() -> bool:
        return text in worker.log_text()
    return check


async def test_a_stop_slower_than_the_stop_timeout_exits_1(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    worker = WorkerProcess(nats_server.url, tmp_path / "ledger",
                           extra_args=("--stop-timeout", "1", "--fetch-timeout", "0.2"))
    worker.start()
    nats_server.pause()  # NATS answers nothing: draining the connections cannot finish
    try:
        started = time.monotonic()
        code = await asyncio.to_thread(worker.stop, 10)
        elapsed = time.monotonic() - started
    finally:
        nats_server.resume()
        worker.close()
    assert code == 1, worker.log_tail()
    assert 1 <= elapsed < 5
    assert "stop took longer than stop_timeout (1s)" in worker.log_text()
