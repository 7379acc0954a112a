"""`jetledger admin init`: create or update the stream and the worker's durable consumer.

Run once with admin credentials (and again after changing stream settings), so the worker
itself can run with `provision = false` and a NATS user that can only bind its consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass

import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import ConsumerInfo
from nats.js.errors import APIError, NotFoundError

from .app import AdminDenied, PermissionWatch, connect_nats
from .config import WorkerConfig
from .jetstream import consumer_config, ensure_stream
from .settings import add_setting_arguments, command_config

__all__ = ["InitResult", "admin_init", "register"]

#: The settings `admin init` reads; the rest of a shared config file is ignored here.
ADMIN_SETTINGS = (
    "nats_url", "nats_user", "nats_password", "nats_creds", "inbox_prefix", "prefix",
    "stream_name", "consumer_name", "replicas", "ack_wait", "batch_size",
)


@dataclass(frozen=True, slots=True)
class InitResult:
    stream: str
    subjects: list[str]
    replicas: int
    messages: int
    consumer: str
    consumer_action: str  # created, updated or reset
    ack_floor: int


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    admin = sub.add_parser("admin", help="steps that need NATS admin rights (init)",
                           description="Administrative steps that need NATS admin rights.")
    actions = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init", help="create or update the stream and the worker's durable consumer",
        description="Create or update the JetStream stream and the worker's durable pull "
                    "consumer, with admin credentials, so that the worker can run with "
                    "provision = false. Safe to repeat. Exit codes: 0 done, 1 NATS refused "
                    "or failed, 2 usage or configuration error.")
    add_setting_arguments(init, ADMIN_SETTINGS)
    init.add_argument("--reset-consumer", action="store_true",
                      help="delete and recreate the consumer from stream sequence 1: the "
                           "worker replays everything (stored events are no-ops); for a "
                           "new or restored ledger file")
    init.add_argument("--timeout", type=float, default=10.0,
                      help="seconds to wait for each JetStream API answer (default: 10)")
    init.set_defaults(func=run_admin_init)


def run_admin_init(args: argparse.Namespace) -> int:
    cfg = command_config(args, "admin init", needs_url=True)
    if cfg is None:
        return 2
    try:
        result = asyncio.run(admin_init(cfg, reset_consumer=args.reset_consumer,
                                        timeout=args.timeout))
    except AdminDenied as exc:
        print(f"jetledger admin init: NATS denied it ({exc}); use admin credentials",
              file=sys.stderr)
        return 1
    except (APIError, TimeoutError, nats.errors.Error, OSError) as exc:
        print(f"jetledger admin init: failed: {exc!r}", file=sys.stderr)
        return 1
    print(f"stream {result.stream}: subjects {', '.join(result.subjects)}, "
          f"replicas {result.replicas}, {result.messages} messages")
    print(f"consumer {result.consumer}: {result.consumer_action}, "
          f"ack floor {result.ack_floor}")
    return 0


async def admin_init(
    cfg: WorkerConfig, *, reset_consumer: bool = False, timeout: float = 10.0
) -> InitResult:
    """Create or update the stream, then create, update or reset the durable consumer."""
    assert cfg.nats_url is not None
    watch = PermissionWatch()
    nc = await connect_nats(cfg, cfg.nats_url, "jetledger-admin", watch,
                            max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=timeout)
        await watch.admin_call(ensure_stream(js, cfg))
        action, info = await watch.admin_call(_ensure_consumer(js, cfg, reset_consumer))
        stream = await watch.admin_call(js.stream_info(cfg.stream_name))
    finally:
        await _close(nc)
    return InitResult(
        stream=cfg.stream_name, subjects=list(stream.config.subjects or []),
        replicas=stream.config.num_replicas or 1, messages=stream.state.messages,
        consumer=cfg.consumer_name, consumer_action=action,
        ack_floor=info.ack_floor.stream_seq if info.ack_floor else 0)


async def _ensure_consumer(
    js: JetStreamContext, cfg: WorkerConfig, reset: bool
) -> tuple[str, ConsumerInfo]:
    try:
        current = await js.consumer_info(cfg.stream_name, cfg.consumer_name)
    except NotFoundError:
        return "created", await js.add_consumer(cfg.stream_name, consumer_config(cfg, 1))
    if reset:
        await js.delete_consumer(cfg.stream_name, cfg.consumer_name)
        return "reset", await js.add_consumer(cfg.stream_name, consumer_config(cfg, 1))
    # Same name, new settings: the server updates the mutable fields (ack wait, max ack
    # pending, replicas...). Where it delivers from is not mutable: keep the current one.
    wanted = consumer_config(cfg, 1)
    wanted.deliver_policy = current.config.deliver_policy
    wanted.opt_start_seq = current.config.opt_start_seq
    return "updated", await js.add_consumer(cfg.stream_name, wanted)


async def _close(nc: NATS) -> None:
    if not nc.is_closed:
        try:
            await nc.drain()
        except Exception:  # noqa: BLE001 - closing on the way out
            await nc.close()
