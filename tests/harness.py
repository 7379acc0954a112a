"""Test harness: the shared ledger checker, a producer-side ledger of attempts and outcomes,
and the worker run as a real subprocess.

The checker's verdict for every fault case: 0 lost (every event JetStream acked is stored),
0 duplicated, 0 wrong content, rejections exactly as injected, integrity_check ok, positions
and per-stream seqs gap-free, and every message in the JetStream stream accounted for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "LedgerReport",
    "ProducerLedger",
    "StreamMessage",
    "Verdict",
    "WorkerProcess",
    "admin_connect",
    "append_definitely",
    "check_ledger",
    "expected_hash",
    "provision",
    "query",
    "read_stream",
    "run_producers",
    "verify",
    "wait_drained",
]

STREAM = "JETLEDGER"
CONSUMER = "jetledger-worker"


async def provision(url: str | Sequence[str], *, replicas: int = 1) -> None:
    """Create the JetStream stream as the worker (or an admin step) does, so producers can
    publish before any worker has run."""
    from jetledger.worker import WorkerConfig
    from jetledger.worker.jetstream import ensure_stream

    nc = await admin_connect(url)
    try:
        first = url if isinstance(url, str) else url[0]
        await ensure_stream(nc.jetstream(timeout=10),
                            WorkerConfig(nats_url=first, replicas=replicas))
    finally:
        await nc.close()


async def admin_connect(url: str | Sequence[str], **kwargs: Any) -> Any:
    """A nats-py connection for test bookkeeping: every server of a cluster, quick reconnects,
    no give-up while a test heals the servers. Close it."""
    import nats

    servers = [url] if isinstance(url, str) else list(url)
    opts: dict[str, Any] = {"connect_timeout": 2, "reconnect_time_wait": 0.2,
                            "max_reconnect_attempts": -1, "allow_reconnect": True}
    opts.update(kwargs)

    async def quiet(exc: Exception) -> None:  # disconnections are the point of fault tests
        pass

    opts.setdefault("error_cb", quiet)
    return await nats.connect(servers=servers, **opts)


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one read on the ledger file with a connection of its own."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


@dataclass
class LedgerReport:
    events: int
    rejections: int
    streams: int
    ids: set[tuple[str, str]]


def check_ledger(db_path: Path) -> LedgerReport:
    """Assert what must hold of every ledger file, whatever happened to it.

    integrity_check ok; positions 1..N without gaps; each stream's seqs 1..n without gaps;
    each stream's head row agrees with its events; (tenant, id) unique.
    """
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
    positions = [r[0] for r in query(db_path, "SELECT position FROM events ORDER BY position")]
    assert positions == list(range(1, len(positions) + 1)), "positions have gaps"
    # Every event names a tenant, kind and stream that exist, and its stream is its tenant's.
    assert query(db_path, "SELECT count(*) FROM named_events") == [(len(positions),)]
    assert query(db_path, "SELECT count(*) FROM events AS e JOIN streams AS s"
                          " ON s.stream_id = e.stream_id WHERE s.tenant_id != e.tenant_id"
                 ) == [(0,)], "an event's stream belongs to another tenant"
    for table, key in (("tenants", "tenant_id"), ("kinds", "kind_id"), ("streams", "stream_id")):
        assert query(db_path, f"SELECT count(*) FROM {table} WHERE {key} NOT IN"
                              f" (SELECT {key} FROM events)") == [(0,)], f"{table} without events"
    per_stream: dict[tuple[str, str], list[int]] = {}
    last_position: dict[tuple[str, str], int] = {}
    for tenant, stream, seq, position in query(
        db_path,
        "SELECT tenant, stream, seq, position FROM named_events"
        " ORDER BY tenant, stream, position",
    ):
        per_stream.setdefault((tenant, stream), []).append(seq)
        last_position[(tenant, stream)] = position
    for key, seqs in per_stream.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"seqs of {key} have gaps: {seqs[:20]}"
    heads = {
        (t, s): (h, last)
        for t, s, h, last in query(
            db_path, "SELECT tenant, stream, head_seq, last_position FROM named_streams"
        )
    }
    assert set(heads) == set(per_stream)
    for key, seqs in per_stream.items():
        assert heads[key][0] == len(seqs), f"head of {key} is {heads[key][0]}, not {len(seqs)}"
        assert heads[key][1] == last_position[key], f"last_position of {key} is stale"
    ids = {(t, i) for t, i in query(db_path, "SELECT tenant, id FROM named_events")}
    assert len(ids) == len(positions), "an event id is stored twice"
    (rejections,) = query(db_path, "SELECT count(*) FROM rejections")[0]
    return LedgerReport(len(positions), rejections, len(per_stream), ids)


# --- the producer side: every attempt and its outcome ---------------------------------------

ACKED = "acked"  # JetStream confirmed it: it must be in the ledger
UNKNOWN = "unknown"  # never confirmed nor refused: it may be (the stream audit decides)
REFUSED = "refused"  # definitely not stored by this attempt
REJECTED = "rejected"  # consumed and refused by the worker: must not be stored
_RANK = {REFUSED: 0, UNKNOWN: 1, REJECTED: 2, ACKED: 3}


def expected_hash(event: Any) -> str:
    """The content hash the worker must store for `event`: its canonical form after the same
    wire round trip (encode, decode, validate) a producer's event takes."""
    from jetledger.schemas import encode
    from jetledger.schemas.codec import canonical_bytes, decode_event

    wire = decode_event(encode(event))
    return hashlib.sha256(canonical_bytes(decode_event(encode(wire)))).hexdigest()


