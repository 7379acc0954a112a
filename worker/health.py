"""Health: start-up checks, and the small HTTP server for probes and Prometheus.

    GET /healthz   liveness: 200 while the event loop answers
    GET /readyz    readiness: 200 when every check passes, else 503; JSON body either way
    GET /metrics   Prometheus text format

asyncio's own server, no framework: three fixed paths, GET/HEAD, one request per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Check",
    "HealthServer",
    "StartupError",
    "check_database",
    "server_syncs_always",
]

log = logging.getLogger("jetledger.worker")

_MAX_HEADER_BYTES = 16 * 1024
_READ_TIMEOUT = 5.0


class StartupError(Exception):
    """The worker must not start; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class Check:
    ok: bool
    detail: str


def check_database(path: Path) -> None:
    """Refuse a ledger file that fails `PRAGMA quick_check` (a missing file is fine: new).

    Read-only open: the check must not change a damaged file (nor create a missing one).
    """
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA quick_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.OperationalError as exc:
        # Cannot open or busy (another process writes): not evidence of damage. Opening the
        # writer will fail loudly if the file is really unusable.
        log.warning("could not run quick_check on %s: %s", path, exc)
        return
    except sqlite3.DatabaseError as exc:  # "file is not a database", "malformed"
        rows = [str(exc)]
    if rows != ["ok"]:
        # One row can hold many newline-separated findings: show the first few.
        lines = [ln for row in rows for ln in row.splitlines() if not ln.startswith("***")]
        shown = "; ".join(lines[:5]) + (f" (and {len(lines) - 5} more)" if len(lines) > 5
                                         else "")
        raise StartupError(
            f"ledger file {path} fails PRAGMA quick_check: {shown}. Not starting: restore it "
            "from a backup, or recreate it from JetStream with `jetledger rebuild` (then move "
            "the damaged file away)")


def server_syncs_always(monitor_url: str, timeout: float = 3.0) -> bool:
    """Whether the NATS server fsyncs every JetStream write (`/varz`
    jetstream.config.sync_always; absent means the default 2-minute interval).

    The monitoring endpoint needs no credentials; the alternative (`$SYS.REQ.SERVER.PING.VARZ`)
    needs the system account, which a least-privilege worker must not hold.
    """
    url = monitor_url.rstrip("/") + "/varz"
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        varz = json.load(resp)
    config = (varz.get("jetstream") or {}).get("config") or {}
    return bool(config.get("sync_always", False))


class HealthServer:
    """Serves /healthz, /readyz and /metrics until `close()`."""

    def __init__(
        self,
        host: str,
        port: int,
        checks: Callable[[], dict[str, Check]],
        metrics: Callable[[], tuple[bytes, str]] | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._checks = checks
        self._metrics = metrics
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self._host in ("", "0.0.0.0") else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    def readiness(self) -> tuple[bool, dict[str, Check]]:
        checks = self._checks()
        return all(c.ok for c in checks.values()), checks

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            if len(head) > _MAX_HEADER_BYTES:
                raise ValueError("headers too large")
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            status, ctype, body = self._route(method, target.split("?", 1)[0])
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed",
                      503: "Service Unavailable"}[status]
            writer.write(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode())
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError, ConnectionError):
            pass  # a bad or vanished client: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET\n"
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, checks = self.readiness()
            body = {"ready": ready,
                    "checks": {k: {"ok": c.ok, "detail": c.detail} for k, c in checks.items()}}
            return (200 if ready else 503), "application/json", (
                json.dumps(body, sort_keys=True) + "\n").encode()
        if path == "/metrics" and self._metrics is not None:
            data, ctype = self._metrics()
            return 200, ctype, data
        return 404, "text/plain", b"not found: try /healthz, /readyz, /metrics\n"
