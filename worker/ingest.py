"""Turn one consumed JetStream message into what the writer commits: events or a rejection.

Pure and synchronous: no I/O here, so every kind of bad input is decided the same way on
first delivery and on every redelivery.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import msgspec

from jetledger.schemas import Event, Subjects
from jetledger.schemas.codec import (
    canonical_bytes,
    content_type_of,
    decode,
    decode_batch,
    decode_event,
)
from jetledger.schemas.errors import InvalidEvent, InvalidToken, JetledgerError

from .faults import handler_fault

__all__ = ["Candidate", "Decoded", "decode_message", "peek_event_id"]


@dataclass(slots=True)
class Candidate:
    """A valid event, in its canonical stored form."""

    event: Event
    body: bytes
    content_hash: bytes


@dataclass(slots=True)
class Decoded:
    """One consumed message. `error` set means the whole message becomes one rejection."""

    js_seq: int
    subject: str
    raw: bytes
    headers: dict[str, str] | None
    tenant: str | None = None
    events: list[Candidate] = field(default_factory=list)
    error: JetledgerError | None = None
    #: The event id a rejection should name when `events` could not be built.
    reject_id: str | None = None


    @property
    def event_id(self) -> str | None:
        if self.reject_id is not None:
            return self.reject_id
        return self.events[0].event.id if len(self.events) == 1 else None


def _candidate(event: Event) -> Candidate:
    body = canonical_bytes(event)
    return Candidate(event, body, hashlib.sha256(body).digest())


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
            batch = decode_batch(data, content_type, strict=strict)
            events = batch.events
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
        out.events = [_candidate(e) for e in events]
    except (InvalidEvent, InvalidToken) as exc:
        out.events = []
        out.error = exc
    return out


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
