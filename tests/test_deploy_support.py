"""Helpers for the deploy tests (no tests here): run nats-server with a deploy/ config file
as written, on loopback ports, and check what each NATS user can and cannot do."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NATS

import pytest

from jetledger.client import LedgerClient, PermissionDenied, new_event
from jetledger.worker.natsserver import find_nats_server

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PASSWORDS = {
    "JETLEDGER_ADMIN_PASSWORD": "admin-secret",
    "JETLEDGER_WORKER_PASSWORD": "worker-secret",
    "JETLEDGER_ACME_PASSWORD": "acme-secret",
    "JETLEDGER_GLOBEX_PASSWORD": "globex-secret",
}


def password_of(user: str) -> str:
    key = {"admin": "ADMIN", "jetledger-worker": "WORKER"}.get(user, user.upper())
    return PASSWORDS[f"JETLEDGER_{key}_PASSWORD"]


def render(text: str, replacements: Mapping[str, str]) -> str:
    """Replace each key exactly once: a config whose shape changed fails loudly here instead
    of silently being tested with production ports and paths."""
    for old, new in replacements.items():
        count = text.count(old)
        assert count == 1, f"expected {old!r} once in the config, found it {count} times"
        text = text.replace(old, new)
    return text


class ConfServer:
    """nats-server -c CONF as a child process; stopped by its PID."""

    def __init__(self, conf: Path, env: Mapping[str, str], log: Path) -> None:
        self.conf = conf
        self.env = {**os.environ, **env}
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(find_nats_server()), "-c", str(self.conf)], stdout=out, stderr=out,
                stdin=subprocess.DEVNULL, env=self.env)

    async def ready(self, timeout: float = 15.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and "Server is ready" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise AssertionError(f"nats-server with {self.conf} did not start:\n"
                             f"{self.log.read_text(errors='replace')[-3000:]}")

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def connect_as(url: str, user: str, *, inbox_prefix: str = "_INBOX",
                     errors: list[str] | None = None) -> NATS:
    """A connection as `user` (password from PASSWORDS); violations land in `errors`."""
    sink = errors if errors is not None else []

    async def on_error(exc: Exception) -> None:
        sink.append(str(exc))

    return await nats.connect(url, user=user, password=password_of(user),
                              inbox_prefix=inbox_prefix,
                              error_cb=on_error, max_reconnect_attempts=0, connect_timeout=3)


async def wait_for(errors: list[str], needle: str, timeout: float = 3.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for text in errors:
            low = text.lower()  # nats-py lower-cases the server's message
            if needle.lower() in low and "permissions violation" in low:
                return text
        await asyncio.sleep(0.02)
    raise AssertionError(f"no permission violation for {needle!r}; errors: {errors}")


async def check_tenants(url: str) -> dict[str, Any]:
    """acme appends and queries its own tenant through a running worker; acme cannot
    publish to, query, or read replies of globex. Returns what acme stored."""
    errors: list[str] = []
    # Raw connections here, to try what a hostile producer would send by hand.
    acme_nc = await connect_as(url, "acme", inbox_prefix="_INBOX_acme", errors=errors)
    globex_nc = await connect_as(url, "globex", inbox_prefix="_INBOX_globex")
    try:
        acme = LedgerClient(acme_nc, tenant="acme", timeout=3.0)
        globex = LedgerClient(globex_nc, tenant="globex", timeout=3.0)
        event = new_event(tenant="acme", stream="run-1", kind="step", data={"n": 1})
        stored = await acme.append(event, wait=True)
        assert stored.outcome == "inserted"
        assert [e.id for e in (await acme.events()).events] == [event.id]
        assert (await globex.events()).events == []  # globex sees none of it

        await acme_nc.publish("jetledger.evt.globex.step", b"forged")
        await acme_nc.publish("jetledger.batch.globex", b"forged")
        await acme_nc.flush()
        await wait_for(errors, "jetledger.evt.globex.step")
        await wait_for(errors, "jetledger.batch.globex")
        with contextlib.suppress(Exception):
            await acme_nc.request("jetledger.q.globex.events", b"", timeout=0.5)
        await wait_for(errors, "jetledger.q.globex.events")
        await acme_nc.subscribe("_INBOX_globex.>")
        await acme_nc.subscribe("jetledger.live.globex")
        await wait_for(errors, "_INBOX_globex.>")
        await wait_for(errors, "jetledger.live.globex")
        # Nor can a tenant reach the JetStream API (delete, purge, read the stream).
        with contextlib.suppress(Exception):
            await acme_nc.request("$JS.API.STREAM.INFO.JETLEDGER", b"", timeout=0.5)
        await wait_for(errors, "$JS.API.STREAM.INFO.JETLEDGER")
        await check_client_reports_permission_denied(url)
        return {"id": event.id, "position": stored.position}
    finally:
        for nc in (acme_nc, globex_nc):
            await nc.close()


async def check_client_reports_permission_denied(url: str) -> None:
    """Through `LedgerClient.connect` as the tenant's user (inbox prefix `_INBOX_acme` by
    default), reaching into another tenant fails with a typed PermissionDenied, not a bare
    timeout, and the tenant's own appends still work."""
    acme = await LedgerClient.connect(url, tenant="acme", user="acme",
                                      password=password_of("acme"), timeout=1.0)
    try:
        assert (await acme.append(new_event(tenant="acme", stream="own", kind="k", data={}),
                                  wait=True)).outcome == "inserted"
        with pytest.raises(PermissionDenied, match="jetledger.evt.globex.k"):
            await acme.append(new_event(tenant="globex", stream="s", kind="k", data={}))
        with pytest.raises(PermissionDenied, match="jetledger.q.globex.events"):
            await acme.events(tenant="globex")
    finally:
        await acme.close()
