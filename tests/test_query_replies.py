"""Query replies carry stored events byte for byte as if each had been decoded and re-encoded.

The worker builds MessagePack replies by splicing the stored body (the canonical MessagePack
of the `Event`) with the fields it assigned, without decoding. These tests hold that shortcut
to the slow path it replaces (decode the body, build the `StoredEvent`, encode it): the same
bytes, hence the same decoded `StoredEvent`, for every registered payload kind, for unknown
kinds, and with and without every optional field; and over NATS, for every op that returns
events, in both encodings.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import msgspec.inspect
import nats
import pytest
from conftest import RunningWorker

from jetledger.client import LedgerClient, new_event
from jetledger.schemas import Event, StoredEvent
from jetledger.schemas.codec import canonical_bytes, normalize_event
from jetledger.schemas.payloads import PAYLOADS, Payload, register_payload
from jetledger.schemas.queries import EventsPage, StreamHead, StreamRecord
from jetledger.worker.reader import Row, spliced_event, stored_event
from jetledger.worker.times import from_micros, to_micros

T0 = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


def slow_path(row: Row) -> StoredEvent:
    """What the reader did before splicing, spelled out independently of it."""
    ev = msgspec.msgpack.decode(row[0], type=Event)
    return StoredEvent(**msgspec.structs.asdict(ev), seq=row[1], position=row[2],
                       recorded_at=from_micros(row[3]), js_seq=row[4])


def _value(t: msgspec.inspect.Type, depth: int = 0) -> Any:
    """A non-default value of an inspected type (for filling every field of a payload)."""
    if isinstance(t, msgspec.inspect.UnionType):
        return _value(next(x for x in t.types if not isinstance(x, msgspec.inspect.NoneType)),
                      depth)
    if isinstance(t, msgspec.inspect.StrType):
        return "välue-ü"
    if isinstance(t, msgspec.inspect.BoolType):
        return True
    if isinstance(t, msgspec.inspect.IntType):
        return 70_000  # not a fixint: a multi-byte integer
    if isinstance(t, msgspec.inspect.FloatType):
        return 0.1
    if isinstance(t, msgspec.inspect.DateTimeType):
        return T0 + timedelta(days=3)
    if isinstance(t, msgspec.inspect.ListType):
        return [_value(t.item_type, depth + 1), _value(t.item_type, depth + 1)]
    if isinstance(t, msgspec.inspect.DictType):
        return {"z": 1, "a": [None, 2.5, {"n": "x"}], "m": {"k": T0}}
    if isinstance(t, msgspec.inspect.AnyType):
        return {"b": b"\x00\xff", "a": -1, "nested": [1, "two", {"three": 3.0}]}
    raise AssertionError(f"no sample value for {t!r}: extend _value")


def _payloads(cls: type[Payload]) -> Iterator[tuple[str, Payload]]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    required = {f.name: _value(f.type) for f in info.fields if f.required}
    yield "required fields only", msgspec.convert(required, cls)
    every = {f.name: _value(f.type) for f in info.fields}
    yield "every field", msgspec.convert(every, cls)


def _events() -> Iterator[tuple[str, Event]]:
    n = 0

    def event(kind: str, data: Any, **extra: Any) -> Event:
        nonlocal n
        n += 1
        fields: dict[str, Any] = {"stream": f"s-{n}", **extra}
        return normalize_event(Event(id=f"01J{n:023d}", tenant="acme", kind=kind,
                                     occurred_at=T0, data=data, **fields))

    for kind, cls in sorted(PAYLOADS.items()):
        for label, payload in _payloads(cls):
            yield f"{kind}, {label}", event(kind, payload)
    unknown: dict[str, Any] = {
        "empty data": {},
        "flat data": {"b": 1, "a": "x"},
        "nested data": {"z": {"y": [1, 2, {"x": None}]}, "t": T0, "f": 1.25, "bin": b"\x80"},
        # Bytes that look like an empty "data" map inside a value: served correctly too.
        "data-like bytes": {"raw": b"\xa4data\x80"},
        "non-ascii": {"ключ": "значение", "emoji": "\U0001f600"},
    }
    for label, data in unknown.items():
        yield f"unknown kind, {label}", event("custom_thing", data)
    everything = {"correlation_id": "corr-1", "causation_id": "cause-1", "expected_seq": 0}
    yield "every optional envelope field", event("custom_thing", {"a": 1}, **everything)
    yield "expected_seq > 0", event("step_started", {"step_id": "s", "name": "n"},
                                    expected_seq=300)
    yield "another envelope version", event("custom_thing", {"a": 1}, v=2)
    yield "long stream name", event("custom_thing", {}, stream="s" * 256)


EVENTS = dict(_events())
ASSIGNED = [  # seq, position, recorded_at (µs), js_seq: small and wide integers and times
    (1, 1, to_micros(T0), 1),
    (2, 2, to_micros(T0.replace(microsecond=0)), 2),  # whole seconds: the 32-bit timestamp
    (127, 128, to_micros(T0 + timedelta(microseconds=1)), 65_536),
    (2**31, 2**40, to_micros(datetime(2106, 2, 8, tzinfo=UTC)), 2**63 - 1),
    (5, 9, to_micros(datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)), 3),
]


def _row(event: Event, assigned: tuple[int, int, int, int]) -> Row:
    seq, position, recorded_at, js_seq = assigned
    return (canonical_bytes(event), seq, position, recorded_at, js_seq,
            to_micros(event.occurred_at))


def test_every_registered_kind_is_covered() -> None:
    covered = {e.kind for e in EVENTS.values()}
    assert set(PAYLOADS) <= covered


@pytest.mark.parametrize("assigned", ASSIGNED, ids=lambda a: f"position {a[1]}")
@pytest.mark.parametrize("label", list(EVENTS))
def test_spliced_bytes_are_the_stored_event_encoded(
    label: str, assigned: tuple[int, int, int, int]
) -> None:
    row = _row(EVENTS[label], assigned)
    expected = slow_path(row)
    spliced = spliced_event(row)
    assert spliced == msgspec.msgpack.encode(expected)
    assert msgspec.msgpack.decode(spliced, type=StoredEvent) == expected
    assert stored_event(row) == expected  # the JSON path's events


def test_a_payload_whose_fields_are_all_defaults_matches_too() -> None:
    """Its stored `data` is an empty map, which the decoded `StoredEvent` omits as default:
    the splice must not keep it."""

    @register_payload
    class Heartbeat(Payload):
        kind = "zz_test_heartbeat"
        note: str = ""

    try:
        event = normalize_event(Event(id="hb", tenant="acme", kind=Heartbeat.kind,
                                      stream="hb", occurred_at=T0, data={}))
        assert b"\xa4data\x80" in canonical_bytes(event)
        row = _row(event, ASSIGNED[1])
        assert spliced_event(row) == msgspec.msgpack.encode(slow_path(row))
    finally:
        del PAYLOADS[Heartbeat.kind]


# --- over NATS: the replies themselves --------------------------------------------------


def _stored_rows(db_path: Any, where: str = "1", params: tuple[Any, ...] = ()) -> list[Row]:
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT body, seq, position, recorded_at, js_seq, occurred_at FROM events"
            f" WHERE {where} ORDER BY position", params).fetchall()
    finally:
        conn.close()


async def _fill(ledger: LedgerClient) -> None:
    for label, ev in EVENTS.items():
        if ev.expected_seq is not None or ev.v != 1:
            continue  # conditional appends and other versions: covered above
        await ledger.append(new_event(
            tenant="acme", stream="mixed" if "required" in label else "other",
            kind=ev.kind, data=ev.data, occurred_at=ev.occurred_at,
            correlation_id=ev.correlation_id, causation_id=ev.causation_id), wait=True)


@pytest.mark.parametrize("content_type", ["application/msgpack", "application/json"])
async def test_replies_with_events_are_the_slow_path_bytes(
    worker: RunningWorker, ledger: LedgerClient, content_type: str
) -> None:
    await _fill(ledger)
    rows = _stored_rows(worker.db_path)
    assert len(rows) > 40
    json = content_type == "application/json"

    def enc(obj: Any) -> bytes:
        return msgspec.json.encode(obj) if json else msgspec.msgpack.encode(obj)

    def dec(data: bytes, type_: type[EventsPage]) -> EventsPage:
        return msgspec.json.decode(data, type=type_) if json else msgspec.msgpack.decode(
            data, type=type_)

    def req(body: dict[str, Any]) -> bytes:
        return msgspec.json.encode(body) if json else msgspec.msgpack.encode(body)

    nc = await nats.connect(worker.url)
    try:
        async def ask(op: str, body: dict[str, Any]) -> bytes:
            msg = await nc.request(f"jetledger.q.acme.{op}", req(body), timeout=5,
                                   headers={"Content-Type": content_type})
            assert msg.headers is None or "Nats-Service-Error" not in msg.headers, msg.data
            return bytes(msg.data)

        page = await ask("events", {"limit": 1000})
        assert page == enc(EventsPage(events=[slow_path(r) for r in rows]))
        for body, served in (({"limit": 7, "order": "desc"}, rows[::-1][:7]),
                             ({"limit": 5, "order_by": "occurred_at"}, rows[:5])):
            cut = await ask("events", body)
            cursor = dec(cut, EventsPage).next_cursor
            assert cursor is not None
            assert cut == enc(EventsPage(events=[slow_path(r) for r in served],
                                         next_cursor=cursor))
        for row in rows[:3] + rows[-3:]:
            event = slow_path(row)
            assert await ask("get", {"id": event.id}) == enc(event)
        head = msgspec.msgpack.decode(
            (await nc.request("jetledger.q.acme.head", msgspec.msgpack.encode(
                {"stream": "mixed"}), timeout=5)).data, type=StreamHead)
        mixed = [r for r in rows if slow_path(r).stream == "mixed"]
        record = await ask("stream", {"stream": "mixed"})
        assert record == enc(StreamRecord(head=head, first=slow_path(mixed[0]),
                                          last=slow_path(mixed[-1])))
    finally:
        await nc.close()


async def test_the_client_gets_what_was_stored(worker: RunningWorker,
                                               ledger: LedgerClient) -> None:
    await _fill(ledger)
    rows = _stored_rows(worker.db_path)
    expected = [slow_path(r) for r in rows]
    assert [e async for e in ledger.iter_events(limit=9)] == expected
    assert await ledger.get(expected[4].id) == expected[4]


def test_recorded_at_encodes_as_msgspec_encodes_the_datetime() -> None:
    """Every form of the MessagePack timestamp (32, 64, 96 bits) and the edges between."""
    from jetledger.worker.reader import _timestamp

    first = to_micros(datetime(1, 1, 1, tzinfo=UTC))
    last = to_micros(datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC))
    edges = [0, 1, 999_999, 1_000_000, -1, -1_000_000, -1_000_001,
             (2**32 - 1) * 10**6, 2**32 * 10**6, (2**32 - 1) * 10**6 + 1,
             (2**34 - 1) * 10**6 + 999_999, 2**34 * 10**6, first, last]
    rng = random.Random(7)
    values = edges + [rng.randrange(first, last) for _ in range(3000)] + [
        rng.randrange(-(2**35) * 10**6, 2**35 * 10**6) for _ in range(3000)]
    for micros in values:
        expected = msgspec.msgpack.encode(from_micros(micros))
        assert msgspec.msgpack.encode(_timestamp(micros)) == expected, micros


def test_ordinary_events_are_spliced_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    from jetledger.worker import reader

    def no_decoding(row: Row) -> StoredEvent:
        raise AssertionError("decoded: the splice fell back to the slow path")

    monkeypatch.setattr(reader, "stored_event", no_decoding)
    for label, event in EVENTS.items():
        if label != "unknown kind, data-like bytes":
            spliced_event(_row(event, ASSIGNED[0]))
