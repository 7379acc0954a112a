"""deploy/nats/cluster.conf on three loopback nodes: the cluster forms (server names,
routes, per-node store dirs, sync_interval always, monitoring), `admin init` creates the R3
stream as admin, and the worker runs with deploy/worker.toml as its least-privilege user."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import free_ports
from test_deploy_support import (
    DEPLOY,
    PASSWORDS,
    ConfServer,
    check_tenants,
    password_of,
    render,
)

from jetledger.worker import Worker
from jetledger.worker.admin import InitResult, admin_init
from jetledger.worker.health import server_syncs_always
from jetledger.worker.settings import load_config

NODES = ("nats-1", "nats-2", "nats-3")


def _varz(url: str) -> dict[str, object]:
    with urllib.request.urlopen(url + "/varz", timeout=3) as resp:
        out: dict[str, object] = json.load(resp)
    return out


async def _admin_init_when_formed(url: str, toml: Path, timeout: float = 30.0) -> InitResult:
    """admin init, retried until the cluster has a JetStream meta leader (as compose and
    the Kubernetes Job do)."""
    env = {"JETLEDGER_CONFIG": str(toml), "JETLEDGER_NATS_PASSWORD": password_of("admin")}
    cfg = load_config(environ=env, nats_url=url, nats_user="admin")
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await admin_init(cfg, timeout=1.0)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.3)


async def test_three_node_cluster_config_forms_and_serves_the_worker(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ports = free_ports(9)
    client, http, route = ports[0:3], ports[3:6], ports[6:9]
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    shutil.copy(DEPLOY / "nats" / "auth.conf", conf_dir)
    template = (DEPLOY / "nats" / "cluster.conf").read_text()
    servers = []
    for i, name in enumerate(NODES):
        conf = conf_dir / f"{name}.conf"
        conf.write_text(render(template, {
            "host: 0.0.0.0": "host: 127.0.0.1",
            "port: 4222": f"port: {client[i]}",
            "http_port: 8222": f"http_port: {http[i]}",
            '"/data/jetstream"': json.dumps(str(tmp_path / name / "jetstream")),
            "listen: 0.0.0.0:6222": f"listen: 127.0.0.1:{route[i]}",
            # The same list on every node, the node itself included (a self-route is dropped).
            **{f"nats://{n}:6222": f"nats://127.0.0.1:{route[j]}" for j, n in enumerate(NODES)},
        }))
        servers.append(ConfServer(conf, {**PASSWORDS, "NATS_SERVER_NAME": name},
                                  tmp_path / f"{name}.log"))
    try:
        for server in servers:
            server.start()
        await asyncio.gather(*(s.ready() for s in servers))
        for i, name in enumerate(NODES):
            varz = await asyncio.to_thread(_varz, f"http://127.0.0.1:{http[i]}")
            assert varz["server_name"] == name
            js = varz["jetstream"]
            assert isinstance(js, dict)
            assert js["config"]["sync_always"] is True
            assert js["config"]["store_dir"].startswith(str(tmp_path / name))

        url = ",".join(f"nats://127.0.0.1:{p}" for p in client)
        init = await _admin_init_when_formed(url, DEPLOY / "worker.toml")
        assert (init.consumer_action, init.replicas) == ("created", 3)
        env = {"JETLEDGER_CONFIG": str(DEPLOY / "worker.toml"),
               "JETLEDGER_NATS_PASSWORD": password_of("jetledger-worker")}
        monitor = f"http://127.0.0.1:{http[0]}"
        cfg = load_config(environ=env, nats_url=url, nats_monitor_url=monitor,
                          data_dir=tmp_path / "ledger", http_host="127.0.0.1", http_port=0,
                          fetch_timeout=0.2)
        assert (cfg.replicas, cfg.provision) == (3, False)
        assert await asyncio.to_thread(server_syncs_always, monitor)
        caplog.set_level(logging.INFO, "jetledger.worker")
        async with Worker(cfg) as worker:
            task = asyncio.create_task(worker.run())
            try:
                # Producers may connect to any node.
                await check_tenants(f"nats://127.0.0.1:{client[2]}")
            finally:
                worker.request_stop()
                await asyncio.wait_for(task, 10)
        worker_log = "\n".join(r.getMessage() for r in caplog.records
                                if r.name == "jetledger.worker")
        assert "permissions violation" not in worker_log.lower(), worker_log
        assert "does not fsync" not in worker_log
    finally:
        for server in servers:
            server.stop()