@dataclass
class Sent:
    """One event as its producer saw it: its first content and its best outcome so far."""

    tenant: str
    id: str
    content_hash: str
    state: str = REFUSED
    attempts: int = 0
    js_seqs: list[int] = field(default_factory=list)


class ProducerLedger:
    """What producers tried and what they were told, so the checker knows exactly what must
    (ACKED), may (UNKNOWN) and must not (REFUSED) be in the ledger, and which rejections."""

    def __init__(self) -> None:
        self.sent: dict[tuple[str, str], Sent] = {}
        self.rejections: Counter[tuple[str | None, str | None, str]] = Counter()
        self.attempts = 0
        self.errors: Counter[str] = Counter()  # exception type -> count, for the report

    def attempt(self, event: Any) -> Sent:
        key = (event.tenant, event.id)
        rec = self.sent.get(key)
        if rec is None:
            rec = self.sent[key] = Sent(event.tenant, event.id, expected_hash(event))
        rec.attempts += 1
        self.attempts += 1
        return rec

    def settle(self, rec: Sent, state: str, js_seq: int | None = None) -> None:
        if _RANK[state] > _RANK[rec.state]:
            rec.state = state
        if js_seq is not None:
            rec.js_seqs.append(js_seq)

    def must_not_be_stored(self, event: Any) -> None:
        """The worker is expected to refuse this event although JetStream acked it."""
        self.attempt(event).attempts -= 1
        self.attempts -= 1
        self.sent[(event.tenant, event.id)].state = REJECTED

    def expect_rejection(self, tenant: str | None, event_id: str | None, code: str) -> None:
        """An injected fault the worker must record as exactly one rejection row."""
        self.rejections[(tenant, event_id, code)] += 1

    def keys(self, state: str) -> set[tuple[str, str]]:
        return {k for k, r in self.sent.items() if r.state == state}

    def merge(self, other: ProducerLedger) -> None:
        for key, rec in other.sent.items():
            mine = self.sent.setdefault(key, Sent(rec.tenant, rec.id, rec.content_hash))
            assert mine.content_hash == rec.content_hash, f"{key} sent with two contents"
            mine.attempts += rec.attempts
            mine.js_seqs += rec.js_seqs
            self.settle(mine, rec.state)
        self.rejections.update(other.rejections)
        self.attempts += other.attempts
        self.errors.update(other.errors)

    def to_json(self) -> str:
        return json.dumps({
            "sent": [[r.tenant, r.id, r.content_hash, r.state, r.attempts, r.js_seqs]
                     for r in self.sent.values()],
            "rejections": [[t, i, c, n] for (t, i, c), n in self.rejections.items()],
            "attempts": self.attempts,
            "errors": dict(self.errors),
        })

    @classmethod
    def from_json(cls, text: str) -> ProducerLedger:
        raw = json.loads(text)
        out = cls()
        for tenant, id_, h, state, attempts, seqs in raw["sent"]:
            out.sent[(tenant, id_)] = Sent(tenant, id_, h, state, attempts, list(seqs))
        for tenant, id_, code, n in raw["rejections"]:
            out.rejections[(tenant, id_, code)] += n
        out.attempts = raw["attempts"]
        out.errors.update(raw["errors"])
        return out


