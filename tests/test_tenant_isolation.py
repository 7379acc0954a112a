"""One tenant can neither suppress, overwrite nor read another tenant's events."""

from __future__ import annotations

import asyncio

import nats
import pytest
from conftest import RunningWorker
from harness import check_ledger, query

from jetledger.client import LedgerClient, NotFound, encode, new_event


async def test_msg_id_squatting_cannot_suppress_another_tenants_event(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    """The trap: JetStream's Nats-Msg-Id dedupe is stream-wide and keyed on the header alone.
    A hostile tenant publishes first with the id the victim will use; the victim's event must
    still be stored (the client never sends Nats-Msg-Id; identity is (tenant, id) in SQLite)."""
    victim_event = new_event(tenant="victim", stream="run", kind="k", data={"real": True})
    attacker = await nats.connect(worker.url)
    try:
        js = attacker.jetstream()
        for msg_id in (victim_event.id, f"victim:{victim_event.id}",
                       f"victim.{victim_event.id}"):
            decoy = new_event(tenant="attacker", id=victim_event.id, stream="run", kind="k",
                              data={"real": False})
            await js.publish("jetledger.evt.attacker.k", encode(decoy),
                             headers={"Nats-Msg-Id": msg_id})
    finally:
        await attacker.close()
    result = await ledger.append(victim_event, wait=True)
    assert result.outcome == "inserted"
    stored = await ledger.get(victim_event.id, tenant="victim")
    assert stored.data == {"real": True}
    # And the attacker's copy lives only in the attacker's tenant.
    assert (await ledger.get(victim_event.id, tenant="attacker")).data == {"real": False}
    check_ledger(worker.db_path)


async def test_envelope_naming_another_tenant_is_rejected_and_stored_under_neither(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    forged = new_event(tenant="victim", stream="run", kind="k", data={})
    nc = await nats.connect(worker.url)
    try:
        await nc.jetstream().publish("jetledger.evt.attacker.k", encode(forged))
    finally:
        await nc.close()
    for _ in range(100):
        rows = query(worker.db_path, "SELECT tenant, code, reason FROM rejections")
        if rows:
            break
        await asyncio.sleep(0.05)
    assert len(rows) == 1
    tenant, code, reason = rows[0]
    assert (tenant, code) == ("attacker", "invalid_event")
    assert "differs from subject tenant" in reason
    for tenant in ("victim", "attacker"):
        with pytest.raises(NotFound):
            await ledger.get(forged.id, tenant=tenant)
    assert check_ledger(worker.db_path).events == 0


async def test_queries_only_see_the_asking_tenant(ledger: LedgerClient) -> None:
    a = await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
    b = await ledger.append(new_event(tenant="globex", stream="s", kind="k", data={}),
                            wait=True)
    assert [e.id for e in (await ledger.events()).events] == [a.id]
    assert [e.id for e in (await ledger.events(tenant="globex")).events] == [b.id]
    with pytest.raises(NotFound):
        await ledger.get(b.id)  # bound to acme
    assert [s.seq for s in (await ledger.streams()).streams] == [1]
    assert (await ledger.stream_head("s", tenant="globex")).last_position == 2


async def test_outcomes_go_only_to_a_reply_inbox(
    ledger: LedgerClient, worker: RunningWorker
) -> None:
    """`Jetledger-Notify` is producer-chosen and the worker may publish where producers may
    not: pointing it at another tenant's live subject, the consumer's ack subject or any
    subject that is not a reply inbox must not make the worker publish there."""
    spy = await nats.connect(worker.url)
    producer = await nats.connect(worker.url)
    try:
        received: list[str] = []

        async def record(msg: object) -> None:
            received.append(getattr(msg, "subject", "?"))

        targets = ["jetledger.live.globex", "$JS.ACK.JETLEDGER.x", "_INBOX",
                   "_INBOXES.x", "anything.else"]
        for target in targets:
            await spy.subscribe(target, cb=record)
        own = "_INBOX_acme.mine"
        await spy.subscribe(own, cb=record)
        await spy.flush()
        js = producer.jetstream()
        for target in [*targets, own]:
            event = new_event(tenant="acme", stream="s", kind="k", data={"to": target})
            await js.publish("jetledger.evt.acme.k", encode(event),
                             headers={"Jetledger-Notify": target})
        await ledger.append(new_event(tenant="acme", stream="s", kind="k", data={}), wait=True)
        await asyncio.sleep(0.2)
    finally:
        await spy.close()
        await producer.close()
    assert received == [own], received
    assert check_ledger(worker.db_path).events == len(targets) + 2
