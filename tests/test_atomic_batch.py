"""A batch commits whole, with consecutive seqs, or not at all."""

from __future__ import annotations

import msgspec
import pytest
from conftest import RunningWorker
from harness import check_ledger, query

from jetledger.client import (
    ConflictError,
    ExpectedSeqMismatch,
    LedgerClient,
    new_event,
)


async def test_batch_commits_with_consecutive_seqs(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
    batch = [new_event(tenant="acme", stream="s", kind="k", data={"i": i}) for i in range(5)]
    results = await ledger.append_batch(batch, wait=True)
    assert [r.seq for r in results] == [2, 3, 4, 5, 6]
    assert [r.position for r in results] == [2, 3, 4, 5, 6]
    assert len({r.js_seq for r in results}) == 1  # one JetStream message
    check_ledger(worker.db_path)


async def test_batch_with_one_bad_event_stores_none(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
    good = [new_event(tenant="acme", stream="t", kind="k", data={}) for _ in range(3)]
    bad = new_event(tenant="acme", stream="s", kind="k", data={}, expected_seq=0)
    with pytest.raises(ExpectedSeqMismatch):
        await ledger.append_batch([*good, bad], wait=True)
    assert check_ledger(worker.db_path).events == 1
    assert query(worker.db_path, "SELECT count(*) FROM rejections") == [(1,)]


async def test_retrying_a_stored_batch_is_a_duplicate(ledger: LedgerClient) -> None:
    batch = [new_event(tenant="acme", stream="s", kind="k", data={"i": i}) for i in range(3)]
    await ledger.append_batch(batch, wait=True)
    again = await ledger.append_batch(batch, wait=True)
    assert [r.outcome for r in again] == ["duplicate"] * 3
    assert [r.seq for r in again] == [1, 2, 3]


async def test_batch_overlapping_stored_events_is_refused_whole(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    stored = new_event(tenant="acme", stream="s", kind="k", data={})
    await ledger.append(stored, wait=True)
    fresh = new_event(tenant="acme", stream="s", kind="k", data={})
    with pytest.raises(ConflictError, match="part of this atomic batch is already stored"):
        await ledger.append_batch([stored, fresh], wait=True)
    assert check_ledger(worker.db_path).events == 1


async def test_batch_conflicting_with_stored_content_is_refused(ledger: LedgerClient) -> None:
    stored = new_event(tenant="acme", stream="s", kind="k", data={"v": 1})
    await ledger.append(stored, wait=True)
    with pytest.raises(ConflictError):
        await ledger.append_batch([msgspec.structs.replace(stored, data={"v": 2})], wait=True)