async def append_definitely(
    client: Any,
    events: Any,
    ledger: ProducerLedger,
    *,
    deadline: float,
    wait: bool = False,
    pause: float = 0.2,
) -> str:
    """Append one event (or a list, as one atomic batch) until the bus gives a definite
    answer or `deadline` (time.monotonic()) passes, always resending the same event: the
    retry a well-behaved producer makes. Records every attempt; returns the final state.

    With `wait=True` a rejection by the worker is recorded as one expected rejection and
    returned as "rejected:<code>".
    """
    import nats.errors

    from jetledger.schemas.errors import (
        LedgerTimeout,
        OutcomeUnknown,
        RejectedError,
        Unavailable,
    )

    batch = isinstance(events, list)
    recs = [ledger.attempt(e) for e in (events if batch else [events])]
    for _rec in recs[1:]:
        ledger.attempts -= 1  # a batch is one attempt
    while True:
        state = UNKNOWN
        try:
            if batch:
                results = await client.append_batch(events, wait=wait)
            else:
                results = [await client.append(events, wait=wait)]
        except OutcomeUnknown as exc:
            ledger.errors[type(exc).__name__] += 1
        except LedgerTimeout as exc:
            # Only raised after JetStream confirmed the publish (the worker is late).
            ledger.errors[type(exc).__name__] += 1
            for rec in recs:
                ledger.settle(rec, ACKED)
            return ACKED
        except RejectedError as exc:
            # A conflict leaves the first content stored (its record stands); any other
            # rejection means none of these events may be stored.
            if exc.code != "conflict":
                for rec in recs:
                    ledger.settle(rec, REJECTED)
            ledger.expect_rejection(recs[0].tenant, exc.event_id or recs[0].id, exc.code)
            return f"rejected:{exc.code}"
        except Unavailable as exc:
            ledger.errors[type(exc).__name__] += 1
            # Without wait, Unavailable means nobody stored it; with wait it may come from
            # the worker query after JetStream confirmed: then it is not definite.
            state = UNKNOWN if wait else REFUSED
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            # A raw transport error leaking through the client: not definite.
            ledger.errors[f"raw {type(exc).__name__}"] += 1
        else:
            for rec, res in zip(recs, results, strict=True):
                ledger.settle(rec, ACKED, res.js_seq)
            return ACKED
        for rec in recs:
            ledger.settle(rec, state)
        if time.monotonic() >= deadline:
            return recs[0].state
        ledger.attempts += 1
        for rec in recs:
            rec.attempts += 1
        await asyncio.sleep(pause)


TENANTS = ("acme", "globex", "initech")


