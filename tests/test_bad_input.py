"""Bad input never blocks the worker and is never lost silently: each consumed message that
cannot be stored becomes one rejection row, with its raw bytes, subject, JetStream sequence
and the reason, and the events behind it are stored as usual."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest
from conftest import RunningWorker
from harness import check_ledger, query

from jetledger.client import LedgerClient, encode, new_event
from jetledger.worker import Worker, WorkerConfig

GOOD = {"id": "x", "tenant": "acme", "kind": "k", "stream": "s",
        "occurred_at": "2026-01-01T00:00:00Z", "data": {}}

CASES: list[tuple[str, str, bytes, dict[str, str] | None, str]] = [
    ("undecodable bytes", "jetledger.evt.acme.k", b"\xc1\xff\x00garbage", None,
     "not a valid event envelope"),
    ("truncated msgpack", "jetledger.evt.acme.k",
     encode(new_event(tenant="acme", stream="s", kind="k", data={"a": 1}))[:-5], None,
     "not a valid event envelope"),
    ("JSON garbage", "jetledger.evt.acme.k", b"{not json", {"Content-Type": "application/json"},
     "application/json"),
    ("missing field", "jetledger.evt.acme.k",
     msgspec.json.encode({k: v for k, v in GOOD.items() if k != "stream"}),
     {"Content-Type": "application/json"}, "missing required field `stream`"),
    ("wrong type", "jetledger.evt.acme.k", msgspec.json.encode({**GOOD, "stream": 7}),
     {"Content-Type": "application/json"}, "Expected `str`, got `int`"),
    ("naive datetime", "jetledger.evt.acme.k",
     msgspec.json.encode({**GOOD, "occurred_at": "2026-01-01T00:00:00"}),
     {"Content-Type": "application/json"}, "timezone"),
    ("oversize id", "jetledger.evt.acme.k", msgspec.json.encode({**GOOD, "id": "i" * 500}),
     {"Content-Type": "application/json"}, "length <= 128"),
    ("invalid payload for a known kind", "jetledger.evt.acme.step_started",
     msgspec.json.encode({**GOOD, "kind": "step_started", "data": {"name": "no step_id"}}),
     {"Content-Type": "application/json"}, "not a valid StepStarted payload"),
    ("envelope tenant not a subject token", "jetledger.evt.acme.k",
     msgspec.json.encode({**GOOD, "tenant": "ac me"}), {"Content-Type": "application/json"},
     "tenant 'ac me' is not valid: use 1-64 letters, digits"),
    ("envelope kind not a subject token, in a batch", "jetledger.batch.acme",
     msgspec.json.encode({"events": [{**GOOD, "kind": "k.x"}]}),
     {"Content-Type": "application/json"}, "kind 'k.x' is not valid"),
    ("subject kind differs from envelope kind", "jetledger.evt.acme.other",
     msgspec.json.encode(GOOD), {"Content-Type": "application/json"},
     "differs from subject kind"),
    ("batch with a duplicated id", "jetledger.batch.acme",
     msgspec.json.encode({"events": [GOOD, GOOD]}), {"Content-Type": "application/json"},
     "same event id twice"),
]


async def _publish_raw(url: str, subject: str, data: bytes, headers: dict[str, str] | None
                       ) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().publish(subject, data, headers=headers)).seq
    finally:
        await nc.close()


async def _wait_for(db, sql: str, predicate, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        rows = query(db, sql)
        if predicate(rows) or asyncio.get_running_loop().time() > deadline:
            return rows
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(("name", "subject", "data", "headers", "reason"), CASES,
                         ids=[c[0] for c in CASES])
async def test_bad_message_becomes_a_rejection_and_ingest_goes_on(
    ledger: LedgerClient, worker: RunningWorker, name: str, subject: str, data: bytes,
    headers: dict[str, str] | None, reason: str,
) -> None:
    js_seq = await _publish_raw(worker.url, subject, data, headers)
    after = await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}),
                                wait=True)
    assert after.outcome == "inserted"  # the bad message held nothing up
    rows = query(worker.db_path, "SELECT js_seq, subject, raw, reason, tenant FROM rejections")
    assert len(rows) == 1, rows
    got_seq, got_subject, raw, got_reason, tenant = rows[0]
    assert (got_seq, got_subject, raw, tenant) == (js_seq, subject, data, "acme")
    assert reason in got_reason
    assert check_ledger(worker.db_path).events == 1


async def test_every_bad_message_is_rejected_once_even_when_redelivered(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    for _, subject, data, headers, _ in CASES:
        await _publish_raw(worker.url, subject, data, headers)
    await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
    assert query(worker.db_path, "SELECT count(*) FROM rejections") == [(len(CASES),)]
    # No redelivery loop: the consumer has nothing pending.
    nc = await nats.connect(worker.url)
    try:
        info = await nc.jetstream().consumer_info("JETLEDGER", "jetledger-worker")
        assert info.num_ack_pending == 0 and info.num_redelivered == 0
    finally:
        await nc.close()


async def test_strict_mode_refuses_unknown_kinds(worker_config: WorkerConfig) -> None:
    worker_config.strict = True
    async with Worker(worker_config) as w:
        task = asyncio.create_task(w.run())
        try:
            await _publish_raw(w.url, "jetledger.evt.acme.k", msgspec.json.encode(GOOD),
                               {"Content-Type": "application/json"})
            rows = await _wait_for(worker_config.db_path, "SELECT reason FROM rejections", bool)
            assert len(rows) == 1 and "not a registered payload kind" in rows[0][0]
        finally:
            w.request_stop()
            await task
