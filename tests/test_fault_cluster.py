"""Cases 5 and 6: a 3-node JetStream cluster on loopback, the stream and the worker's consumer
at R3, the worker given every node's URL. Killing the stream leader, then a follower, stalls
writes briefly; losing quorum (2 of 3 down) stops them with errors, never with an ack for
something then missing; after healing everything resumes. The verdict, as everywhere: every
acked event stored once with its content, the stream fully accounted for."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
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
    read_stream,
    verify,
    wait_drained,
    wait_for_count,
)

from jetledger.worker.natsserver import NatsServer

T = TypeVar("T")


async def _poll(urls: list[str], probe: Callable[[Any], Awaitable[T | None]], failure: str,
                timeout: float = 30.0) -> T:
    """`probe(js)`'s first answer that is not None, asked every 0.2 s (a probe that raises,
    say for want of a leader, is asked again); AssertionError(failure) after `timeout`."""
    nc = await admin_connect(urls)
    try:
        js = nc.jetstream(timeout=2)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(Exception):  # no leader yet
                found = await probe(js)
                if found is not None:
                    return found
            await asyncio.sleep(0.2)
        raise AssertionError(failure)
    finally:
        await nc.close()


async def _stream_leader(urls: list[str]) -> str:
    """The server name of the stream's current leader (waits for an election)."""
    async def leader(js: Any) -> str | None:
        info = await js.stream_info(STREAM)
        return str(info.cluster.leader) if info.cluster and info.cluster.leader else None

    return await _poll(urls, leader, "the stream has no leader")


async def _wait_whole(urls: list[str]) -> None:
    """Wait until the stream and the worker's consumer have a leader and every replica is
    current again: a node restarted a moment ago may still be catching up, and a kill then
    would leave one node of three, not the two this test is about."""
    async def whole(js: Any) -> bool | None:
        infos = [await js.stream_info(STREAM), await js.consumer_info(STREAM, CONSUMER)]
        return all(i.cluster is not None and i.cluster.leader and i.cluster.replicas
                   and all(r.current and not r.offline for r in i.cluster.replicas)
                   for i in infos) or None

    await _poll(urls, whole, "the restarted node did not catch up")


def _by_name(cluster: list[NatsServer], name: str) -> NatsServer:
    return next(s for s in cluster if s.config.server_name == name)


async def _start_worker(cluster: list[NatsServer], tmp_path: Path) -> WorkerProcess:
    urls = [s.url for s in cluster]
    await provision(urls, replicas=3)
    worker = WorkerProcess(",".join(urls), tmp_path / "ledger",
                           extra_args=("--replicas", "3", "--batch-size", "100"))
    worker.start(timeout=60)
    return worker


async def test_killing_the_stream_leader_then_a_follower_loses_nothing(
    nats_cluster: list[NatsServer], tmp_path: Path
) -> None:
    urls = [s.url for s in nats_cluster]
    worker = await _start_worker(nats_cluster, tmp_path)
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    stop = asyncio.Event()
    killed: list[str] = []
    try:
        async with await ledger_client(urls, timeout=1.0, attempts=1) as client:
            producer = asyncio.create_task(
                produce(client, ledger, stop, limit=20_000, interval=0.002))
            pid = worker.pid
            for role in ("leader", "follower"):
                mark = await wait_for_count(db, count_events(db) + 200, timeout=30)
                leader = await _stream_leader(urls)
                victim = _by_name(nats_cluster, leader) if role == "leader" else next(
                    s for s in nats_cluster if s.config.server_name != leader)
                killed.append(f"{role}:{victim.config.server_name}")
                victim.kill()
                # Writes go on with two of three nodes.
                assert await wait_for_count(db, mark + 300, timeout=30) >= mark + 300, \
                    worker.log_tail()
                await victim.astart(timeout=30)
                await _wait_whole(urls)
                assert worker.alive() and worker.pid == pid
            mark = await wait_for_count(db, count_events(db) + 200, timeout=30)
            stop.set()
            sent = await asyncio.wait_for(producer, 60)
        drained = await wait_drained(urls, db, timeout=60)
        msgs = await read_stream(urls)
    finally:
        stop.set()
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.acked == sent and verdict.maybe == 0
    print(f"\ncase 5: killed={killed} sent={sent} attempts={ledger.attempts} "
          f"producer_errors={dict(ledger.errors)} {verdict.summary()} "
          f"worker={worker.stats()} consumer={drained}")


QUORUM_LOST_FOR = 5.0  # seconds with only one node of three up


@pytest.mark.slow
async def test_losing_quorum_gives_producers_errors_never_false_acks_and_heals(
    nats_cluster: list[NatsServer], tmp_path: Path
) -> None:
    urls = [s.url for s in nats_cluster]
    worker = await _start_worker(nats_cluster, tmp_path)
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    stop = asyncio.Event()
    try:
        async with await ledger_client(urls, timeout=1.0, attempts=1) as client:
            producer = asyncio.create_task(
                produce(client, ledger, stop, limit=20_000, interval=0.002, retry_for=60))
            pid = worker.pid
            await wait_for_count(db, 300, timeout=30)
            leader = await _stream_leader(urls)
            down = [_by_name(nats_cluster, leader),
                    next(s for s in nats_cluster if s.config.server_name != leader)]
            for server in down:
                server.kill()
            await asyncio.sleep(0.5)  # acks already on the wire before the kills arrive
            acked_before = len(ledger.keys("acked"))
            errors_before = sum(ledger.errors.values())
            await asyncio.sleep(QUORUM_LOST_FOR)
            # Without quorum nothing can be acked; producers get errors instead.
            acked_during = len(ledger.keys("acked")) - acked_before
            errors_during = sum(ledger.errors.values()) - errors_before
            assert errors_during > 0, "producers were not told anything during quorum loss"
            assert acked_during == 0, f"{acked_during} acks without quorum"
            for server in down:
                await server.astart(timeout=30)
            healed_at = time.monotonic()
            mark = await wait_for_count(db, count_events(db) + 300, timeout=60)
            resumed_after = time.monotonic() - healed_at
            assert worker.alive() and worker.pid == pid
            stop.set()
            sent = await asyncio.wait_for(producer, 90)
        drained = await wait_drained(urls, db, timeout=60)
        msgs = await read_stream(urls)
    finally:
        stop.set()
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.acked == sent and verdict.maybe == 0
    print(f"\ncase 6: down={[s.config.server_name for s in down]} for {QUORUM_LOST_FOR}s "
          f"producer_errors_during={errors_during} acks_during={acked_during} "
          f"resumed_{resumed_after:.1f}s_after_heal (count {mark}) sent={sent} "
          f"attempts={ledger.attempts} errors={dict(ledger.errors)} {verdict.summary()} "
          f"worker={worker.stats()} consumer={drained}")
