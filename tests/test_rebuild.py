"""`jetledger rebuild` recreates the ledger from the JetStream stream: the new file has the
same events (ids, seqs, positions, content hashes, bodies), stream heads and rejections as
the one the worker wrote."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nats
import pytest
from conftest import RunningWorker
from harness import check_ledger, query

from jetledger.client import (
    ConflictError,
    ExpectedSeqMismatch,
    LedgerClient,
    encode,
    new_event,
)

EVENTS = ("SELECT position, tenant, id, stream, seq, kind, occurred_at, correlation_id,"
          " causation_id, js_seq, content_hash, body FROM named_events ORDER BY position")
STREAMS = ("SELECT tenant, stream, head_seq, first_position, last_position, last_kind"
           " FROM named_streams ORDER BY tenant, stream")
REJECTIONS = ("SELECT js_seq, subject, tenant, event_id, code, reason, raw, headers,"
              " existing_hash, new_hash FROM rejections ORDER BY js_seq")
STATE = "SELECT js_stream, last_js_seq FROM ingest_state"


async def _fill(ledger: LedgerClient, url: str) -> int:
    """Every kind of outcome; returns the number of rejections the worker must record."""
    for i in range(30):
        tenant = ("acme", "globex", "initech")[i % 3]
        await ledger.append(new_event(tenant=tenant, stream=f"run-{i % 4}", kind="step",
                                      data={"i": i}, correlation_id=f"c{i % 2}"), wait=True)
    batch = [new_event(tenant="acme", stream="atomic", kind="step", data={"n": n})
             for n in range(5)]
    await ledger.append_batch(batch, wait=True)
    dup = new_event(tenant="acme", stream="run-0", kind="step", data={"dup": True})
    await ledger.append(dup, wait=True)
    assert (await ledger.append(dup, wait=True)).outcome == "duplicate"
    with pytest.raises(ConflictError):
        await ledger.append(new_event(tenant="acme", stream="run-0", kind="step", id=dup.id,
                                      data={"dup": False}), wait=True)
    with pytest.raises(ExpectedSeqMismatch):
        await ledger.append(new_event(tenant="acme", stream="run-0", kind="step", data={},
                                      expected_seq=1), wait=True)
    with pytest.raises(ConflictError):  # half of this batch is stored already
        await ledger.append_batch([dup, new_event(tenant="acme", stream="x", kind="k",
                                                  data={})], wait=True)
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.publish("jetledger.evt.acme.step", b"\x00garbage")
        forged = new_event(tenant="globex", stream="s", kind="step", data={})
        await js.publish("jetledger.evt.acme.step", encode(forged))
        # A valid event with a producer-set status header is an event like any other: it
        # must not stall the rebuild (nor the worker) as if it were a status message.
        spoof = new_event(tenant="acme", stream="s", kind="step", data={"status": True})
        await js.publish("jetledger.evt.acme.step", encode(spoof),
                         headers={"Status": "503", "Description": "No Responders"})
    finally:
        await nc.close()
    return 5  # conflict, expected_seq, partial batch, garbage, forged tenant


def _rebuild(url: str, output: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "jetledger.client.cli", "rebuild", "--nats-url", url,
         "--output", str(output), *extra],
        capture_output=True, text=True, timeout=60, check=False)


async def _wait_rejections(db: Path, n: int) -> None:
    deadline = time.monotonic() + 10
    while query(db, "SELECT count(*) FROM rejections")[0][0] < n:
        assert time.monotonic() < deadline, "the worker did not record every rejection"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and nothing else is in flight


def _table(db: Path, sql: str) -> list[tuple[Any, ...]]:
    return query(db, sql)


async def test_rebuilt_ledger_equals_the_original(
    worker: RunningWorker, ledger: LedgerClient, tmp_path: Path
) -> None:
    rejections = await _fill(ledger, worker.url)
    await _wait_rejections(worker.db_path, rejections)
    original = worker.db_path

    output = tmp_path / "rebuilt.db"
    # A small batch size puts batch boundaries everywhere: the result must not depend on it.
    done = await asyncio.to_thread(_rebuild, worker.url, output, "--batch-size", "7")
    assert done.returncode == 0, done.stderr
    messages = _table(original, STATE)[0][1]
    assert f"rebuild: {messages}/{messages} messages (100%)" in done.stderr
    assert done.stdout.startswith(f"rebuilt {output} from stream JETLEDGER sequences 1..")
    assert "37 events inserted, 1 duplicate" in done.stdout

    for sql in (EVENTS, STREAMS, REJECTIONS, STATE):
        assert _table(output, sql) == _table(original, sql), sql
    report = check_ledger(output)
    assert (report.events, report.rejections) == (37, rejections)

    # Scripts get JSON; an existing output file is a usage error, left untouched.
    again = await asyncio.to_thread(_rebuild, worker.url, tmp_path / "r2.db", "--json", "-q")
    assert again.returncode == 0 and again.stderr == ""
    summary = json.loads(again.stdout)
    assert (summary["messages"], summary["inserted"], summary["duplicate"]) == (
        messages, 37, 1)
    # Outcomes count per event: the refused half-stored batch is two conflicts.
    assert (summary["conflict"], summary["rejected"]) == (3, 3)
    before = output.read_bytes()
    refused = await asyncio.to_thread(_rebuild, worker.url, output)
    assert refused.returncode == 2 and "exists" in refused.stderr
    assert output.read_bytes() == before


async def test_rebuild_of_an_empty_stream_gives_an_empty_ledger(
    worker: RunningWorker, tmp_path: Path
) -> None:
    done = await asyncio.to_thread(_rebuild, worker.url, tmp_path / "empty.db")
    assert done.returncode == 0, done.stderr
    assert "0 messages" in done.stdout
    assert check_ledger(tmp_path / "empty.db").events == 0
