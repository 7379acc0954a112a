"""Publishing under faults: a publish whose reply is lost (case 9) ends in a definite outcome
or in `OutcomeUnknown`, never in a silent drop; and events too large for the bus (case 16)
get a clear error, without the server dropping the producer's connection."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from harness import (
    STREAM,
    ProducerLedger,
    WorkerProcess,
    admin_connect,
    append_definitely,
    ledger_client,
    make_event,
    provision,
    read_stream,
    verify,
    wait_drained,
)

from jetledger.client import (
    EventTooLarge,
    JetledgerError,
    LedgerClient,
    OutcomeUnknown,
    new_event,
)
from jetledger.worker import WorkerConfig
from jetledger.worker.jetstream import stream_config
from jetledger.worker.natsserver import NatsServer, NatsServerConfig

TIMEOUT = 0.3  # the client's per-attempt publish timeout here
ATTEMPTS = 3
#: Longest an append may take before it must have answered: every attempt times out, plus
#: the client's backoff after each (0.1 s, 0.2 s, 0.4 s), plus slack for a loaded machine.
BUDGET = TIMEOUT * ATTEMPTS + 0.7 + 1.0


@pytest.mark.parametrize(
    ("pause", "expect"),
    # Pauses well inside the client's retries (the third attempt times out 1.2 s in), or
    # (None) until the client has given up: a fixed long pause would race a stalled event
    # loop, whose late timers can fire the test's resume before the client's last timeout.
    [(0.15, "acked"), (0.5, "acked"), (None, "unknown")],
    ids=["within-one-timeout", "within-the-retries", "beyond-the-retries"],
)
async def test_publish_whose_reply_is_lost_is_definite_or_outcome_unknown_never_silent(
    nats_server: NatsServer, tmp_path: Path, pause: float | None, expect: str
) -> None:
    """The server is frozen (SIGSTOP) while an append is in flight and thawed after `pause`
    seconds (None: once the client gave up).
    Publishes queued in the socket are then stored and answered, but answers to attempts the
    client gave up on are lost. The client retries with the same bytes: within its budget it
    returns the stored outcome; beyond it, it raises OutcomeUnknown, and appending again
    with the same event gives one row."""
    url = nats_server.url
    await provision(url)
    worker = WorkerProcess(url, tmp_path / "ledger")
    worker.start()
    ledger = ProducerLedger()
    outcomes: list[str] = []
    try:
        async with await ledger_client(url, timeout=TIMEOUT, attempts=ATTEMPTS) as client:
            for i in range(3):  # bounded: three frozen appends
                event = make_event(i, tag=f"pause{int((pause or 9) * 10)}-")
                rec = ledger.attempt(event)
                nats_server.pause()
                started = time.monotonic()
                task = asyncio.create_task(client.append(event))
                try:
                    # Bounded either way: an append gives up within BUDGET.
                    await asyncio.wait({task}, timeout=pause if pause is not None else BUDGET)
                finally:
                    nats_server.resume()
                try:
                    result = await task
                except OutcomeUnknown:
                    outcomes.append("unknown")
                    ledger.settle(rec, "unknown")
                    # The producer's move: append the same event again until definite.
                    state = await append_definitely(client, event, ledger,
                                                    deadline=time.monotonic() + 10)
                    assert state == "acked"
                else:
                    outcomes.append("acked")
                    ledger.settle(rec, "acked", result.js_seq)
                assert time.monotonic() - started < BUDGET + 1.0, \
                    "the append did not answer within its bounded budget"
        drained = await wait_drained(url, worker.data_dir / "ledger.db", timeout=20)
        msgs = await read_stream(url)
    finally:
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    assert outcomes == [expect] * 3
    verdict = verify(worker.data_dir / "ledger.db", ledger, stream_msgs=msgs).assert_clean()
    assert verdict.events == 3
    print(f"\ncase 9 pause={pause}s: outcomes={outcomes} js_copies={verdict.js_messages} "
          f"{verdict.summary()} consumer={drained}")


# --- case 16: too large ---------------------------------------------------------------------

MAX_PAYLOAD = 64 * 1024  # configured on the server below (the default is 1 MiB)
STREAM_MAX_MSG = 16 * 1024


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[NatsServer]:
    srv = NatsServer(NatsServerConfig(store_dir=tmp_path / "nats", max_payload=MAX_PAYLOAD))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def _event_of(size: int, i: int) -> object:
    """An event whose MessagePack encoding is exactly `size` bytes."""
    probe = new_event(tenant="acme", stream="big", kind="blob", id=f"big{i:04d}",
                      data={"b": ""})
    base = len(msgspec.msgpack.encode(probe))
    for pad in range(size - base, size - base - 8, -1):  # str headers grow by a byte or two
        event = msgspec.structs.replace(probe, data={"b": "x" * pad})
        if len(msgspec.msgpack.encode(event)) == size:
            return event
    raise AssertionError(f"cannot build an event of {size} bytes")


def _largest_accepted(client: LedgerClient, i: int, *, wait: bool) -> int:
    """Binary search for the largest event the client agrees to send."""
    lo, hi = 1_000, MAX_PAYLOAD
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            client_size_check(client, _event_of(mid, i), wait=wait)
        except EventTooLarge:
            hi = mid - 1
        else:
            lo = mid
    return lo


def client_size_check(client: LedgerClient, event: object, *, wait: bool) -> None:
    """What the client does before sending, without sending: its size check alone."""
    from jetledger.client.client import _header_bytes  # the client's own accounting
    from jetledger.schemas import CONTENT_TYPE, HEADER_NOTIFY, MSGPACK, Subjects, encode

    headers = {CONTENT_TYPE: MSGPACK}
    if wait:
        headers[HEADER_NOTIFY] = "_INBOX.XXXXXXXXXXXXXXXXXXXXXX.XXXXXXXXXXXXXXXXXXXXXX"
    subject = Subjects().event("acme", "blob")
    size = len(encode(event)) + _header_bytes(headers) + len(subject)
    if size > client._nc.max_payload:
        raise EventTooLarge(f"{size}")


async def test_events_too_large_for_the_bus_get_a_clear_error_and_the_connection_survives(
    small_server: NatsServer, tmp_path: Path
) -> None:
    """Case 16 on a server with max_payload 64 KiB and a stream with max_msg_size 16 KiB:
    over max_payload, payload under it but with headers over it, and over the stream's limit:
    each a clear error; what fits right up to the limits is stored; no dropped connection."""
    url = small_server.url
    await provision(url)
    admin = await admin_connect(url)
    worker = WorkerProcess(url, tmp_path / "ledger")
    worker.start()
    ledger = ProducerLedger()
    try:
        client = await ledger_client(url, timeout=2.0)
        async with client:
            nc = client._nc
            assert nc.max_payload == MAX_PAYLOAD
            # 1. Payload alone over max_payload: refused before sending.
            with pytest.raises(EventTooLarge, match="max_payload"):
                await client.append(_event_of(MAX_PAYLOAD + 10, 0))  # type: ignore[arg-type]
            # 2. Payload under max_payload, payload + headers over it, with and without the
            #    notify inbox header that `wait=True` adds.
            for n, wait in enumerate((False, True), start=1):
                with pytest.raises(EventTooLarge, match="payload \\+ headers"):
                    await client.append(_event_of(MAX_PAYLOAD - 20, n),  # type: ignore[arg-type]
                                        wait=wait)
            # ... and the largest event the client accepts really goes through: its size
            # check is not laxer than the server's (else the server drops the connection).
            for n, wait in enumerate((False, True), start=3):
                size = _largest_accepted(client, n, wait=wait)
                assert size > MAX_PAYLOAD - 300
                state = await append_definitely(client, _event_of(size, n), ledger,
                                                deadline=time.monotonic() + 10, wait=wait)
                assert state == "acked"
            # 3. The stream's own limit, set by an operator (admin step) below max_payload.
            cfg = WorkerConfig(nats_url=url)
            await admin.jetstream().update_stream(stream_config(cfg, max_msg_size=STREAM_MAX_MSG))
            before = (await admin.jetstream().stream_info(STREAM)).state.messages
            with pytest.raises(JetledgerError, match="maximum") as err:
                await client.append(_event_of(STREAM_MAX_MSG + 100, 5))  # type: ignore[arg-type]
            assert not isinstance(err.value, OutcomeUnknown)  # definite: not stored
            assert (await admin.jetstream().stream_info(STREAM)).state.messages == before
            # Nothing above dropped the producer's connection, and it still works.
            small = make_event(0, tag="after-")
            assert await append_definitely(client, small, ledger,
                                           deadline=time.monotonic() + 10) == "acked"
            assert nc.is_connected and nc.stats["reconnects"] == 0
        drained = await wait_drained(url, worker.data_dir / "ledger.db", timeout=20)
        msgs = await read_stream(url)
    finally:
        await admin.close()
        code = worker.stop()
        worker.close()
    assert code == 0, worker.log_tail()
    verdict = verify(worker.data_dir / "ledger.db", ledger, stream_msgs=msgs).assert_clean()
    assert verdict.events == 3
    print(f"\ncase 16: refused=4 stored_at_the_limit=2 {verdict.summary()} "
          f"stream_error={type(err.value).__name__}: {err.value} consumer={drained}")


async def test_event_over_the_streams_max_msg_size_is_event_too_large(
    small_server: NatsServer,
) -> None:
    url = small_server.url
    await provision(url)
    admin = await admin_connect(url)
    try:
        await admin.jetstream().update_stream(
            stream_config(WorkerConfig(nats_url=url), max_msg_size=STREAM_MAX_MSG))
        async with await ledger_client(url) as client:
            with pytest.raises(EventTooLarge):
                await client.append(_event_of(STREAM_MAX_MSG + 100, 0))  # type: ignore[arg-type]
    finally:
        await admin.close()
