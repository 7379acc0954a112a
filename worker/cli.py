"""`jetledger worker`: run the service until SIGINT/SIGTERM, then exit 0.

Exit codes: 0 stopped cleanly; 1 runtime failure (start-up check, NATS, storage, a stop
slower than stop_timeout); 2 usage or configuration error (the message names the setting).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import re
import signal

import nats.errors

from . import admin, rebuild
from .app import Worker
from .config import WorkerConfig
from .health import StartupError
from .natsserver import NatsServerError
from .settings import add_setting_arguments, command_config

__all__ = ["add_arguments", "redact", "register", "run_worker"]

log = logging.getLogger("jetledger.worker")

_DESCRIPTION = """\
Consume the JetStream stream into the SQLite ledger and answer queries. Settings come from
flags, then JETLEDGER_* environment variables, then the --config TOML file, then defaults
(docs/operations.md lists them all). Without --nats-url an embedded nats-server is started.
Prints one line containing "ready" on stdout once it serves; stops on SIGINT/SIGTERM.
Exit codes: 0 stopped, 1 runtime failure, 2 usage or configuration error."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the worker's subcommands to the `jetledger` command."""
    worker = sub.add_parser(
        "worker", help="run the ledger worker (embedded NATS by default)",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(worker)
    worker.set_defaults(func=run_worker)
    admin.register(sub)
    rebuild.register(sub)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_setting_arguments(p)


def redact(url: str) -> str:
    """A URL without its user:password@ part, for logs and the ready line."""
    return re.sub(r"//[^@/]*@", "//", url)


async def _main(cfg: WorkerConfig) -> int:
    loop = asyncio.get_running_loop()
    async with Worker(cfg) as worker:
        stopping = False

        def exit_now() -> None:
            # os._exit skips atexit, and the embedded server runs in its own session (a
            # terminal's Ctrl-C does not reach it): stop it here, or it outlives the worker.
            if worker.server is not None:
                worker.server.stop(timeout=2.0)
            os._exit(1)

        def too_slow() -> None:
            log.error("stop took longer than stop_timeout (%gs): exiting now; unacked "
                      "messages are redelivered to the next run", cfg.stop_timeout)
            exit_now()

        def on_signal(sig: signal.Signals) -> None:
            nonlocal stopping
            if stopping:
                log.error("second %s: exiting now", sig.name)
                exit_now()
            stopping = True
            log.info("%s: stopping (at most %gs)", sig.name, cfg.stop_timeout)
            worker.request_stop()
            loop.call_later(cfg.stop_timeout, too_slow)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        _tune_gc()
        embedded = " (embedded nats-server)" if worker.server is not None else ""
        probes = f"; probes on {worker.http_url}" if worker.health is not None else ""
        print(f"jetledger worker ready: producers connect to {redact(worker.url)}{embedded}; "
              f"ledger {cfg.db_path}{probes}", flush=True)
        await worker.run()
    print("jetledger worker stopped", flush=True)
    return 0


def _tune_gc() -> None:
    """The worker allocates container objects per event (envelopes, payload dicts, rows) that
    die with their batch, nearly all freed by reference counting. At the default thresholds a
    2000-event decode + commit ran ~26 young collections, ~2 middle ones and a full one every
    ~5 batches. Collect young objects less often, and keep what start-up built (modules,
    connections) out of every later scan. The worker process only: a library does not set
    its host's collector."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run_worker(args: argparse.Namespace) -> int:
    cfg = command_config(args, "worker")
    if cfg is None:
        return 2
    try:
        return asyncio.run(_main(cfg))
    except StartupError as exc:
        log.critical("not starting: %s", exc)
    except nats.errors.NoServersError as exc:
        log.critical("cannot reach NATS at %s: %s", redact(cfg.nats_url or "(embedded)"), exc)
    except NatsServerError as exc:
        log.critical("embedded nats-server failed: %s", exc)
    except Exception:
        log.exception("worker failed")
    return 1
