"""`jetledger events|get|streams|tail|rejections|export`: readable tables, --json for
scripts, and exit codes that mean something."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
import nats
from conftest import RunningWorker

from jetledger.client import EscalationRecorded, LedgerClient, new_event


async def jl(worker: RunningWorker, *args: str, timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetledger.client.cli", *args, "--nats-url", worker.url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _seed(ledger: LedgerClient) -> list[str]:
    ids = []
    for i in range(3):
        res = await ledger.append(new_event(
            tenant="acme", stream=f"esc-{i}",
            data=EscalationRecorded(escalation_id=f"esc-{i}", reason="check")), wait=True)
        ids.append(res.id)
    return ids


async def test_events_prints_a_table_and_json_lines(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    ids = await _seed(ledger)
    code, out, _ = await jl(worker, "events", "--tenant", "acme")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["POSITION", "SEQ", "STREAM", "KIND"]
    assert [line.split()[5] for line in lines[1:]] == ids
    code, out, _ = await jl(worker, "events", "--tenant", "acme", "--json", "--stream", "esc-1")
    rows = [msgspec.json.decode(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in rows] == [ids[1]]


async def test_get_shows_one_event_or_exits_3(ledger: LedgerClient, worker: RunningWorker
                                              ) -> None:
    ids = await _seed(ledger)
    code, out, _ = await jl(worker, "get", "--tenant", "acme", ids[0])
    assert code == 0 and f"id: {ids[0]}" in out and "escalation_recorded" in out
    code, _, err = await jl(worker, "get", "--tenant", "acme", "nope")
    assert code == 3 and "no event with id 'nope'" in err


async def test_streams_lists_open_items(ledger: LedgerClient, worker: RunningWorker) -> None:
    await _seed(ledger)
    code, out, _ = await jl(worker, "streams", "--tenant", "acme", "--last-kind",
                            "escalation_recorded", "--json")
    assert code == 0
    assert [msgspec.json.decode(x)["stream"] for x in out.splitlines()] == [
        "esc-2", "esc-1", "esc-0"]


async def test_tail_follows_new_events(ledger: LedgerClient, worker: RunningWorker) -> None:
    task = asyncio.create_task(jl(worker, "tail", "--tenant", "acme", "--from-position", "0",
                                  "--count", "3", "--json"))
    await asyncio.sleep(0.5)
    ids = await _seed(ledger)
    code, out, _ = await task
    assert code == 0 and [msgspec.json.decode(x)["id"] for x in out.splitlines()] == ids


async def test_rejections_shows_what_was_refused_and_why(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    nc = await nats.connect(worker.url)
    try:
        await nc.jetstream().publish("jetledger.evt.acme.k", b"\xc1not msgpack")
    finally:
        await nc.close()
    await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
    code, out, _ = await jl(worker, "rejections", "--tenant", "acme")
    assert code == 0 and "invalid_event" in out and "not a valid event envelope" in out


async def test_export_writes_jsonl_with_a_summary(
    ledger: LedgerClient, worker: RunningWorker, tmp_path: Path
) -> None:
    ids = await _seed(ledger)
    target = tmp_path / "out.jsonl"
    code, _, err = await jl(worker, "export", "--tenant", "acme", "-o", str(target))
    assert code == 0 and "exported 3 events" in err
    assert [msgspec.json.decode(x)["id"] for x in target.read_text().splitlines()] == ids


async def test_missing_tenant_is_a_usage_error(worker: RunningWorker) -> None:
    code, _, err = await jl(worker, "events")
    assert code == 2 and "--tenant is required" in err


async def test_no_worker_is_a_clear_failure(nats_server: object) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "jetledger.client.cli", "events", "--tenant", "acme",
        "--nats-url", "nats://127.0.0.1:1", "--timeout", "0.5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1 and b"cannot connect to NATS" in err


async def test_stats_counts_events_streams_and_rejections(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    await _seed(ledger)
    nc = await nats.connect(worker.url)
    try:
        await nc.jetstream().publish("jetledger.evt.acme.k", b"\xc1not msgpack")
    finally:
        await nc.close()
    await ledger.append(new_event(tenant="acme", stream="esc-0", kind="k", data={}), wait=True)
    code, out, _ = await jl(worker, "stats", "--tenant", "acme", "--json")
    stats = msgspec.json.decode(out)
    assert code == 0
    assert (stats["events"], stats["streams"], stats["rejections"]) == (4, 3, 1)
    assert stats["last_position"] == 4
    code, out, _ = await jl(worker, "stats", "--tenant", "nobody")
    assert code == 0 and out.splitlines()[1].split()[:4] == ["nobody", "0", "0", "0"]
