"""Create or update the JetStream stream and the worker's durable pull consumer.

The stream keeps every event until an operator decides otherwise: no age, count or size
limit by default, and `discard: new` so that if limits are ever set, producers get an error
instead of unread events being dropped. Deletes and purges are denied.

The consumer is only a cursor: the ledger file is the truth about what is stored. At start
the worker re-creates the consumer from the consumer's ack floor (or, if it is gone, from the
floor recorded in the ledger) so a crashed batch is redelivered at once and in order, instead
of after AckWait and behind newer events.

`BatchPuller` receives the consumer's messages; it replaces nats-py's `PullSubscription.fetch`,
which costs a task, a `wait_for` and a uuid per message (the worker's largest per-event cost).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.client import DEFAULT_JS_SUB_PENDING_BYTES_LIMIT, DEFAULT_JS_SUB_PENDING_MSGS_LIMIT
from nats.js.errors import APIError, BadRequestError, NotFoundError

from .config import WorkerConfig

__all__ = ["BatchPuller", "consumer_config", "ensure_consumer", "ensure_stream",
           "stream_config"]

log = logging.getLogger("jetledger.worker")

#: JetStream's Nats-Msg-Id dedupe is stream-wide and keyed on a producer-chosen header, so a
#: producer could suppress another tenant's event with it. jetledger never relies on it
#: (idempotence is (tenant, id) in SQLite) and shrinks the window to the minimum, which makes
#: the header close to inert.
DUPLICATE_WINDOW_S = 0.1  # the server minimum
#: Never give up on an event: a small MaxDeliver turns a long outage into silent loss.
MAX_DELIVER_UNLIMITED = -1


def stream_config(cfg: WorkerConfig, max_msg_size: int | None = None) -> StreamConfig:
    return StreamConfig(
        name=cfg.stream_name,
        description="jetledger events (append-only; the ledger can be rebuilt from it)",
        subjects=cfg.subjects.ingest_filters,
        retention=RetentionPolicy.LIMITS,
        max_msgs=-1,
        max_bytes=-1,
        max_age=0,
        discard=DiscardPolicy.NEW,
        max_msg_size=max_msg_size if max_msg_size is not None else -1,
        storage=StorageType.FILE,
        num_replicas=cfg.replicas,
        duplicate_window=DUPLICATE_WINDOW_S,
        deny_delete=True,
        deny_purge=True,
        allow_rollup_hdrs=False,
    )


def consumer_config(cfg: WorkerConfig, start_seq: int) -> ConsumerConfig:
    """The durable pull consumer; delivery starts at stream sequence `start_seq`."""
    return ConsumerConfig(
        durable_name=cfg.consumer_name,
        description="jetledger worker: commits to SQLite, then acks",
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE if start_seq > 1 else DeliverPolicy.ALL,
        opt_start_seq=start_seq if start_seq > 1 else None,
        ack_policy=AckPolicy.EXPLICIT,  # "all" would be unsafe with more than one worker
        ack_wait=cfg.ack_wait,
        max_deliver=MAX_DELIVER_UNLIMITED,
        max_ack_pending=max(1000, cfg.batch_size * 4),
        num_replicas=cfg.replicas,
    )


async def ensure_stream(js: JetStreamContext, cfg: WorkerConfig) -> None:
    config = stream_config(cfg)
    try:
        await js.add_stream(config)
        log.info("created stream %s for %s", cfg.stream_name, config.subjects)
    except BadRequestError as exc:
        if exc.err_code != 10058:  # stream name already in use
            raise
        await js.update_stream(config)
        log.info("updated stream %s", cfg.stream_name)


async def _consumer_info(
    js: JetStreamContext, cfg: WorkerConfig
) -> ConsumerInfo | None:
    try:
        info: ConsumerInfo = await js.consumer_info(cfg.stream_name, cfg.consumer_name)
        return info
    except NotFoundError:
        return None


async def ensure_consumer(
    js: JetStreamContext, cfg: WorkerConfig, *, ledger_floor: int, ledger_last: int
) -> int:
    """Make the durable consumer deliver from the first unconfirmed sequence; returns it.

    `ledger_last` is the highest sequence the ledger committed: every acked sequence was
    committed first, so a consumer whose ack floor is above it belongs to another ledger
    file (a new or restored one) and is re-created from the ledger's own floor.
    """
    info = await _consumer_info(js, cfg)
    acked = info.ack_floor.stream_seq if info is not None and info.ack_floor else 0
    if info is not None and acked > ledger_last:
        log.warning("consumer acked up to %d but this ledger holds only up to %d: replaying "
                    "from %d", acked, ledger_last, ledger_floor + 1)
        await js.delete_consumer(cfg.stream_name, cfg.consumer_name)
        info = None
    if info is not None and not info.num_ack_pending:
        return acked + 1
    if info is not None:
        # Left-over unacked deliveries of a previous run: restart from the ack floor.
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        start = max(floor, 0) + 1
        await js.delete_consumer(cfg.stream_name, cfg.consumer_name)
        log.info("consumer had %d unacked deliveries: redelivering from sequence %d",
                 info.num_ack_pending, start)
    else:
        # Gone (first run, or deleted): start where the ledger knows everything is stored.
        # Replays of already-stored events are no-ops, so erring low is safe.
        start = ledger_floor + 1
        log.info("creating consumer %s from sequence %d", cfg.consumer_name, start)
    await js.add_consumer(cfg.stream_name, consumer_config(cfg, start))
    return start


#: Pull request statuses that end a request without an error: no messages (404), expired
#: (408, also "requests pending"), and 409 (consumer deleted, leadership change, max waiting):
#: nats-py treats 409 as temporary too; a deleted consumer then fails the next request.
_END_STATUSES = frozenset({"404", "408", "409"})
_HEARTBEAT = "100"
#: A pull request expires this much before the caller stops waiting, as nats-py does, so the
#: server ends it (408) rather than leaving it to capture later messages.
_EXPIRES_MARGIN_NS = 100_000
_MIN_EXPIRES_NS = 1_000_000
#: Bytes one batch may carry. A message can be a bundle of up to ~1 MiB, so `batch_size`
#: messages alone would not bound a batch (memory, transaction size). The bound must exceed
#: the largest message (see `BatchPuller`), hence twice the server's max_payload at least.
MIN_BATCH_BYTES = 8 * 1024 * 1024


class BatchPuller:
    """Fetch batches from a durable pull consumer: one subscription on a private inbox whose
    callback appends deliveries to a list, one pull request and one future per batch.

    A request is "no_wait" with an expiry: the server delivers what is pending at once (up to
    the batch) and ends with 404, or waits for the first message and sends what there is then,
    or ends with 408 at expiry; so a batch is returned as soon as anything is there. Status
    messages carry no reply subject while every delivery has its `$JS.ACK` one: that, not a
    `Status` header (a producer can set one on its event), tells them apart. Statuses of an
    earlier request (one the caller stopped waiting for) are ignored; its deliveries are
    kept, in order, for the next fetch. Needs publish on the consumer's MSG.NEXT subject and
    subscribe on the connection's inbox prefix only.

    Each request also asks for at most `max_bytes`: the server ends it early with a 409
    ("Message Size Exceeds MaxBytes") when the next message would not fit, and a message
    larger than `max_bytes` would never be delivered at all, so it is kept above twice the
    server's max_payload.
    """

    def __init__(self, nc: NATS, stream: str, consumer: str,
                 max_bytes: int = MIN_BATCH_BYTES) -> None:
        self._nc = nc
        self._max_bytes = max(max_bytes, 2 * nc.max_payload + 64 * 1024)
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._msgs: list[Msg] = []
        self._want = 0
        self._reply = ""  # reply subject of the request being waited for
        self._ended = True  # the server ended that request
        self._waiter: asyncio.Future[None] | None = None  # the request out, until fetched
        self._expires_at = 0.0  # loop time by which the server has ended that request
        self._requests = 0

    async def start(self) -> None:
        # nats-py's limits for pull subscriptions: past them it drops messages (slow consumer).
        self._sub = await self._nc.subscribe(
            f"{self._inbox}.*", cb=self._on_msg,
            pending_msgs_limit=DEFAULT_JS_SUB_PENDING_MSGS_LIMIT,
            pending_bytes_limit=DEFAULT_JS_SUB_PENDING_BYTES_LIMIT)

    async def close(self) -> list[Msg]:
        """Unsubscribe; returns deliveries received but never fetched (in order). A request
        still out (a `prefetch`) is waited for until the server ends it (at most its
        expiry): its deliveries would otherwise be dropped in flight and come back only
        after AckWait, behind newer events where the consumer is bound, not re-created."""
        waiter = self._waiter
        loop = asyncio.get_running_loop()
        deadline = self._expires_at + 0.05
        # Ended with nothing delivered (408 at expiry, say) leaves the waiter pending: poll.
        while (waiter is not None and not waiter.done() and not self._ended
               and self._sub is not None and loop.time() < deadline):
            await asyncio.wait([waiter], timeout=0.01)
        self._waiter = None
        if self._sub is not None:
            with contextlib.suppress(Exception):  # the connection may be gone
                await self._sub.unsubscribe()
            self._sub = None
        left, self._msgs = self._msgs, []
        return left

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` messages; [] if none came within `timeout`. Raises `APIError` when
        the consumer is gone (503). Completes the request `prefetch` sent, if any."""
        if self._waiter is None:
            if self._msgs:
                return self._take(batch)  # left by a request the caller stopped waiting for
            await self._send(batch, timeout)
        waiter = self._waiter
        assert waiter is not None
        try:
            # Not wait_for: a timeout must not cancel the future the callback resolves.
            await asyncio.wait([waiter], timeout=timeout)
        finally:
            self._waiter = None  # done, or given up: its late statuses are ignored
        if waiter.done() and (error := waiter.exception()) is not None:
            raise error
        return self._take(batch)

    async def prefetch(self, batch: int, timeout: float) -> None:
        """Send the next pull request now, so that its deliveries travel while the caller
        finishes the previous batch (acks, notices); the next `fetch` waits for it. A
        no-op if a request is out or deliveries are already buffered."""
        if self._waiter is None and not self._msgs:
            await self._send(batch, timeout)

    def _take(self, batch: int) -> list[Msg]:
        out, self._msgs = self._msgs[:batch], self._msgs[batch:]
        return out

    async def _send(self, batch: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        # Retrieved by `fetch` normally; if nobody does (closed meanwhile), say nothing.
        waiter.add_done_callback(_retrieve)
        self._want = batch
        self._requests += 1
        self._reply = f"{self._inbox}.{self._requests}"
        self._ended = False
        expires = max(int(timeout * 1e9) - _EXPIRES_MARGIN_NS, _MIN_EXPIRES_NS)
        self._expires_at = loop.time() + expires / 1e9
        body = json.dumps({"batch": batch, "max_bytes": self._max_bytes, "expires": expires,
                           "no_wait": True}).encode()
        try:
            await self._nc.publish(self._subject, body, reply=self._reply)
        except BaseException:
            self._waiter = None
            raise

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply:  # a delivery
            self._msgs.append(msg)
            if len(self._msgs) >= self._want or self._ended:
                self._wake(None)
            return
        if msg.subject != self._reply:
            return  # a status ending an earlier request
        status = msg.headers.get("Status") if msg.headers else None
        if status == _HEARTBEAT:
            return
        self._ended = True
        if status in _END_STATUSES:
            # With nothing received, wait on to the caller's timeout: deliveries of an
            # earlier request may still come, and an immediate retry could spin.
            if self._msgs:
                self._wake(None)
            return
        self._wake(None if self._msgs else _api_error(msg))

    def _wake(self, error: Exception | None) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if error is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(error)


def _retrieve(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


def _api_error(msg: Msg) -> APIError:
    try:
        APIError.from_msg(msg)
    except APIError as exc:
        return exc
    return APIError()  # not reached: from_msg always raises
