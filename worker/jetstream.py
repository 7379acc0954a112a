"""Create or update the JetStream stream and the worker's durable pull consumer.

The stream keeps every event until an operator decides otherwise: no age, count or size
limit by default, and `discard: new` so that if limits are ever set, producers get an error
instead of unread events being dropped. Deletes and purges are denied.

The consumer is only a cursor: the ledger file is the truth about what is stored. At start
the worker re-creates the consumer from the consumer's ack floor (or, if it is gone, from the
floor recorded in the ledger) so a crashed batch is redelivered at once and in order, instead
of after AckWait and behind newer events.
"""

from __future__ import annotations

import logging

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
from nats.js.errors import BadRequestError, NotFoundError

from .config import WorkerConfig

__all__ = ["consumer_config", "ensure_consumer", "ensure_stream", "stream_config"]

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
