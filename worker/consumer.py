"""The ingest loop: fetch a batch, commit it in one transaction, then notify, then ack it.

Sequential on purpose: fetching the next batch while one commits (in the writer's thread) was
measured 0.86x as fast on 2 cores shared with nats-server (no idle core to overlap on; more GIL
hand-offs), so batches are fetched, committed and acked one at a time.

Never ack before commit. A batch the database refuses (locked, full, read-only, I/O) is held,
not nak'd: it is retried in place with a growing delay (extending AckWait meanwhile), so
events are committed in JetStream order and a transient fault never reorders or skips
anything. A batch that fails with anything else (a bug handling some message) is bisected
until the failing message is alone; a message that keeps failing becomes a rejection with
code "internal" after `POISON_ATTEMPTS` tries, so one bad message never holds up the others
and is never acked without a row.

Transport faults (a restarting or frozen server, a reconnect, a deleted consumer) never end
the loop: acks of a committed batch are best effort (a lost ack is a redelivery, and a
redelivery is a no-op), fetch errors re-establish the consumer from the ledger's own record,
and so does every reconnect, so that deliveries lost in flight come back at once and in order.
Only a connection closed for good ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import ConnectionClosedError, NoRespondersError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import APIError

from jetledger.schemas import HEADER_NOTIFY, CommitNotice, Outcome, encode
from jetledger.schemas.errors import InternalError, InvalidToken

from .config import WorkerConfig
from .faults import commit_delay, crash_point
from .ingest import Decoded, decode_message, peek_event_id
from .jetstream import BatchPuller, ensure_consumer
from .writer import LedgerWriter, is_transient

__all__ = ["ACK_CONFIRM_TIMEOUT", "POISON_ATTEMPTS", "IngestStats", "Ingestor"]

log = logging.getLogger("jetledger.worker")
T = TypeVar("T")

#: Tries of a message that fails with a non-storage error before it becomes a rejection.
POISON_ATTEMPTS = 3
#: Seconds to wait for the server to confirm a batch's acks; on timeout they are sent again
#: after the next reconnect (and a redelivery would be a no-op anyway). Short, so an
#: unresponsive server never stalls ingest for long.
ACK_CONFIRM_TIMEOUT = 2.0


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
        self.redelivered = 0  # messages JetStream delivered more than once
        self.resubscribes = 0  # consumer re-established after a fetch error
        self.poisoned = 0  # messages stored as "internal" rejections after repeated failures
        self.handler_failures = 0  # non-storage failures of a batch or a message
        self.ack_failures = 0  # batches whose acks could not be confirmed (redelivered later)
        self.last_error: str | None = None

    def line(self) -> str:
        """One log line of counters (fault tests read it from a worker subprocess's log)."""
        names = ("batches", "messages", "inserted", "duplicate", "conflict", "rejected",
                 "storage_retries", "redelivered", "resubscribes", "poisoned",
                 "handler_failures", "ack_failures")
        return " ".join(f"{n}={getattr(self, n)}" for n in names)

    def count(self, outcomes: Sequence[Sequence[Outcome]]) -> None:
        self.batches += 1
        self.messages += len(outcomes)
        for outs in outcomes:
            for out in outs:
                setattr(self, out.outcome, getattr(self, out.outcome) + 1)


class _Stopped(Exception):
    """Asked to stop while waiting out a fault (database or NATS): leave the batch unacked."""


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
        self._unconfirmed: list[Msg] = []  # committed, acks not confirmed by the server
        # The last batch's acks and the confirmation of them that is still out.
        self._confirming: tuple[asyncio.Future[None], list[Msg]] | None = None

    async def _subscribe(self) -> JetStreamContext.PullSubscription:
        last, floor = await self._writer.ingest_state()
        await ensure_consumer(self._js, self._cfg, ledger_floor=floor, ledger_last=last)
        return await self._js.pull_subscribe_bind(
            self._cfg.consumer_name, self._cfg.stream_name
        )

    async def _open_puller(self) -> BatchPuller:
        # `_subscribe` stays the step that establishes the consumer (the app overrides it to
        # bind without provisioning); its subscription is not used to receive: BatchPuller is.
        sub = await self._subscribe()
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        puller = BatchPuller(self._nc, self._cfg.stream_name, self._cfg.consumer_name)
        await puller.start()
        return puller

    async def run(self, stop: asyncio.Event) -> None:
        # Retried like any later re-subscription: a server that is restarting or frozen
        # right now must not end the worker before it has consumed anything.
        try:
            sub = await self._resubscribe(stop)
        except _Stopped:
            return
        reconnects = self._nc.stats["reconnects"]
        try:
            while not stop.is_set():
                if self._nc.stats["reconnects"] != reconnects:
                    # Deliveries in flight when the connection dropped may never have reached
                    # us; left alone they would come back only after AckWait, behind newer
                    # events (out of JetStream order). Re-establish the consumer from its ack
                    # floor, as at start, so they come back now and in order.
                    reconnects = self._nc.stats["reconnects"]
                    log.info("reconnected to NATS: re-establishing the consumer")
                    await self._settle()
                    await self._reack()
                    sub = await self._replace(sub, stop)
                    continue
                try:
                    msgs = await sub.fetch(self._cfg.batch_size, timeout=self._cfg.fetch_timeout)
                except ConnectionClosedError:
                    raise  # closed for good (reconnects are unlimited): let a supervisor act
                except (APIError, NoRespondersError) as exc:
                    # The consumer was deleted or the server is restarting: rebuild it from
                    # the ledger's own record and go on.
                    log.warning("fetch failed (%s); re-establishing the consumer", exc)
                    sub = await self._replace(sub, stop)
                    continue
                except NatsError as exc:
                    # Reconnecting, stale connection, slow consumer: wait and fetch again.
                    log.warning("fetch failed (%s: %s); retrying", type(exc).__name__, exc)
                    await _sleep(stop, 0.5)
                    continue
                if not msgs:
                    await self._maybe_record_floor()
                    continue
                if self._nc.stats["reconnects"] != reconnects:
                    # Fetched across a reconnect: deliveries in flight at the drop may be
                    # missing from this batch, and committing it would put later events ahead
                    # of them. Hand it back; the loop re-establishes the consumer first.
                    await self._nak(msgs)
                    continue
                self.stats.redelivered += sum(
                    1 for m in msgs if m.metadata.num_delivered > 1)
                outcomes = await self._commit(msgs, stop)
                if not stop.is_set():
                    # The next pull request travels while this batch is acked and notified:
                    # the fetch round trip leaves the cycle, and a shorter cycle means
                    # smaller batches and shorter commits at the same load (latency).
                    with contextlib.suppress(NatsError):  # the next fetch asks again
                        await sub.prefetch(self._cfg.batch_size, self._cfg.fetch_timeout)
                # Committed, so the outcomes are final: producers waiting on them need not
                # also wait for the acks' confirmation round trip.
                await self._notify(msgs, outcomes)
                await self._ack(msgs)
                await self._maybe_record_floor()
        except _Stopped:
            pass  # stopping while the database refused or NATS was away: nothing acked
        finally:
            with contextlib.suppress(Exception):  # best effort, as every ack
                await self._settle()
            log.info("ingest stats: %s", self.stats.line())
            await self._nak(await sub.close())

    async def _nak(self, msgs: list[Msg]) -> None:
        """Hand back messages received but never fetched (best effort): nak'd messages are
        delivered again before any newer one, so they come back at once and in order even
        where the consumer is bound rather than re-created; unnak'd, after AckWait."""
        with contextlib.suppress(Exception):  # the connection may be gone
            for msg in msgs:
                await msg.nak()

    async def _replace(self, sub: BatchPuller, stop: asyncio.Event) -> BatchPuller:
        await _sleep(stop, 0.5)
        await self._nak(await sub.close())
        self.stats.resubscribes += 1
        return await self._resubscribe(stop)

    async def _resubscribe(self, stop: asyncio.Event) -> BatchPuller:
        delay = 0.5
        while True:
            try:
                return await self._open_puller()
            except ConnectionClosedError:
                raise
            except (NatsError, TimeoutError) as exc:  # includes APIError, NoRespondersError
                if stop.is_set():
                    raise _Stopped from exc
                log.warning("cannot set up the consumer yet (%s); retrying", exc)
                if await _sleep(stop, delay):
                    raise _Stopped from exc
                delay = min(delay * 2, self._cfg.max_retry_delay)

    async def _ack(self, msgs: list[Msg]) -> None:
        """Ack a committed batch. Best effort: an ack lost to a reconnect only means the
        batch comes back, and committing it again is a no-op. The server's confirmation is
        not waited for here but when the next batch is acked (`_settle`): its round trip
        was part of every cycle, so of every event's latency, and of the batch size."""
        await self._settle()
        try:
            for msg in msgs:
                await msg.ack()
            crash_point("after_ack")
        except ConnectionClosedError:
            raise
        except (NatsError, TimeoutError) as exc:
            self._ack_failed(msgs, exc)
            return
        self._confirming = (asyncio.ensure_future(self._confirm(msgs[-1])), msgs)

    async def _settle(self) -> None:
        """Wait for the confirmation of the last batch's acks, if one is out."""
        if self._confirming is None:
            return
        confirming, msgs = self._confirming
        self._confirming = None
        try:
            await confirming
        except ConnectionClosedError:
            raise
        except (NatsError, TimeoutError) as exc:
            self._ack_failed(msgs, exc)
            return
        # Same connection, processed in order: acks held from earlier unconfirmed batches
        # are in too, so they need not be kept (nor sent again) any longer.
        self._unconfirmed.clear()

    def _ack_failed(self, msgs: list[Msg], exc: Exception) -> None:
        self.stats.ack_failures += 1
        self._unconfirmed.extend(msgs)
        log.warning("acks of a committed batch not confirmed (%s: %s); acking again "
                    "after reconnecting (a redelivery would be a no-op)",
                    type(exc).__name__, exc)

    async def _reack(self) -> None:
        """Ack again what was committed while the connection was failing (best effort)."""
        msgs, self._unconfirmed = self._unconfirmed, []
        if not msgs:
            return
        try:
            for msg in msgs:
                # Msg.ack() refuses a second call; an empty body on the reply is an ack.
                await self._nc.publish(msg.reply)
            await self._confirm(msgs[-1])
        except ConnectionClosedError:
            raise
        except (NatsError, TimeoutError) as exc:
            log.warning("acks not confirmed again (%s); those messages will be redelivered "
                        "and are then no-ops", exc)

    async def _write(self, msgs: list[Msg]) -> list[list[Outcome]]:
        """Decode (inside the retry: a bug there is isolated like one in the writer) and
        commit, in one transaction."""
        return await self._writer.commit([self._decode(m) for m in msgs])

    async def _confirm(self, last: Msg) -> None:
        """Wait until the server has processed the acks sent so far: it handles one
        connection's messages in order, so the reply to an ack-with-reply of the last message
        (an AckSync; acking it twice is harmless) means all of them are in. Not
        `nc.flush(timeout)`: in nats-py a flush that timed out leaves a cancelled future
        behind, and the late PONG then kills the client's read loop for good (a live
        connection that silently delivers nothing)."""
        await self._nc.request(last.reply, b"", timeout=ACK_CONFIRM_TIMEOUT)

    def _decode(self, msg: Msg) -> Decoded:
        return decode_message(
            self._subjects, msg.subject, msg.data, msg.headers,
            msg.metadata.sequence.stream, strict=self._cfg.strict,
        )

    async def _commit(self, msgs: list[Msg], stop: asyncio.Event) -> list[list[Outcome]]:
        """Commit the batch: whole, or (after a non-storage failure) split until the failing
        messages are alone."""
        try:
            outcomes = await self._hold(functools.partial(self._write, msgs), msgs, stop)
        except _Stopped:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug handling some message of the batch
            self.stats.handler_failures += 1
            log.error("a batch of %d messages failed (%s: %s); isolating the failing "
                      "message(s)", len(msgs), type(exc).__name__, exc)
            outcomes = await self._commit_split(msgs, stop)
        else:
            crash_point("after_commit")
        self.stats.last_error = None
        self.stats.count(outcomes)
        return outcomes

    async def _commit_split(self, msgs: list[Msg], stop: asyncio.Event) -> list[list[Outcome]]:
        """Bisect a failing run of messages, committing the halves in order: one poison
        message in a batch of n costs about 2·log2(n) small transactions, not n."""
        if len(msgs) == 1:
            return [await self._commit_isolated(msgs[0], stop)]
        mid = len(msgs) // 2
        out: list[list[Outcome]] = []
        for half in (msgs[:mid], msgs[mid:]):
            try:
                out += await self._hold(functools.partial(self._write, half), half, stop)
            except _Stopped:
                raise
            except Exception:  # noqa: BLE001 - the failing message is in this half
                out += await self._commit_split(half, stop)
        return out

    async def _commit_isolated(self, msg: Msg, stop: asyncio.Event) -> list[Outcome]:
        """Commit one message; after POISON_ATTEMPTS failures store it as a rejection."""
        seq = msg.metadata.sequence.stream
        failure: Exception | None = None
        for attempt in range(1, POISON_ATTEMPTS + 1):
            try:
                (outs,) = await self._hold(functools.partial(self._write, [msg]), [msg], stop)
                return outs
            except _Stopped:
                raise
            except Exception as exc:
                failure = exc
                self.stats.handler_failures += 1
                log.error("message at stream seq %d failed (try %d of %d): %s: %s", seq,
                          attempt, POISON_ATTEMPTS, type(exc).__name__, exc,
                          exc_info=attempt == POISON_ATTEMPTS)
                if attempt < POISON_ATTEMPTS:
                    await _sleep(stop, 0.05 * 2**attempt)
        assert failure is not None
        # The reason names only the exception type: it reaches producers; details are logged.
        error = InternalError(
            f"the worker failed to handle this message {POISON_ATTEMPTS} times "
            f"({type(failure).__name__}); it is kept here with its bytes, see the worker log")
        tenant: str | None
        try:
            tenant = self._subjects.parse_ingest(msg.subject).tenant
        except Exception:  # noqa: BLE001 - not even the subject parses: no tenant
            tenant = None
        rejection = Decoded(js_seq=seq, subject=msg.subject, raw=msg.data,
                            headers=msg.headers, tenant=tenant, error=error,
                            reject_id=peek_event_id(msg.subject, msg.data, msg.headers))
        (outs,) = await self._hold(lambda: self._writer.commit([rejection]), [msg], stop)
        self.stats.poisoned += 1
        log.error("message at stream seq %d stored as an 'internal' rejection after %d "
                  "failures", seq, POISON_ATTEMPTS)
        return outs

    async def _hold(
        self, attempt: Callable[[], Awaitable[T]], msgs: list[Msg], stop: asyncio.Event
    ) -> T:
        """Run `attempt` until it stops failing with a storage error, with a growing delay,
        keeping `msgs` ours meanwhile. Other errors propagate; `_Stopped` on stop."""
        delay = 0.05
        last_progress = time.monotonic()
        while True:
            crash_point("before_commit")
            await commit_delay()
            try:
                return await attempt()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self.stats.storage_retries += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.error("database refused the batch (%s); nothing committed, retrying in "
                          "%.2fs", exc, delay)
            if stop.is_set():
                raise _Stopped
            if time.monotonic() - last_progress > self._cfg.ack_wait / 3:
                await self._keep(msgs)
                last_progress = time.monotonic()
            if await _sleep(stop, delay):
                raise _Stopped
            delay = min(delay * 2, self._cfg.max_retry_delay)

    async def _keep(self, msgs: list[Msg]) -> None:
        """Extend AckWait of a held batch (best effort: if it lapses, the redelivery is a
        no-op once the batch is committed)."""
        try:
            for msg in msgs:
                await msg.in_progress()
        except ConnectionClosedError:
            raise
        except NatsError as exc:
            log.warning("could not extend AckWait of the held batch: %s", exc)

    async def _notify(self, msgs: list[Msg], outcomes: list[list[Outcome]]) -> None:
        """Tell waiting producers what became of their events, and live readers which
        positions each tenant gained (best effort both: either can ask the ledger)."""
        spans: dict[str, list[int]] = {}
        try:
            for msg, outs in zip(msgs, outcomes, strict=True):
                try:
                    tenant: str | None = self._subjects.parse_ingest(msg.subject).tenant
                except InvalidToken:
                    tenant = None
                inbox = msg.headers.get(HEADER_NOTIFY) if msg.headers else None
                if inbox and tenant is not None and _is_reply_inbox(inbox):
                    await self._nc.publish(inbox, encode(outs))
                elif inbox:
                    log.warning("not notifying %r: not a reply inbox", inbox)
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
            # Short timeout: a worker without consumer-info rights must not stall ingest.
            info = await self._js.consumer_info(self._cfg.stream_name, self._cfg.consumer_name,
                                                timeout=1)
        except Exception as exc:  # noqa: BLE001 - the floor is an optimisation for recovery
            log.debug("consumer info unavailable: %s", exc)
            return
        if info.ack_floor is not None:
            self._writer.note_ack_floor(info.ack_floor.stream_seq)


_INBOX_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")
_INBOX_PREFIX = re.compile(r"^_INBOX(_[A-Za-z0-9_-]+)?$")


def _is_reply_inbox(subject: str) -> bool:
    """Only a reply inbox (`_INBOX.…`, or `_INBOX_<prefix>.…` as per-tenant users have) may
    receive outcomes: the header is producer-chosen, and the worker may publish where
    producers may not (the consumer's ack subjects, live subjects), so anything else is
    refused. Inbox tokens are random, and which inboxes the worker may reach at all is
    the bus's permission (deploy/nats/auth.conf)."""
    head, _, rest = subject.partition(".")
    if not _INBOX_PREFIX.match(head) or not rest:
        return False
    return all(_INBOX_TOKEN.match(token) for token in rest.split("."))


async def _sleep(stop: asyncio.Event, seconds: float) -> bool:
    """Sleep, waking early on stop; True if stopping."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
        return True
    except TimeoutError:
        return stop.is_set()
