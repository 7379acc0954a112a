"""`jetledger rebuild`: recreate the SQLite ledger from the JetStream stream, into a new file.

The stream is the replay source: every message from the first sequence to the last one at
start is read in order (an ephemeral pull consumer, no acks) and committed through the same
`decode_message` + `LedgerWriter.commit` the worker uses, so ids, stream seqs, positions,
content hashes and rejections come out as the worker made them. Only `recorded_at` is new.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError

from .app import AdminDenied, PermissionWatch, connect_nats
from .config import WorkerConfig
from .ingest import decode_message
from .jetstream import BatchPuller
from .settings import add_setting_arguments, command_config
from .writer import LedgerWriter

__all__ = ["Progress", "RebuildError", "RebuildSummary", "rebuild", "register"]

REBUILD_SETTINGS = (
    "nats_url", "nats_user", "nats_password", "nats_creds", "inbox_prefix", "prefix",
    "stream_name", "batch_size", "fetch_timeout", "strict", "sqlite_busy_timeout_ms",
)
#: Fetches in a row that bring nothing before the stream counts as stalled.
_MAX_EMPTY_FETCHES = 10


class RebuildError(Exception):
    """The rebuild cannot start or did not complete; the message says what to do."""


@dataclass(frozen=True, slots=True)
class RebuildSummary:
    output: str
    messages: int
    first_seq: int
    last_seq: int
    inserted: int
    duplicate: int
    conflict: int
    rejected: int
    seconds: float


class Progress:
    """One progress line on stderr: redrawn in place on a terminal, else every few seconds."""

    def __init__(self, total: int, stream: TextIO | None = None) -> None:
        self.total = total
        self._out = stream if stream is not None else sys.stderr
        self._tty = self._out.isatty()
        self._started = time.monotonic()
        self._last = 0.0

    def update(self, done: int, *, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self._last < (0.1 if self._tty else 5.0):
            return
        self._last = now
        rate = done / max(now - self._started, 1e-6)
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = f", {max(self.total - done, 0) / rate:.0f}s left" if rate and not final else ""
        line = f"rebuild: {done}/{self.total} messages ({pct:.0f}%), {rate:.0f} msg/s{eta}"
        if self._tty:
            self._out.write("\r\033[K" + line + ("\n" if final else ""))
        else:
            self._out.write(line + "\n")
        self._out.flush()


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "rebuild", help="recreate the SQLite ledger from the JetStream stream",
        description="Read the JetStream stream from its first message and commit it into a "
                    "new ledger file, as the worker does; prints progress on stderr and a "
                    "summary on stdout. Needs a NATS user that may create a consumer on the "
                    "stream (admin). Exit codes: 0 done, 1 failed, 2 usage error (e.g. the "
                    "output file exists).")
    p.add_argument("--output", "-o", type=Path, required=True,
                   help="the new ledger file (must not exist)")
    add_setting_arguments(p, REBUILD_SETTINGS)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    p.set_defaults(func=run_rebuild)


def run_rebuild(args: argparse.Namespace) -> int:
    cfg = command_config(args, "rebuild", needs_url=True)
    if cfg is None:
        return 2
    output: Path = args.output
    if output.exists():
        print(f"jetledger rebuild: {output} exists; the rebuild writes a new file only",
              file=sys.stderr)
        return 2
    try:
        summary = asyncio.run(rebuild(cfg, output, progress=not args.quiet))
    except (RebuildError, AdminDenied) as exc:
        print(f"jetledger rebuild: {exc}", file=sys.stderr)
        return 1
    except (APIError, TimeoutError, nats.errors.Error, OSError) as exc:
        print(f"jetledger rebuild: failed: {exc!r}; {output} is incomplete: delete it before "
              "trying again", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(summary), sort_keys=True))
    else:
        print(f"rebuilt {summary.output} from stream {cfg.stream_name} sequences "
              f"{summary.first_seq}..{summary.last_seq}: {summary.messages} messages, "
              f"{summary.inserted} events inserted, {summary.duplicate} duplicate, "
              f"{summary.conflict} conflict, {summary.rejected} rejected "
              f"in {summary.seconds:.1f}s")
    return 0


async def rebuild(cfg: WorkerConfig, output: Path, *, progress: bool = False) -> RebuildSummary:
    """Replay the stream (first .. last sequence at start) into the new file `output`."""
    if output.exists():
        raise RebuildError(f"{output} exists; the rebuild writes a new file only")
    assert cfg.nats_url is not None
    started = time.monotonic()
    watch = PermissionWatch()
    nc = await connect_nats(cfg, cfg.nats_url, "jetledger-rebuild", watch,
                            max_reconnect_attempts=3)
    counts = {"inserted": 0, "duplicate": 0, "conflict": 0, "rejected": 0}
    messages = 0
    try:
        js = nc.jetstream(timeout=10)
        state = (await watch.admin_call(js.stream_info(cfg.stream_name))).state
        first, last = state.first_seq, state.last_seq
        total = state.messages
        bar = Progress(total) if progress else None
        writer = await LedgerWriter.open(output, js_stream=cfg.stream_name,
                                         busy_timeout_ms=cfg.sqlite_busy_timeout_ms)
        try:
            if total:
                name = f"jetledger-rebuild-{secrets.token_hex(6)}"
                await watch.admin_call(js.add_consumer(cfg.stream_name, ConsumerConfig(
                    name=name, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                    inactive_threshold=60.0, mem_storage=True, num_replicas=1,
                    description="jetledger rebuild (ephemeral)")))
                # The worker's receive path: a producer-set `Status` header on an event
                # cannot stall it (nats-py's fetch would take that event for a status).
                puller = BatchPuller(nc, cfg.stream_name, name)
                await puller.start()
                seq, empty = 0, 0
                while seq < last:
                    msgs = await puller.fetch(cfg.batch_size, timeout=cfg.fetch_timeout)
                    if not msgs:
                        empty += 1
                        if empty >= _MAX_EMPTY_FETCHES:
                            raise RebuildError(
                                f"the stream stopped delivering at sequence {seq} of {last}; "
                                f"{output} is incomplete: delete it before trying again")
                        continue
                    empty = 0
                    batch = [decode_message(cfg.subjects, m.subject, m.data, m.headers,
                                            m.metadata.sequence.stream, strict=cfg.strict)
                             for m in msgs]
                    seq = batch[-1].js_seq
                    # Everything up to `seq` is in this commit: the floor is exact.
                    writer.note_ack_floor(seq)
                    for outs in await writer.commit(batch):
                        for out in outs:
                            counts[out.outcome] += 1
                    messages += len(batch)
                    if bar is not None:
                        bar.update(messages)
                await puller.close()
                await js.delete_consumer(cfg.stream_name, name)
            if bar is not None:
                bar.update(messages, final=True)
        finally:
            await writer.close()
    finally:
        if not nc.is_closed:
            await nc.close()
    return RebuildSummary(output=str(output), messages=messages, first_seq=first,
                          last_seq=last, seconds=time.monotonic() - started, **counts)
