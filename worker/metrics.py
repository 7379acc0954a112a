"""Prometheus metrics of one worker, in a registry of its own (tests run several workers).

Counters of the ingest loop are read from `IngestStats` when Prometheus scrapes, so the loop
itself carries no metrics code; so are the writer's last WAL checkpoint report and its
failed checkpoints. Per-batch histograms come from `InstrumentedWriter` (a
`LedgerWriter` that times `commit`), query counts from the query service's `observe` hook
(every answer by op and outcome, "overloaded" and malformed requests included).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from jetledger.schemas import Outcome

from .consumer import IngestStats
from .ingest import Decoded
from .writer import LedgerWriter

__all__ = ["CONTENT_TYPE", "InstrumentedWriter", "WorkerMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST
_OUTCOMES = ("inserted", "duplicate", "conflict", "rejected")
_BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class WorkerMetrics:
    """The worker's metrics; `render()` is what `/metrics` serves."""

    def __init__(
        self,
        stats: Callable[[], IngestStats | None],
        ready: Callable[[], bool],
        writer: Callable[[], LedgerWriter | None] = lambda: None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, ready))
        self.registry.register(_WalCollector(writer))
        ProcessCollector(registry=self.registry)
        self.batch_size = Histogram(
            "jetledger_commit_batch_messages", "Messages committed per SQLite transaction",
            buckets=_BATCH_BUCKETS, registry=self.registry)
        self.commit_seconds = Histogram(
            "jetledger_commit_duration_seconds",
            "Time of one successful batch commit (the previous batch's checkpoint, then"
            " BEGIN IMMEDIATE .. COMMIT)",
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.queries = Counter(
            "jetledger_query_requests", "Query requests answered, by op and outcome",
            ["op", "outcome"], registry=self.registry)
        self.query_seconds = Histogram(
            "jetledger_query_duration_seconds", "Time to answer one query, by op", ["op"],
            buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.consumer_pending = Gauge(
            "jetledger_consumer_pending_messages",
            "Messages in the stream not yet delivered to the worker's consumer",
            registry=self.registry)
        self.consumer_ack_pending = Gauge(
            "jetledger_consumer_ack_pending_messages",
            "Messages delivered to the worker and not yet acked", registry=self.registry)
        info_age = Gauge(
            "jetledger_consumer_info_age_seconds",
            "Seconds since consumer info was last read (pending gauges are that old)",
            registry=self.registry)
        self._consumer_info_at: float | None = None
        info_age.set_function(self._info_age)

    def note_consumer(self, pending: int, ack_pending: int) -> None:
        self.consumer_pending.set(pending)
        self.consumer_ack_pending.set(ack_pending)
        self._consumer_info_at = time.monotonic()

    def _info_age(self) -> float:
        at = self._consumer_info_at
        return float("nan") if at is None else time.monotonic() - at

    def consumer_info_age(self) -> float | None:
        at = self._consumer_info_at
        return None if at is None else time.monotonic() - at

    def observe_commit(self, messages: int, seconds: float) -> None:
        self.batch_size.observe(messages)
        self.commit_seconds.observe(seconds)

    def observe_query(self, op: str, outcome: str, seconds: float) -> None:
        self.queries.labels(op=op, outcome=outcome).inc()
        self.query_seconds.labels(op=op).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StatsCollector(Collector):
    """Reads the ingest loop's counters at scrape time."""

    def __init__(self, stats: Callable[[], IngestStats | None], ready: Callable[[], bool]):
        self._stats = stats
        self._ready = ready

    def describe(self) -> list[Metric]:
        return []  # unchecked names: the collector's output depends on run state

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily("jetledger_ready", "1 when /readyz reports ready")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        yield ready
        stats = self._stats()
        if stats is None:
            return
        events = CounterMetricFamily(
            "jetledger_events", "Events consumed and committed, by outcome", labels=["outcome"])
        for outcome in _OUTCOMES:
            events.add_metric([outcome], getattr(stats, outcome))
        yield events
        yield CounterMetricFamily(
            "jetledger_messages_received",
            "JetStream messages committed (a batch message holds several events)",
            value=stats.messages)
        yield CounterMetricFamily(
            "jetledger_batches", "Batches committed (one SQLite transaction each)",
            value=stats.batches)
        yield CounterMetricFamily(
            "jetledger_storage_retries",
            "Batch commits the database refused (locked, full, read-only) and retried",
            value=stats.storage_retries)
        # Newer counters of IngestStats, exported when present.
        for attr, name, doc in (
            ("redelivered", "jetledger_messages_redelivered",
             "Messages JetStream delivered more than once"),
            ("resubscribes", "jetledger_consumer_resubscribes",
             "Times the ingest loop re-established its consumer"),
        ):
            value = getattr(stats, attr, None)
            if isinstance(value, int):
                yield CounterMetricFamily(name, doc, value=value)
        failing = GaugeMetricFamily(
            "jetledger_storage_failing", "1 while the last commit attempt failed")
        failing.add_metric([], 0.0 if stats.last_error is None else 1.0)
        yield failing


class _WalCollector(Collector):
    """Reads the writer's last WAL checkpoint report at scrape time."""

    def __init__(self, writer: Callable[[], LedgerWriter | None]):
        self._writer = writer

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        writer = self._writer()
        if writer is None:
            return
        yield CounterMetricFamily(
            "jetledger_wal_checkpoint_failures", "WAL checkpoints that failed (logged)",
            value=writer.checkpoint_failures)
        wal = writer.wal
        if wal is None:
            return
        yield GaugeMetricFamily(
            "jetledger_wal_frames", "Pages the WAL held at the last checkpoint",
            value=wal.frames)
        yield GaugeMetricFamily(
            "jetledger_wal_frames_not_checkpointed",
            "Pages the last checkpoint could not copy into the ledger file (a reader's"
            " snapshot still needs them; while above 0 the WAL cannot start over)",
            value=wal.frames - wal.checkpointed)


class InstrumentedWriter(LedgerWriter):
    """A `LedgerWriter` that feeds the batch-size and commit-latency histograms."""

    metrics: WorkerMetrics | None = None

    async def commit(self, batch: list[Decoded]) -> list[list[Outcome]]:
        started = time.perf_counter()
        outcomes = await super().commit(batch)
        if self.metrics is not None:
            self.metrics.observe_commit(len(batch), time.perf_counter() - started)
        return outcomes
