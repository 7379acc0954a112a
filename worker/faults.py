"""Crash points for fault tests: the worker kills itself with SIGKILL at a chosen step.

Set `JETLEDGER_CRASH_AT` to `before_commit`, `after_commit` (committed, not acked) or
`after_ack` (ack calls made, not flushed), and optionally `JETLEDGER_CRASH_AFTER=N` to let N
batches pass first. Unset in production: then `crash_point` is a dictionary lookup.
"""

from __future__ import annotations

import os
import signal

__all__ = ["crash_point"]

_AT = os.environ.get("JETLEDGER_CRASH_AT")
_remaining = int(os.environ.get("JETLEDGER_CRASH_AFTER", "0"))


def crash_point(name: str) -> None:
    global _remaining
    if _AT != name:
        return
    if _remaining > 0:
        _remaining -= 1
        return
    os.kill(os.getpid(), signal.SIGKILL)
