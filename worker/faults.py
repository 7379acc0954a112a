"""Fault hooks for tests: inert unless their environment variable is set.

`JETLEDGER_CRASH_AT`: the worker kills itself with SIGKILL at a chosen step:
`before_commit`, `after_commit` (committed, not acked) or `after_ack` (ack calls made, not
flushed); `JETLEDGER_CRASH_AFTER=N` lets N batches pass first.

`JETLEDGER_FAULT_KIND=<kind>`: handling any event of that kind raises `RuntimeError`, every
time: a deterministic "handler bug" for one kind, to prove the ingest loop isolates it (it
becomes an "internal" rejection after a bounded number of tries) and holds up nothing else.

`JETLEDGER_COMMIT_DELAY=<seconds>`: wait that long before each commit, so that a fault
injected at a random moment (a NATS restart) almost surely lands between receiving a batch and
acking it: the window where an ack can meet a broken connection.

Unset in production: then each hook is one comparison.
"""

from __future__ import annotations

import asyncio
import os
import signal

__all__ = ["commit_delay", "crash_point", "handler_fault"]

_AT = os.environ.get("JETLEDGER_CRASH_AT")
_remaining = int(os.environ.get("JETLEDGER_CRASH_AFTER", "0"))
_FAULT_KIND = os.environ.get("JETLEDGER_FAULT_KIND") or None
_COMMIT_DELAY = float(os.environ.get("JETLEDGER_COMMIT_DELAY") or 0)


def crash_point(name: str) -> None:
    global _remaining
    if _AT != name:
        return
    if _remaining > 0:
        _remaining -= 1
        return
    os.kill(os.getpid(), signal.SIGKILL)


def handler_fault(kind: str) -> None:
    if _FAULT_KIND is not None and kind == _FAULT_KIND:
        raise RuntimeError(f"injected handler fault for kind {kind!r} (JETLEDGER_FAULT_KIND)")


async def commit_delay() -> None:
    if _COMMIT_DELAY > 0:
        await asyncio.sleep(_COMMIT_DELAY)
