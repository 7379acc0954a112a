"""Test harness: the shared ledger checker and a worker run as a real subprocess."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["LedgerReport", "WorkerProcess", "check_ledger", "provision", "query"]


async def provision(url: str) -> None:
    """Create the JetStream stream as the worker (or an admin step) does, so producers can
    publish before any worker has run."""
    import nats

    from jetledger.worker import WorkerConfig
    from jetledger.worker.jetstream import ensure_stream

    nc = await nats.connect(url)
    try:
        await ensure_stream(nc.jetstream(), WorkerConfig(nats_url=url))
    finally:
        await nc.close()


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run one read on the ledger file with a connection of its own."""
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return list(conn.execute(sql, params).fetchall())
    finally:
        conn.close()


@dataclass
class LedgerReport:
    events: int
    rejections: int
    streams: int
    ids: set[tuple[str, str]]


def check_ledger(db_path: Path) -> LedgerReport:
    """Assert what must hold of every ledger file, whatever happened to it.

    integrity_check ok; positions 1..N without gaps; each stream's seqs 1..n without gaps;
    each stream's head row agrees with its events; (tenant, id) unique.
    """
    assert query(db_path, "PRAGMA integrity_check") == [("ok",)]
    positions = [r[0] for r in query(db_path, "SELECT position FROM events ORDER BY position")]
    assert positions == list(range(1, len(positions) + 1)), "positions have gaps"
    per_stream: dict[tuple[str, str], list[int]] = {}
    for tenant, stream, seq in query(
        db_path, "SELECT tenant, stream, seq FROM events ORDER BY tenant, stream, position"
    ):
        per_stream.setdefault((tenant, stream), []).append(seq)
    for key, seqs in per_stream.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"seqs of {key} have gaps: {seqs[:20]}"
    heads = {
        (t, s): (h, last)
        for t, s, h, last in query(
            db_path, "SELECT tenant, stream, head_seq, last_position FROM streams"
        )
    }
    assert set(heads) == set(per_stream)
    for key, seqs in per_stream.items():
        assert heads[key][0] == len(seqs), f"head of {key} is {heads[key][0]}, not {len(seqs)}"
    ids = {(t, i) for t, i in query(db_path, "SELECT tenant, id FROM events")}
    assert len(ids) == len(positions), "an event id is stored twice"
    (rejections,) = query(db_path, "SELECT count(*) FROM rejections")[0]
    return LedgerReport(len(positions), rejections, len(per_stream), ids)


class WorkerProcess:
    """`jetledger worker` as a child process, killable at a chosen point (faults.py)."""

    def __init__(
        self,
        nats_url: str,
        data_dir: Path,
        *,
        crash_at: str | None = None,
        crash_after: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.crash_at = crash_at
        self.crash_after = crash_after
        self.extra_args = extra_args
        self.proc: subprocess.Popen[str] | None = None
        self.log_path = data_dir / "worker.log"

    def start(self, timeout: float = 20.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("JETLEDGER_CRASH_AT", None)
        if self.crash_at:
            env["JETLEDGER_CRASH_AT"] = self.crash_at
            env["JETLEDGER_CRASH_AFTER"] = str(self.crash_after)
        cmd = [sys.executable, "-m", "jetledger.client.cli", "worker",
               "--nats-url", self.nats_url, "--data-dir", str(self.data_dir),
               *self.extra_args]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
                env=env,
            )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if "ready" in line:
                return
            if not line and self.proc.poll() is not None:
                break
        self.kill()
        raise RuntimeError(f"worker did not become ready; log:\n{self.log_path.read_text()}")

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout)

    def log_tail(self, lines: int = 40) -> str:
        """The end of the worker's log, for assertion messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text().splitlines()[-lines:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self) -> None:
        self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
