"""Case 17: a handler bug for one kind raises every time (the test-only hook
JETLEDGER_FAULT_KIND in worker/faults.py). Each such message ends as a rejection with code
"internal" after a bounded number of tries; the events around it, in the same batches, are
stored as usual and in order; nothing is acked without a row, nothing is redelivered."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import (
    ProducerLedger,
    WorkerProcess,
    append_definitely,
    ledger_client,
    make_event,
    provision,
    query,
    read_stream,
    verify,
    wait_drained,
)

from jetledger.client import InternalError, new_event
from jetledger.worker.consumer import POISON_ATTEMPTS
from jetledger.worker.natsserver import NatsServer

POISON_KIND = "boom"
EVENTS = 600
POISON_EVERY = 97  # a poison event after every 97 good ones: several per batch of 100


async def test_a_kind_whose_handler_always_fails_becomes_internal_rejections_and_holds_up_nothing(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    url = nats_server.url
    await provision(url)
    worker = WorkerProcess(url, tmp_path / "ledger", extra_args=("--batch-size", "100"),
                           env={"JETLEDGER_FAULT_KIND": POISON_KIND})
    worker.start()
    db = worker.data_dir / "ledger.db"
    ledger = ProducerLedger()
    poison: list[tuple[str, str | None]] = []
    try:
        async with await ledger_client(url, timeout=2.0) as client:
            deadline = time.monotonic() + 30
            for i in range(EVENTS):
                await append_definitely(client, make_event(i), ledger, deadline=deadline)
                if i % POISON_EVERY == POISON_EVERY - 1:
                    bad = new_event(tenant="acme", stream="run-0", kind=POISON_KIND,
                                    id=f"poison{i:04d}", data={"i": i})
                    assert await append_definitely(client, bad, ledger,
                                                   deadline=deadline) == "acked"
                    ledger.must_not_be_stored(bad)
                    poison.append(("acme", bad.id))
            # An atomic batch holding one poison event: rejected whole, under no single id.
            batch = [make_event(EVENTS + k, tag="batch-", tenants=("globex",))
                     for k in range(3)]
            batch.insert(1, new_event(tenant="globex", stream="run-1", kind=POISON_KIND,
                                      id="poison-in-batch", data={}))
            assert await append_definitely(client, batch, ledger, deadline=deadline) == "acked"
            for e in batch:
                ledger.must_not_be_stored(e)
            poison.append(("globex", None))
            # A producer that waits is told, with the "internal" code, not left hanging.
            waited = new_event(tenant="initech", stream="run-2", kind=POISON_KIND,
                               id="poison-waited", data={})
            ledger.must_not_be_stored(waited)
            started = time.monotonic()
            with pytest.raises(InternalError, match=f"{POISON_ATTEMPTS} times"):
                await client.append(waited, wait=True, timeout=10)
            told_after = time.monotonic() - started
            poison.append(("initech", "poison-waited"))
            # And the events published after all that are stored as usual.
            for i in range(EVENTS + 10, EVENTS + 60):
                await append_definitely(client, make_event(i), ledger, deadline=deadline)
        for tenant, event_id in poison:
            ledger.expect_rejection(tenant, event_id, "internal")
        drained = await wait_drained(url, db, timeout=30)
        msgs = await read_stream(url)
    finally:
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(db, ledger, stream_msgs=msgs).assert_clean()
    assert verdict.rejections == len(poison)
    reasons = {r[0] for r in query(db, "SELECT reason FROM rejections")}
    assert all("RuntimeError" in r and "see the worker log" in r for r in reasons), reasons
    # Bounded: exactly POISON_ATTEMPTS tries per poison message, no redelivery loop.
    tries = worker.log_count(r"failed \(try \d+ of \d+\)")
    assert tries == POISON_ATTEMPTS * len(poison), worker.log_tail()
    assert drained["num_redelivered"] == 0 and drained["num_ack_pending"] == 0
    stats = worker.stats()
    assert stats["poisoned"] == len(poison) and stats["redelivered"] == 0
    assert told_after < 5, f"the waiting producer was told only after {told_after:.1f}s"
    print(f"\ncase 17: poison={len(poison)} tries={tries} told_waiting_producer_after="
          f"{told_after:.2f}s {verdict.summary()} worker={stats} consumer={drained}")
