"""deploy/nats/single.conf + auth.conf, and the NATS config of deploy/k8s/nats-values.yaml, run
in a real nats-server: it comes up with sync_always, `jetledger admin init` works as admin,
the worker runs as its least-privilege user, and tenants are kept apart."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml
from conftest import free_ports
from harness import WorkerProcess, query
from test_deploy_support import (
    DEPLOY,
    PASSWORDS,
    ConfServer,
    check_tenants,
    password_of,
    render,
)

from jetledger.worker import Worker
from jetledger.worker.admin import admin_init
from jetledger.worker.health import server_syncs_always
from jetledger.worker.settings import load_config


def _cli(*args: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "JETLEDGER_NATS_PASSWORD": password}
    return subprocess.run([sys.executable, "-m", "jetledger.client.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


async def test_single_node_config_serves_a_least_privilege_worker_and_keeps_tenants_apart(
    tmp_path: Path,
) -> None:
    port, http = free_ports(2)
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    shutil.copy(DEPLOY / "nats" / "auth.conf", conf_dir)
    conf = conf_dir / "single.conf"
    conf.write_text(render((DEPLOY / "nats" / "single.conf").read_text(), {
        "host: 0.0.0.0": "host: 127.0.0.1",
        "port: 4222": f"port: {port}",
        "http_port: 8222": f"http_port: {http}",
        '"/var/lib/nats"': json.dumps(str(tmp_path / "store")),
    }))
    server = ConfServer(conf, PASSWORDS, tmp_path / "nats.log")
    server.start()
    try:
        await server.ready()
        url, monitor = f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http}"
        assert await asyncio.to_thread(server_syncs_always, monitor)

        # The worker user alone cannot set anything up: admin init first, as admin.
        init = await asyncio.to_thread(
            _cli, "admin", "init", "--config", str(DEPLOY / "worker.toml"), "--nats-url", url,
            "--nats-user", "admin", "--replicas", "1", password=password_of("admin"))
        assert init.returncode == 0, init.stderr
        assert "consumer jetledger-worker: created" in init.stdout
        denied = await asyncio.to_thread(
            _cli, "admin", "init", "--nats-url", url, "--nats-user", "jetledger-worker",
            "--inbox-prefix", "_WORKER_INBOX", "--timeout", "2",
            password=password_of("jetledger-worker"))
        assert denied.returncode == 1 and "NATS denied it" in denied.stderr, denied.stderr

        # deploy/worker.toml as it is; flags only for what differs on this machine.
        worker = WorkerProcess(url, tmp_path / "ledger", extra_args=(
            "--config", str(DEPLOY / "worker.toml"), "--replicas", "1",
            "--nats-monitor-url", monitor, "--http-port", "0"),
            env={"JETLEDGER_NATS_PASSWORD": password_of("jetledger-worker")})
        worker.start()
        try:
            stored = await check_tenants(url)
        finally:
            code = worker.stop()
            worker.close()
        log = worker.log_text()
        assert code == 0, log
        assert "permissions violation" not in log.lower(), log
        assert "created stream" not in log and "creating consumer" not in log
        assert "does not fsync" not in log
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert lines and all({"ts", "level", "logger", "msg"} <= set(x) for x in lines)
        rows = query(tmp_path / "ledger" / "ledger.db", "SELECT tenant, id FROM named_events")
        assert ("acme", stored["id"]) in rows and {t for t, _ in rows} == {"acme"}
    finally:
        server.stop()


def _helm_nats_conf(values: dict[str, object], port: int, http: int, store: Path) -> str:
    """The parts of the chart's nats.conf that come from our values, rendered the way the
    chart does: JSON, with "<< x >>" strings unquoted (variables)."""
    cfg = values["config"]
    assert isinstance(cfg, dict)
    conf = {
        "host": "127.0.0.1", "port": port, "http_port": http,
        "jetstream": {"store_dir": str(store), **cfg["jetstream"]["merge"]},
        **cfg["merge"],
    }
    return re.sub(r'"<< (.*?) >>"', r"\1", json.dumps(conf, indent=2))


async def test_helm_values_give_a_synced_jetstream_and_the_same_users(tmp_path: Path) -> None:
    values = yaml.safe_load((DEPLOY / "k8s" / "nats-values.yaml").read_text())
    cfg = values["config"]
    assert cfg["cluster"] == {"enabled": True, "replicas": 3}
    js = cfg["jetstream"]
    assert js["enabled"] and js["fileStore"]["enabled"] and js["fileStore"]["pvc"]["enabled"]
    assert js["memoryStore"]["enabled"] is False
    assert js["merge"]["sync_interval"] == "always"
    assert cfg["monitor"] == {"enabled": True, "port": 8222}
    # Every password variable the config uses is set from the Secret worker.yaml defines.
    used = set(re.findall(r"<< \$(\w+) >>", json.dumps(cfg["merge"])))
    env = values["container"]["env"]
    assert used == set(env) == set(PASSWORDS)
    docs = list(yaml.safe_load_all((DEPLOY / "k8s" / "worker.yaml").read_text()))
    secret = next(d for d in docs if d["kind"] == "Secret")
    for ref in env.values():
        key = ref["valueFrom"]["secretKeyRef"]
        assert key["name"] == secret["metadata"]["name"] and key["key"] in secret["stringData"]

    port, http = free_ports(2)
    conf = tmp_path / "nats.conf"
    conf.write_text(_helm_nats_conf(values, port, http, tmp_path / "store"))
    server = ConfServer(conf, PASSWORDS, tmp_path / "nats.log")
    server.start()
    try:
        await server.ready()
        url, monitor = f"nats://127.0.0.1:{port}", f"http://127.0.0.1:{http}"
        assert await asyncio.to_thread(server_syncs_always, monitor)
        # The worker's settings exactly as the ConfigMap holds them.
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        toml_path = tmp_path / "worker.toml"
        toml_path.write_text(configmap["data"]["worker.toml"])
        env_admin = {"JETLEDGER_CONFIG": str(toml_path),
                     "JETLEDGER_NATS_PASSWORD": password_of("admin")}
        result = await admin_init(load_config(environ=env_admin, nats_url=url,
                                              nats_user="admin", replicas=1))
        assert result.consumer_action == "created"
        env_worker = {"JETLEDGER_CONFIG": str(toml_path),
                      "JETLEDGER_NATS_PASSWORD": password_of("jetledger-worker")}
        wcfg = load_config(environ=env_worker, nats_url=url, data_dir=tmp_path / "ledger",
                           nats_monitor_url=monitor, http_host="127.0.0.1", http_port=0,
                           replicas=1, fetch_timeout=0.2)
        assert wcfg.provision is False and wcfg.nats_user == "jetledger-worker"
        async with Worker(wcfg) as worker:
            task = asyncio.create_task(worker.run())
            try:
                await check_tenants(url)
                body = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(worker.http_url + "/readyz", timeout=3)
                    .read())
                assert json.loads(body)["ready"] is True
            finally:
                worker.request_stop()
                await asyncio.wait_for(task, 10)
    finally:
        server.stop()
