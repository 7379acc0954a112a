"""The ingest loop: fetch a batch, commit it in one transaction, then ack it, then notify.

Never ack before commit. A batch the database refuses is held, not nak'd: it is retried in
place with a growing delay (extending AckWait meanwhile), so events are committed in
JetStream order and a transient fault never reorders or skips anything.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from jetledger.schemas import HEADER_NOTIFY, CommitNotice, Outcome, encode

from .config import WorkerConfig
from .faults import crash_point
from .ingest import Decoded, decode_message
from .jetstream import ensure_consumer
from .writer import LedgerWriter, is_transient

__all__ = ["Ingestor", "IngestStats"]

log = logging.getLogger("jetledger.worker")


class IngestStats:
    """Counters a health check or test can read."""

    def __init__(self) -> None:
        self.batches = 0
        self.messages = 0
        self.inserted = 0
        self.duplicate = 0
        self.conflict = 0
        self.rejected = 0
        self.storage_retries = 0
        self.last_error: str | None = None

    def count(self, outcomes: Sequence[Sequence[Outcome]]) -> None:
        self.batches += 1
        self.messages += len(outcomes)
        for outs in outcomes:
            for out in outs:
                setattr(self, out.outcome, getattr(self, out.outcome) + 1)


class Ingestor:
    def __init__(
        self, nc: NATS, js: JetStreamContext, writer: LedgerWriter, cfg: WorkerConfig
    ) -> None:
        self._nc = nc
        self._js = js
        self._writer = writer
        self._cfg = cfg
        self._subjects = cfg.subjects
        self.stats = IngestStats()
        self._next_floor_at = 0.0

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        last, floor = await self._writer.ingest_state()
        await ensure_consumer(self._js, self._cfg, ledger_floor=floor, ledger_last=last)
        return await self._js.pull_subscribe_bind(
            self._cfg.consumer_name, self._cfg.stream_name
        )

    async def run(self, stop: asyncio.Event) -> None:
        sub = await self._subscribe()
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(self._cfg.batch_size, timeout=self._cfg.fetch_timeout)
                except TimeoutError:  # nats-py raises its own or asyncio's: an empty batch
                    await self._maybe_record_floor()
                    continue
                except (APIError, NoRespondersError) as exc:
                    # The consumer was deleted or the server is restarting: rebuild it from
                    # the ledger's own record and go on.
                    log.warning("fetch failed (%s); re-establishing the consumer", exc)
                    await asyncio.sleep(0.5)
                    await sub.unsubscribe()
                    sub = await self._resubscribe(stop)
                    continue
                except ConnectionClosedError:
                    raise
                if not msgs:
                    continue
                outcomes = await self._commit(msgs, stop)
                if outcomes is None:
                    return  # stopping while the database refused: leave the batch unacked
                for msg in msgs:
                    await msg.ack()
                crash_point("after_ack")
                await self._nc.flush()
                await self._notify(msgs, outcomes)
                await self._maybe_record_floor()
        finally:
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - closing on the way out
                pass

    async def _resubscribe(self, stop: asyncio.Event) -> JetStreamContext.PullSubscription:
        delay = 0.5
        while True:
            try:
                return await self._subscribe()
            except (APIError, TimeoutError, NoRespondersError) as exc:
                if stop.is_set():
                    raise
                log.warning("cannot set up the consumer yet (%s); retrying", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._cfg.max_retry_delay)

    def _decode(self, msg: Msg) -> Decoded:
        return decode_message(
            self._subjects, msg.subject, msg.data, msg.headers,
            msg.metadata.sequence.stream, strict=self._cfg.strict,
        )

    async def _commit(
        self, msgs: list[Msg], stop: asyncio.Event
    ) -> list[list[Outcome]] | None:
        batch = [self._decode(m) for m in msgs]
        delay = 0.05
        last_progress = time.monotonic()
        while True:
            crash_point("before_commit")
            try:
                outcomes = await self._writer.commit(batch)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.stats.storage_retries += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.error("database refused the batch (%s); nothing committed, retrying in "
                          "%.2fs", exc, delay)
                if stop.is_set():
                    return None
                if time.monotonic() - last_progress > self._cfg.ack_wait / 3:
                    for msg in msgs:  # keep the batch ours while we wait
                        await msg.in_progress()
                    last_progress = time.monotonic()
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                    return None
                except TimeoutError:
                    pass
                delay = min(delay * 2, self._cfg.max_retry_delay)
                continue
            crash_point("after_commit")
            self.stats.last_error = None
            self.stats.count(outcomes)
            return outcomes

    async def _notify(self, msgs: list[Msg], outcomes: list[list[Outcome]]) -> None:
        """Tell waiting producers what became of their events, and live readers which
        positions each tenant gained (best effort both: either can ask the ledger)."""
        spans: dict[str, list[int]] = {}
        try:
            for msg, outs in zip(msgs, outcomes, strict=True):
                inbox = msg.headers.get(HEADER_NOTIFY) if msg.headers else None
                if inbox:
                    await self._nc.publish(inbox, encode(outs))
                tenant = self._subjects.parse_ingest(msg.subject).tenant if any(
                    o.outcome == "inserted" for o in outs) else None
                for out in outs:
                    if tenant is not None and out.outcome == "inserted" and out.position:
                        span = spans.setdefault(tenant, [out.position, out.position, 0])
                        span[1] = out.position
                        span[2] += 1
            for tenant, (first, last, count) in spans.items():
                notice = CommitNotice(tenant=tenant, first_position=first, last_position=last,
                                      count=count)
                await self._nc.publish(self._subjects.live(tenant), encode(notice))
        except Exception as exc:  # noqa: BLE001 - a lost notice is recoverable
            log.warning("could not publish commit notices: %s", exc)

    async def _maybe_record_floor(self) -> None:
        now = time.monotonic()
        if now < self._next_floor_at:
            return
        self._next_floor_at = now + self._cfg.floor_interval
        try:
            info = await self._js.consumer_info(self._cfg.stream_name, self._cfg.consumer_name)
        except Exception as exc:  # noqa: BLE001 - the floor is an optimisation for recovery
            log.debug("consumer info unavailable: %s", exc)
            return
        if info.ack_floor is not None:
            self._writer.note_ack_floor(info.ack_floor.stream_seq)
