"""`jetledger worker`: run the service until SIGINT/SIGTERM, then exit 0."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from .app import Worker
from .config import WorkerConfig

__all__ = ["add_arguments", "register", "run_worker"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the worker's subcommands to the `jetledger` command."""
    worker = sub.add_parser("worker", help="run the ledger worker (embedded NATS by default)")
    add_arguments(worker)
    worker.set_defaults(func=run_worker)


def add_arguments(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--nats-url", default=env("JETLEDGER_NATS_URL"),
                   help="join this NATS server/cluster (default: start an embedded server)")
    p.add_argument("--data-dir", type=Path, default=Path(env("JETLEDGER_DATA_DIR",
                                                               "jetledger-data")),
                   help="where the ledger file (and the embedded server's store) live")
    p.add_argument("--port", type=int, default=4222,
                   help="embedded server's client port (0: any free port)")
    p.add_argument("--prefix", default=env("JETLEDGER_PREFIX", "jetledger"),
                   help="subject prefix")
    p.add_argument("--stream", default="JETLEDGER", help="JetStream stream name")
    p.add_argument("--replicas", type=int, default=1, help="stream replicas (3 in production)")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--strict", action="store_true", help="refuse unknown event kinds")
    p.add_argument("--log-level", default=env("JETLEDGER_LOG_LEVEL", "INFO"))


async def _main(cfg: WorkerConfig) -> int:
    async with Worker(cfg) as worker:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.request_stop)
        embedded = " (embedded nats-server)" if worker.server is not None else ""
        print(f"jetledger worker ready: producers connect to {worker.url}{embedded}; "
              f"ledger {cfg.db_path}", flush=True)
        await worker.run()
    print("jetledger worker stopped", flush=True)
    return 0


def run_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    cfg = WorkerConfig(
        data_dir=args.data_dir,
        nats_url=args.nats_url,
        prefix=args.prefix,
        stream_name=args.stream,
        replicas=args.replicas,
        embedded_port=args.port,
        batch_size=args.batch_size,
        strict=args.strict,
    )
    return asyncio.run(_main(cfg))
