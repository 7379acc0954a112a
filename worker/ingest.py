"""Turn one consumed JetStream message into what the writer commits: events or a rejection.

Pure and synchronous: no I/O here, so every kind of bad input is decided the same way on
first delivery and on every redelivery.

A bundle (an `EventBatch` with `atomic=False`) is decided event by event: an event of it that
is not valid becomes a `BadItem` (a rejection of that event alone) while the others go on.
Only a frame that does not decode, or an event naming another tenant, rejects it whole.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec

from jetledger.schemas import Event, Subjects
from jetledger.schemas.codec import (
    batch_items,
    canonical_bytes,
    content_type_of,
    decode,
    decode_batch,
    decode_event,
)
from jetledger.schemas.errors import InvalidEvent, InvalidToken, JetledgerError

from .faults import handler_fault

__all__ = ["BadItem", "Candidate", "Decoded", "decode_message", "peek_event_id"]


@dataclass(slots=True)
class Candidate:
    """A valid event, in its canonical stored form."""

    event: Event
    body: bytes
    content_hash: bytes
    #: Its place in a bundle, from 1 (the `item` of its rejection row); 0 outside bundles.
    item: int = 0


@dataclass(slots=True)
class BadItem:
    """An event of a bundle that is not valid: rejected alone, the others go on."""

    item: int  # from 1, as `Candidate.item`
    raw: bytes  # that event's bytes, in the message's content type
    event_id: str | None
    error: JetledgerError


@dataclass(slots=True)
class Decoded:
    """One consumed message. `error` set means the whole message becomes one rejection.

    `bundle`: the events are decided one by one (in `item` order, `events` and `bad`
    together), not all or nothing."""

    js_seq: int
    subject: str
    raw: bytes
    headers: dict[str, str] | None
    tenant: str | None = None
    events: list[Candidate] = field(default_factory=list)
    error: JetledgerError | None = None
    #: The event id a rejection should name when `events` could not be built.
    reject_id: str | None = None
    bundle: bool = False
    bad: list[BadItem] = field(default_factory=list)
    _raws: list[bytes] | None = None

    def items(self) -> list[Candidate | BadItem]:
        """A bundle's events, valid or not, in their order in the message."""
        if not self.bad:
            return list(self.events)
        merged: list[Candidate | BadItem] = [*self.events, *self.bad]
        merged.sort(key=lambda x: x.item)
        return merged

    def item_raw(self, item: int) -> bytes:
        """The bytes of a bundle's `item`-th event as it arrived (for its rejection row)."""
        if self._raws is None:
            self._raws, _ = batch_items(self.raw, content_type_of(self.headers))
        return self._raws[item - 1]


    @property
    def event_id(self) -> str | None:
        if self.reject_id is not None:
            return self.reject_id
        return self.events[0].event.id if len(self.events) == 1 else None


def _candidate(event: Event, item: int = 0) -> Candidate:
    body = canonical_bytes(event)
    return Candidate(event, body, hashlib.sha256(body).digest(), item)


def decode_message(
    subjects: Subjects,
    subject: str,
    data: bytes,
    headers: dict[str, str] | None,
    js_seq: int,
    *,
    strict: bool = False,
) -> Decoded:
    out = Decoded(js_seq=js_seq, subject=subject, raw=data, headers=headers)
    try:
        where = subjects.parse_ingest(subject)
        out.tenant = where.tenant
        content_type = content_type_of(headers)
        if where.kind is None:
            try:
                batch = decode_batch(data, content_type, strict=strict)
            except InvalidEvent:
                # An atomic batch with one bad event is refused whole; a bundle only if its
                # frame is bad: then this raises, else its bad events are set aside.
                raws, atomic = batch_items(data, content_type)
                if atomic:
                    raise
                events, items = _bundle_events(out, raws, content_type, strict)
            else:
                out.bundle = not batch.atomic
                events = batch.events
                items = list(range(1, len(events) + 1)) if out.bundle else [0] * len(events)
            if not out.bundle:
                ids = [e.id for e in events]
                if len(set(ids)) != len(ids):
                    raise InvalidEvent("a batch must not contain the same event id twice")
        else:
            event = decode_event(data, content_type, strict=strict)
            if event.kind != where.kind:
                raise InvalidEvent(
                    f"envelope kind {event.kind!r} differs from subject kind {where.kind!r}"
                )
            events = [event]
            items = [0]
        for event in events:
            # The subject is what bus permissions control: a producer may only write
            # its own tenant, so an envelope naming another tenant is refused outright.
            if event.tenant != where.tenant:
                raise InvalidEvent(
                    f"envelope tenant {event.tenant!r} differs from subject tenant "
                    f"{where.tenant!r}; nothing was stored under either"
                )
        for event in events:
            handler_fault(event.kind)  # test-only: raises for JETLEDGER_FAULT_KIND
        out.events = [_candidate(e, i) for e, i in zip(events, items, strict=True)]
    except (InvalidEvent, InvalidToken) as exc:
        out.events = []
        out.bad = []
        out.error = exc
    return out


def _bundle_events(out: Decoded, raws: list[bytes], content_type: str, strict: bool
                   ) -> tuple[list[Event], list[int]]:
    """Decode a bundle event by event: the valid ones are returned with their items, each
    invalid one goes to `out.bad` with its bytes (slow path: only when one is invalid)."""
    out.bundle = True
    events: list[Event] = []
    items: list[int] = []
    for item, raw in enumerate(raws, start=1):
        try:
            events.append(decode_event(raw, content_type, strict=strict))
            items.append(item)
        except InvalidEvent as exc:
            out.bad.append(BadItem(item, raw, _peek_id(raw, content_type), exc))
    return events, items


class _IdOnly(msgspec.Struct):
    id: str


def _peek_id(raw: bytes, content_type: str) -> str | None:
    try:
        found = decode(raw, _IdOnly, content_type).id
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return found if isinstance(found, str) and 0 < len(found) <= 128 else None


def peek_event_id(subject: str, data: bytes, headers: dict[str, str] | None) -> str | None:
    """The id of a single-event message, read without any validation (for naming a message
    that could not be handled); None for batches and for bytes that are not an envelope."""
    if ".batch." in subject:
        return None
    try:
        event = decode(data, Event, content_type_of(headers))
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    return event.id