def make_event(i: int, *, tag: str = "e", tenants: Sequence[str] = TENANTS,
               streams: int = 5, pad: int = 100) -> Any:
    """Event number i of a run: round robin over tenants and streams, a stable id."""
    from jetledger.schemas import new_event

    tenant = tenants[i % len(tenants)]
    return new_event(tenant=tenant, stream=f"run-{i % streams}", kind="tick",
                     id=f"{tag}{i:07d}", data={"i": i, "pad": "x" * pad})


async def publish_events(js: Any, first: int, n: int,
                         headers: dict[str, str] | None = None) -> None:
    """Publish events `first`..`first + n - 1` (`make_event`) straight to JetStream, one
    message each, as a producer on the default prefix would."""
    from jetledger.schemas import CONTENT_TYPE, MSGPACK, Subjects, encode

    subjects = Subjects("jetledger")
    for i in range(first, first + n):
        event = make_event(i)
        await js.publish(subjects.event(event.tenant, event.kind), encode(event),
                         headers={CONTENT_TYPE: MSGPACK, **(headers or {})})


async def started_puller(url: str) -> tuple[Any, Any]:
    """A connection and a started `BatchPuller` on the worker's durable consumer (created
    from sequence 1 on a provisioned stream). Close the connection."""
    import nats

    from jetledger.worker import WorkerConfig
    from jetledger.worker.jetstream import BatchPuller, consumer_config

    await provision(url)
    nc = await nats.connect(url)
    await nc.jetstream().add_consumer(STREAM, consumer_config(WorkerConfig(), 1))
    puller = BatchPuller(nc, STREAM, CONSUMER)
    await puller.start()
    return nc, puller


async def produce(
    client: Any,
    ledger: ProducerLedger,
    stop: asyncio.Event,
    *,
    limit: int,
    tag: str = "e",
    start: int = 0,
    interval: float = 0.0,
    retry_for: float = 30.0,
    tenants: Sequence[str] = TENANTS,
) -> int:
    """A continuous producer: event after event until `stop` or `limit`, each retried with
    the same bytes until definite (at most `retry_for` s). Returns how many it sent."""
    sent = 0
    for i in range(start, start + limit):
        if stop.is_set():
            break
        await append_definitely(client, make_event(i, tag=tag, tenants=tenants), ledger,
                                deadline=time.monotonic() + retry_for, pause=0.1)
        sent += 1
        if interval:
            await asyncio.sleep(interval)
    return sent


async def ledger_client(url: str | Sequence[str], *, timeout: float = 1.0,
                        attempts: int = 3) -> Any:
    """A LedgerClient on a connection that reconnects quickly and never gives up, so the
    producer outlives the faults a test injects."""
    from jetledger.client import LedgerClient

    nc = await admin_connect(url)
    return LedgerClient(nc, timeout=timeout, publish_attempts=attempts, own_connection=True)


def count_events(db_path: Path) -> int:
    if not db_path.exists():
        return 0
    try:
        return int(query(db_path, "SELECT count(*) FROM events")[0][0])
    except sqlite3.OperationalError:
        return 0


async def wait_for_count(db_path: Path, n: int, timeout: float = 20.0) -> int:
    """Wait until the ledger holds at least n events; returns the count (maybe fewer)."""
    end = time.monotonic() + timeout
    count = count_events(db_path)
    while count < n and time.monotonic() < end:
        await asyncio.sleep(0.05)
        count = count_events(db_path)
    return count


# --- the JetStream side ----------------------------------------------------------------------


@dataclass
class StreamMessage:
    seq: int
    subject: str
    data: bytes
    headers: dict[str, str] | None


async def stream_messages(url: str | Sequence[str], stream: str = STREAM) -> int:
    """How many messages the JetStream stream holds."""
    nc = await admin_connect(url)
    try:
        return int((await nc.jetstream().stream_info(stream)).state.messages)
    finally:
        await nc.close()


