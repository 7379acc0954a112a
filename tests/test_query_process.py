"""Queries served from a process of their own (`query_process`, proposed setting; the module
default `QUERY_PROCESS_DEFAULT` stands in for it here) answer exactly as the in-process service
does, feed the worker's query metrics, and never outlive the worker: it stops them on close,
and a worker that dies leaves them at end of file on their stdin."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import RunningWorker

from jetledger.client import LedgerClient, new_event
from jetledger.schemas.errors import InvalidQuery, NotFound
from jetledger.worker import Worker, WorkerConfig
from jetledger.worker import app as app_mod
from jetledger.worker.service import QueryProcess


@pytest.fixture(autouse=True)
def _query_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_mod, "QUERY_PROCESS_DEFAULT", True)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
    return out


async def test_queries_are_answered_by_the_query_process(worker: RunningWorker) -> None:
    queries = worker.worker._queries
    assert isinstance(queries, QueryProcess) and queries.alive
    assert worker.worker._service is None  # nothing served in the worker's own process
    async with await LedgerClient.connect(worker.url, tenant="acme") as client:
        appended = [await client.append(new_event(
            tenant="acme", stream="s", kind="custom_thing", data={"i": i},
            occurred_at=datetime(2026, 1, 1, tzinfo=UTC)), wait=True) for i in range(3)]
        page = await client.events(stream="s")
        assert [e.id for e in page.events] == [a.id for a in appended]
        assert (await client.get(appended[0].id)).data == {"i": 0}
        with pytest.raises(NotFound):
            await client.get("nope")
        with pytest.raises(InvalidQuery):
            await client.events(after_seq=1)
    assert worker.worker.checks()["queries"].ok
    # Reports reach the worker's metrics in bulk, within a second.
    for _ in range(40):
        text = worker.worker.metrics.render().decode()
        if 'jetledger_query_requests_total{op="get",outcome="not_found"} 1.0' in text:
            break
        await asyncio.sleep(0.05)
    assert 'jetledger_query_requests_total{op="events",outcome="ok"} 1.0' in text
    assert 'jetledger_query_requests_total{op="get",outcome="not_found"} 1.0' in text


async def test_the_query_process_stops_with_the_worker(worker_config: WorkerConfig) -> None:
    async with Worker(worker_config) as w:
        child = w._queries._proc.pid if w._queries and w._queries._proc else None
        assert child is not None and child in _children(os.getpid())
    assert child not in _children(os.getpid())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


async def test_a_dead_worker_leaves_its_query_process_at_end_of_file(
    worker: RunningWorker,
) -> None:
    queries = QueryProcess()
    await queries.start(worker.cfg, worker.url)
    proc = queries._proc
    assert proc is not None and proc.stdin is not None
    # As if the worker had died: only its end of the pipe closes, nobody stops the child.
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0
    assert not queries.alive
    await queries.stop()


async def test_ctrl_c_does_not_stop_the_query_process(worker: RunningWorker) -> None:
    queries = QueryProcess()
    await queries.start(worker.cfg, worker.url)
    assert queries._proc is not None
    queries._proc.send_signal(signal.SIGINT)  # the worker decides when queries stop
    await asyncio.sleep(0.3)
    assert queries.alive
    await queries.stop()
    assert queries._proc.returncode == 0
