"""Optimistic concurrency: an event with `expected_seq` is stored only at that head."""

from __future__ import annotations

import pytest
from conftest import RunningWorker
from harness import check_ledger, query

from jetledger.client import ExpectedSeqMismatch, LedgerClient, new_event


async def test_expected_seq_matching_the_head_is_stored(ledger: LedgerClient) -> None:
    first = await ledger.append(
        new_event(tenant="acme", stream="s", kind="k", data={}, expected_seq=0), wait=True
    )
    second = await ledger.append(
        new_event(tenant="acme", stream="s", kind="k", data={}, expected_seq=1), wait=True
    )
    assert (first.seq, second.seq) == (1, 2)


async def test_stale_expected_seq_is_rejected_with_the_actual_head(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    for _ in range(3):
        await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
    stale = new_event(tenant="acme", stream="s", kind="k", data={}, expected_seq=1)
    with pytest.raises(ExpectedSeqMismatch, match="is at seq 3, not at the expected 1") as err:
        await ledger.append(stale, wait=True)
    assert err.value.actual_seq == 3 and err.value.event_id == stale.id
    assert query(worker.db_path, "SELECT code, event_id FROM rejections") == [
        ("expected_seq_mismatch", stale.id)
    ]
    assert check_ledger(worker.db_path).events == 3


async def test_two_writers_racing_on_one_head_only_one_wins(ledger: LedgerClient) -> None:
    import asyncio

    contenders = [
        new_event(tenant="acme", stream="race", kind="k", data={"who": i}, expected_seq=0)
        for i in range(5)
    ]
    results = await asyncio.gather(
        *(ledger.append(e, wait=True) for e in contenders), return_exceptions=True
    )
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, ExpectedSeqMismatch)]
    assert len(winners) == 1 and len(losers) == 4
    assert all(r.actual_seq == 1 for r in losers)


async def test_retrying_a_stored_conditional_event_is_a_duplicate_not_a_mismatch(
    ledger: LedgerClient,
) -> None:
    event = new_event(tenant="acme", stream="s", kind="k", data={}, expected_seq=0)
    await ledger.append(event, wait=True)
    assert (await ledger.append(event, wait=True)).outcome == "duplicate"


async def test_a_rejected_message_stays_rejected_when_redelivered_after_the_head_moved(
    tmp_path: object,
) -> None:
    """A redelivery (lost ack, crash after commit, consumer rebuilt from an older floor) must
    not re-decide a message: once rejected for a stale expected_seq, it is never stored later
    just because the head has since reached that seq."""
    from pathlib import Path

    from jetledger.schemas import Subjects, encode
    from jetledger.worker.ingest import decode_message
    from jetledger.worker.writer import LedgerWriter

    assert isinstance(tmp_path, Path)
    writer = await LedgerWriter.open(tmp_path / "ledger.db", js_stream="JETLEDGER")
    subjects = Subjects()

    def msg(js_seq: int, **kw: object) -> object:
        event = new_event(tenant="acme", stream="s", kind="k", data={"n": js_seq}, **kw)  # type: ignore[arg-type]
        return decode_message(subjects, "jetledger.evt.acme.k", encode(event), None, js_seq)

    try:
        early = msg(2, expected_seq=1)
        first = await writer.commit([msg(1), early])  # type: ignore[list-item]
        assert first[1][0].outcome == "inserted"
        stale = msg(3, expected_seq=5)
        (out,) = (await writer.commit([stale]))[0]  # type: ignore[list-item]
        assert (out.outcome, out.code) == ("rejected", "expected_seq_mismatch")
        await writer.commit([msg(4), msg(5), msg(6)])  # type: ignore[list-item]  # head is 5 now
        (again,) = (await writer.commit([stale]))[0]  # type: ignore[list-item]  # redelivery
        assert (again.outcome, again.code) == ("rejected", "expected_seq_mismatch")
    finally:
        await writer.close()
    assert check_ledger(tmp_path / "ledger.db").events == 5
    assert query(tmp_path / "ledger.db", "SELECT count(*) FROM rejections") == [(1,)]