async def read_stream(url: str | Sequence[str], stream: str = STREAM,
                      timeout: float = 60.0) -> list[StreamMessage]:
    """Every message in the JetStream stream, in order, read with throwaway consumers (a new
    one from where the last stopped if a cluster is still settling)."""
    import nats.errors
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    out: list[StreamMessage] = []
    end = time.monotonic() + timeout
    nc = await admin_connect(url)
    try:
        js = nc.jetstream(timeout=5)
        last = -1
        while time.monotonic() < end:
            name = f"audit-{os.getpid()}-{time.monotonic_ns()}"
            start = out[-1].seq + 1 if out else 1
            try:
                if last < 0:
                    last = (await js.stream_info(stream)).state.last_seq
                if start > last:
                    return out
                await js.add_consumer(stream, ConsumerConfig(
                    name=name, ack_policy=AckPolicy.NONE, opt_start_seq=start,
                    deliver_policy=DeliverPolicy.BY_START_SEQUENCE, inactive_threshold=30.0,
                    mem_storage=True, num_replicas=1,
                ))
                sub = await js.pull_subscribe_bind(name, stream)
                try:
                    while (not out or out[-1].seq < last) and time.monotonic() < end:
                        try:
                            msgs = await sub.fetch(1000, timeout=1.0)
                        except TimeoutError:
                            continue
                        out.extend(StreamMessage(m.metadata.sequence.stream, m.subject,
                                                 m.data, m.headers) for m in msgs)
                finally:
                    await sub.unsubscribe()
            except nats.errors.Error:  # no responders, no leader yet, API timeout: again
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):  # it expires on its own anyway
                    await js.delete_consumer(stream, name)
        raise AssertionError(f"could not read the stream within {timeout}s "
                             f"({len(out)} of {last} messages)")
    finally:
        await nc.close()


async def wait_drained(
    url: str | Sequence[str], db_path: Path, *, timeout: float = 60.0, stream: str = STREAM,
    consumer: str = CONSUMER,
) -> dict[str, Any]:
    """Wait until the ledger committed the stream's last message and the worker's consumer
    has nothing pending or unacked; returns the consumer's figures. AssertionError if not."""
    nc = await admin_connect(url)
    try:
        js = nc.jetstream(timeout=2)
        end = time.monotonic() + timeout
        seen: dict[str, Any] = {}
        while True:
            try:
                last = (await js.stream_info(stream)).state.last_seq
                info = await js.consumer_info(stream, consumer)
                committed = 0
                if db_path.exists():
                    rows = query(db_path, "SELECT max(last_js_seq) FROM ingest_state")
                    committed = int(rows[0][0] or 0)
                seen = {"stream_last_seq": last, "ledger_last_js_seq": committed,
                        "num_pending": info.num_pending or 0,
                        "num_ack_pending": info.num_ack_pending or 0,
                        "num_redelivered": info.num_redelivered or 0}
                if committed >= last and not seen["num_pending"] \
                        and not seen["num_ack_pending"]:
                    return seen
            except Exception as exc:  # noqa: BLE001 - servers or the ledger may still heal
                seen["error"] = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > end:
                raise AssertionError(f"not drained within {timeout}s: {seen}")
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


# --- the verdict -----------------------------------------------------------------------------


