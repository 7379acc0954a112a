"""The worker's commands: `jetledger worker`, `jetledger admin init`, exit codes, and the
provision switch (least privilege: bind only; refuse a missing or foreign consumer; fall back
to binding when NATS denies the admin API)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from harness import query
from test_deploy_support import DEPLOY, PASSWORDS, password_of

from jetledger.client import LedgerClient, new_event
from jetledger.client.cli import main
from jetledger.worker import Worker, WorkerConfig
from jetledger.worker.admin import admin_init
from jetledger.worker.health import StartupError
from jetledger.worker.natsserver import NatsServer, NatsServerConfig
from jetledger.worker.settings import SETTINGS


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jetledger.client.cli", *args],
                          capture_output=True, text=True, timeout=60, check=False)


def test_worker_help_lists_every_setting_and_the_exit_codes() -> None:
    out = _cli("worker", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    for s in SETTINGS:
        assert s.flag in text, s.flag
        if s.kind is bool:
            assert f"--no-{s.flag[2:]}" in text
    assert "--config FILE" in text and "Exit codes: 0 stopped, 1 runtime failure, 2" in text
    for command in (("admin", "init"), ("rebuild",)):
        assert _cli(*command, "--help").returncode == 0


@pytest.mark.parametrize("argv", [
    ["admin"],
    ["rebuild"],
    ["worker", "--no-such-flag"],
    ["admin", "init", "--replicas", "x", "--nats-url", "nats://127.0.0.1:1"],
])
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        code = main(argv)
        raise SystemExit(code)
    assert exited.value.code == 2
    assert capsys.readouterr().err


def test_admin_and_rebuild_need_a_nats_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JETLEDGER_NATS_URL", raising=False)
    assert main(["admin", "init"]) == 2
    assert "nats_url is not set" in capsys.readouterr().err
    assert main(["rebuild", "--output", str(tmp_path / "x.db")]) == 2
    assert "nats_url is not set" in capsys.readouterr().err


async def test_admin_init_creates_updates_and_resets_the_consumer(
    nats_server: NatsServer,
) -> None:
    url = nats_server.url
    out = await asyncio.to_thread(_cli, "admin", "init", "--nats-url", url)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        ("stream JETLEDGER: subjects jetledger.evt.*.*, jetledger.batch.*, replicas 1, "
         "0 messages"),
        "consumer jetledger-worker: created, ack floor 0",
    ]
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = await js.stream_info("JETLEDGER")
        assert stream.config.deny_delete and stream.config.deny_purge
        updated = await admin_init(WorkerConfig(nats_url=url, ack_wait=12.0))
        assert updated.consumer_action == "updated"
        info = await js.consumer_info("JETLEDGER", "jetledger-worker")
        assert info.config.ack_wait == 12.0
        assert (await admin_init(WorkerConfig(nats_url=url))).consumer_action == "updated"
        reset = await admin_init(WorkerConfig(nats_url=url), reset_consumer=True)
        assert (reset.consumer_action, reset.ack_floor) == ("reset", 0)
    finally:
        await nc.close()


def _bound(tmp_path: Path, url: str, name: str) -> WorkerConfig:
    return WorkerConfig(data_dir=tmp_path / name, nats_url=url, provision=False,
                        fetch_timeout=0.2, floor_interval=0.2, ack_wait=5.0)


async def test_a_bind_only_worker_refuses_a_missing_or_foreign_consumer(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    with pytest.raises(StartupError, match="run `jetledger admin init`"):
        async with Worker(_bound(tmp_path, url, "a")):
            pass
    out = await asyncio.to_thread(_cli, "worker", "--nats-url", url, "--no-provision",
                                  "--data-dir", str(tmp_path / "cli"))
    assert out.returncode == 1 and "run `jetledger admin init`" in out.stderr

    await admin_init(WorkerConfig(nats_url=url))
    async with Worker(_bound(tmp_path, url, "a")) as worker:
        task = asyncio.create_task(worker.run())
        async with await LedgerClient.connect(url, tenant="acme") as client:
            ids = [(await client.append(new_event(tenant="acme", stream="s", kind="k",
                                                  data={"i": i}), wait=True)).id
                   for i in range(3)]
        await asyncio.sleep(0.5)  # the consumer's ack floor moves past them
        worker.request_stop()
        await asyncio.wait_for(task, 10)
    # A new (or restored) ledger file must not bind a consumer that acked past it.
    with pytest.raises(StartupError, match="acked stream sequences up to 3, but this ledger "
                                           "file holds only up to 0"):
        async with Worker(_bound(tmp_path, url, "b")):
            pass
    await admin_init(WorkerConfig(nats_url=url), reset_consumer=True)
    async with Worker(_bound(tmp_path, url, "b")) as worker:
        task = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 10
        while len(query(worker.cfg.db_path, "SELECT id FROM events")) < 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        worker.request_stop()
        await asyncio.wait_for(task, 10)
    assert [r[0] for r in query(tmp_path / "b" / "ledger.db",
                                "SELECT id FROM events ORDER BY position")] == ids


async def test_provisioning_without_admin_rights_falls_back_to_binding_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    # The deploy file as it is, next to the config NatsServer writes (includes are relative).
    (tmp_path / "nats").mkdir()
    shutil.copy(DEPLOY / "nats" / "auth.conf", tmp_path / "nats" / "auth.conf")
    server = NatsServer(NatsServerConfig(store_dir=tmp_path / "nats",
                                         extra_conf='include "auth.conf"'))
    server.start()
    try:
        await admin_init(WorkerConfig(nats_url=server.url, nats_user="admin",
                                      nats_password=password_of("admin")))
        cfg = WorkerConfig(data_dir=tmp_path / "ledger", nats_url=server.url, provision=True,
                           nats_user="jetledger-worker",
                           nats_password=password_of("jetledger-worker"),
                           inbox_prefix="_WORKER_INBOX", fetch_timeout=0.2, ack_wait=5.0)
        started = time.monotonic()
        async with Worker(cfg) as worker:
            task = asyncio.create_task(worker.run())
            # Well under the 5 s a denied JetStream API request would take to time out.
            assert time.monotonic() - started < 3
            acme_nc = await nats.connect(server.url, user="acme",
                                         password=password_of("acme"),
                                         inbox_prefix="_INBOX_acme")
            try:
                client = LedgerClient(acme_nc, tenant="acme")
                result = await client.append(
                    new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
                assert result.outcome == "inserted"
            finally:
                await acme_nc.close()
            worker.request_stop()
            await asyncio.wait_for(task, 10)
    finally:
        server.stop()
    assert any("no permission to create or update stream JETLEDGER" in r.message
               for r in caplog.records)