@dataclass
class Verdict:
    """The checker's figures; `assert_clean()` fails the test unless everything holds."""

    events: int = 0  # rows in the ledger
    acked: int = 0  # events the producers were told JetStream stored
    maybe: int = 0  # events whose publish outcome stayed unknown to the producer
    maybe_stored: int = 0
    js_messages: int = 0
    rejections: int = 0
    lost: list[tuple[str, str]] = field(default_factory=list)
    duplicated: int = 0
    wrong_content: list[tuple[str, str]] = field(default_factory=list)
    unexpected: list[tuple[str, str]] = field(default_factory=list)
    refused_but_stored: list[tuple[str, str]] = field(default_factory=list)
    rejection_diff: dict[str, Any] = field(default_factory=dict)
    js_unaccounted: list[int] = field(default_factory=list)
    js_gaps: list[int] = field(default_factory=list)
    out_of_order: list[tuple[str, str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        out = []
        for name in ("lost", "wrong_content", "unexpected", "refused_but_stored",
                     "js_unaccounted", "js_gaps", "out_of_order"):
            items = getattr(self, name)
            if items:
                out.append(f"{name}: {len(items)} e.g. {items[:5]}")
        if self.duplicated:
            out.append(f"duplicated: {self.duplicated}")
        if self.rejection_diff:
            out.append(f"rejections differ from the injected ones: {self.rejection_diff}")
        return out + self.notes

    def assert_clean(self) -> Verdict:
        problems = self.failures()
        assert not problems, "ledger verdict FAILED:\n  " + "\n  ".join(problems)
        return self

    def summary(self) -> str:
        return (f"events={self.events} acked={self.acked} maybe={self.maybe}"
                f"(stored {self.maybe_stored}) js_messages={self.js_messages} "
                f"rejections={self.rejections} lost={len(self.lost)} "
                f"duplicated={self.duplicated} wrong={len(self.wrong_content)} "
                f"verdict={'ok' if not self.failures() else 'FAILED'}")


def verify(
    db_path: Path,
    producers: ProducerLedger | None = None,
    *,
    stream_msgs: list[StreamMessage] | None = None,
    complete: bool = True,
) -> Verdict:
    """The shared checker. `check_ledger` invariants (asserted), then against the producers'
    ledger (lost, wrong content, unexpected, rejections exactly as injected) and, given the
    stream's messages, a full audit: JetStream seqs 1..N without gaps, every message stored
    (same content) or rejected, the ledger's recorded position at N.

    `complete`: the producers' ledger lists every event ever published, so a stored event it
    does not know is unexpected."""
    from jetledger.schemas import Subjects
    from jetledger.worker.ingest import decode_message

    report = check_ledger(db_path)
    v = Verdict(events=report.events, rejections=report.rejections)
    stored: dict[tuple[str, str], str] = {
        (t, i): bytes(h).hex()
        for t, i, h in query(db_path, "SELECT tenant, id, content_hash FROM named_events")
    }
    (dups,) = query(db_path, "SELECT count(*) - count(DISTINCT tenant || char(0) || id) "
                             "FROM named_events")[0]
    v.duplicated = int(dups)
    rejected = query(db_path, "SELECT js_seq, tenant, event_id, code FROM rejections")
    # Commit order is JetStream order: within a stream, seqs follow JetStream seqs.
    prev: tuple[str, str, int] | None = None
    for tenant, stream, seq, js_seq in query(
        db_path,
        "SELECT tenant, stream, seq, js_seq FROM named_events ORDER BY tenant, stream, seq",
    ):
        if prev is not None and prev[:2] == (tenant, stream) and js_seq < prev[2]:
            v.out_of_order.append((tenant, stream, seq))
        prev = (tenant, stream, js_seq)
    if producers is not None:
        for key, rec in producers.sent.items():
            if rec.state == ACKED:
                v.acked += 1
                if key not in stored:
                    v.lost.append(key)
            elif rec.state == UNKNOWN:
                v.maybe += 1
                v.maybe_stored += key in stored
            elif key in stored:
                v.refused_but_stored.append(key)  # refused or rejected, yet stored
            if key in stored and stored[key] != rec.content_hash:
                v.wrong_content.append(key)
        if complete:
            v.unexpected = [k for k in stored if k not in producers.sent]
        found = Counter((t, i, c) for _, t, i, c in rejected)
        if found != producers.rejections:
            v.rejection_diff = {
                "missing": dict(producers.rejections - found),
                "extra": dict(found - producers.rejections),
            }
    if stream_msgs is not None:
        v.js_messages = len(stream_msgs)
        seqs = [m.seq for m in stream_msgs]
        v.js_gaps = sorted(set(range(1, (seqs[-1] if seqs else 0) + 1)) - set(seqs))
        rejected_seqs = {r[0] for r in rejected}
        subjects = Subjects()
        for m in stream_msgs:
            if m.seq in rejected_seqs:
                continue
            dec = decode_message(subjects, m.subject, m.data, m.headers, m.seq)
            if dec.error is not None or not dec.events or any(
                stored.get((c.event.tenant, c.event.id)) != c.content_hash.hex()
                for c in dec.events
            ):
                v.js_unaccounted.append(m.seq)
        beyond = sorted(s for s in rejected_seqs if s not in set(seqs))
        if beyond:
            v.notes.append(f"rejections name JetStream seqs not in the stream: {beyond[:5]}")
        committed = query(db_path, "SELECT max(last_js_seq) FROM ingest_state")[0][0] or 0
        if seqs and committed != seqs[-1]:
            v.notes.append(f"ledger recorded JetStream seq {committed}, stream ends at "
                           f"{seqs[-1]}")
    return v


class WorkerProcess:
    """`jetledger worker` as a child process, killable at a chosen point (faults.py).

    `env` adds environment variables (e.g. JETLEDGER_FAULT_KIND); `log_path` puts the log
    elsewhere than the data dir (for storage faults on the data dir itself)."""

    def __init__(
        self,
        nats_url: str,
        data_dir: Path,
        *,
        crash_at: str | None = None,
        crash_after: int = 0,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.crash_at = crash_at
        self.crash_after = crash_after
        self.extra_args = extra_args
        self.env = env or {}
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = log_path if log_path is not None else data_dir / "worker.log"
        self.ready_line = ""

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in ("JETLEDGER_CRASH_AT", "JETLEDGER_CRASH_AFTER", "JETLEDGER_FAULT_KIND",
                     "JETLEDGER_COMMIT_DELAY"):
            env.pop(name, None)
        if self.crash_at:
            env["JETLEDGER_CRASH_AT"] = self.crash_at
            env["JETLEDGER_CRASH_AFTER"] = str(self.crash_after)
        env.update(self.env)
        cmd = [sys.executable, "-m", "jetledger.client.cli", "worker",
               "--nats-url", self.nats_url, "--data-dir", str(self.data_dir),
               *self.extra_args]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                env=env,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "ready" in line:
                self.ready_line = line.strip()
                return
            if not line and self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"worker did not become ready; log:\n{self.log_path.read_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        """The end of the worker's log, for assertion messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_count(self, pattern: str) -> int:
        """How many log lines match the regular expression `pattern`."""
        rx = re.compile(pattern)
        return sum(1 for line in self.log_text().splitlines() if rx.search(line))

    def stats(self) -> dict[str, int]:
        """The ingest counters the worker logs when it stops ("ingest stats: k=v ...")."""
        found: dict[str, int] = {}
        for line in self.log_text().splitlines():
            if "ingest stats:" in line:
                found = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", line)}
        return found

    def rss_kb(self, field_name: str = "VmHWM") -> int:
        """Peak (VmHWM) or current (VmRSS) resident memory of the worker, in KiB."""
        text = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
        assert match, text
        return int(match.group(1))

    @property
    def probes_url(self) -> str:
        """Base URL of /healthz and /readyz (start the worker with --http-port 0)."""
        match = re.search(r"probes on (http://\S+)", self.ready_line)
        assert match, f"no probes in the ready line: {self.ready_line!r}"
        return match.group(1).rstrip(";,")

    def readyz(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, JSON body) of /readyz."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.probes_url + "/readyz", timeout=5) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            with err:
                return err.code, json.loads(err.read() or b"{}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


# --- producer processes (case 22) -------------------------------------------------------------


async def _producer_process(url: str, proc_id: int, tasks: int, events: int,
                            tenants: Sequence[str]) -> ProducerLedger:
    """One producer process: `tasks` concurrent tasks over `tenants`, mixing plain appends,
    appends that wait for the worker, atomic batches, re-appends (duplicates), plus two
    tasks racing for the first seq of one stream with expected_seq=0."""
    from jetledger.client import LedgerClient
    from jetledger.schemas import new_event

    ledger = ProducerLedger()
    deadline = time.monotonic() + 120

    async def task(t: int, client: Any) -> None:
        tenant = tenants[(proc_id * tasks + t) % len(tenants)]
        mode = t % 4
        i = 0
        while i < events:
            def ev(k: int) -> Any:
                return new_event(tenant=tenant, stream=f"s{t % 3}", kind="load",
                                 id=f"p{proc_id}-t{t}-{k}",
                                 data={"p": proc_id, "t": t, "k": k, "pad": "y" * 64})
            if mode == 2:
                batch = [ev(k) for k in range(i, min(i + 5, events))]
                await append_definitely(client, batch, ledger, deadline=deadline,
                                        wait=i % 10 == 0)
                i += len(batch)
                continue
            event = ev(i)
            await append_definitely(client, event, ledger, deadline=deadline, wait=mode == 1)
            if mode == 3:  # the same event again: stored once, told "duplicate"
                await append_definitely(client, event, ledger, deadline=deadline, wait=True)
            i += 1

    async def racer(r: int, client: Any) -> None:
        event = new_event(tenant="race", stream=f"first-{proc_id}", kind="load",
                          id=f"p{proc_id}-racer{r}", data={"r": r}, expected_seq=0)
        await append_definitely(client, event, ledger, deadline=deadline, wait=True)

    async with await LedgerClient.connect(url, timeout=10.0) as client, \
            asyncio.TaskGroup() as tg:
        for t in range(tasks):
            tg.create_task(task(t, client))
        for r in range(2):
            tg.create_task(racer(r, client))
    return ledger


def run_producers(url: str, out_dir: Path, *, processes: int, tasks: int, events: int,
                  tenants: Sequence[str], timeout: float = 120.0) -> ProducerLedger:
    """Run `processes` producer processes at once; returns their merged ledgers."""
    out_dir.mkdir(parents=True, exist_ok=True)
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    with contextlib.ExitStack() as logs:
        try:
            for p in range(processes):
                out = out_dir / f"producer-{p}.json"
                log = logs.enter_context(open(out_dir / f"producer-{p}.log", "wb"))
                procs.append((subprocess.Popen(
                    [sys.executable, __file__, "produce", "--url", url, "--out", str(out),
                     "--proc-id", str(p), "--tasks", str(tasks), "--events", str(events),
                     "--tenants", ",".join(tenants)],
                    stdout=subprocess.DEVNULL, stderr=log,
                ), out))
            merged = ProducerLedger()
            end = time.monotonic() + timeout
            for proc, out in procs:
                code = proc.wait(max(1.0, end - time.monotonic()))
                assert code == 0, (out_dir / f"{out.stem}.log").read_text()
                merged.merge(ProducerLedger.from_json(out.read_text()))
            return merged
        finally:
            for proc, _ in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="jetledger test producer process")
    sub = parser.add_subparsers(dest="cmd", required=True)
    prod = sub.add_parser("produce")
    prod.add_argument("--url", required=True)
    prod.add_argument("--out", type=Path, required=True)
    prod.add_argument("--proc-id", type=int, required=True)
    prod.add_argument("--tasks", type=int, required=True)
    prod.add_argument("--events", type=int, required=True)
    prod.add_argument("--tenants", required=True)
    args = parser.parse_args(argv)
    ledger = asyncio.run(_producer_process(args.url, args.proc_id, args.tasks, args.events,
                                           args.tenants.split(",")))
    args.out.write_text(ledger.to_json())
    return 0


if __name__ == "__main__":
    sys.exit(_main())
