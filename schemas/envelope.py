"""The event envelope producers send, and the record the worker stores."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
from ulid import ULID

from .errors import InvalidEvent, InvalidToken
from .payloads import Payload, payload_type
from .subjects import TOKEN_PATTERN, check_token

__all__ = [
    "ENVELOPE_VERSION",
    "CommitNotice",
    "Event",
    "EventBatch",
    "MAX_BATCH_EVENTS",
    "Outcome",
    "OutcomeKind",
    "StoredEvent",
    "check_envelope_tokens",
    "new_event",
    "new_id",
    "typed_data",
]

ENVELOPE_VERSION = 1
MAX_BATCH_EVENTS = 1000

Token = Annotated[str, msgspec.Meta(pattern=TOKEN_PATTERN)]
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
StreamName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
AwareTime = Annotated[datetime, msgspec.Meta(tz=True)]
#: `tenant` and `kind` of an envelope. The JSON Schema states the pattern, but msgspec does
#: not run it: its regex ran per value on every decode (1.6 of a 3.7 us event decode, and half
#: a client's decode of a 100-event page). `check_envelope_tokens` checks them instead, once
#: per distinct value, wherever an envelope comes in (`normalize_event`); what the worker
#: serves was checked when it came in.
EnvelopeToken = Annotated[str, msgspec.Meta(extra_json_schema={"pattern": TOKEN_PATTERN})]


class Event(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One event as a producer publishes it.

    `data` is a typed `Payload` for registered kinds, else a mapping. `expected_seq` makes the
    append conditional: stored only if the stream's head is exactly that seq (0: new stream).
    """

    id: Id
    tenant: EnvelopeToken
    kind: EnvelopeToken
    stream: StreamName
    occurred_at: AwareTime
    data: Any = {}
    correlation_id: Id | None = None
    causation_id: Id | None = None
    expected_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None
    v: int = ENVELOPE_VERSION


class EventBatch(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Events of one tenant in one message.

    `atomic=True` (an atomic batch): all commit with consecutive seqs, or none do.
    `atomic=False` (a bundle): each event is decided on its own, in order, exactly as if it
    were its own message (inserted, duplicate, conflict or rejected), so one event's conflict
    leaves the others stored; producers get one outcome per event. Only bytes that do not
    decode as a batch, or an event naming another tenant, reject a bundle whole.
    """

    events: Annotated[list[Event], msgspec.Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]
    # omit_defaults: an atomic batch encodes exactly as before this field existed.
    atomic: bool = True


# Tokens that passed `check_token`; bounded, whatever tenants and kinds producers invent.
_CHECKED_TOKENS: set[str] = set()
_MAX_CHECKED_TOKENS = 4096


def check_envelope_tokens(event: Event) -> None:
    """Raise `InvalidEvent` unless the event's tenant and kind are valid subject tokens."""
    if event.tenant in _CHECKED_TOKENS and event.kind in _CHECKED_TOKENS:
        return
    for value, what in ((event.tenant, "tenant"), (event.kind, "kind")):
        try:
            check_token(value, what)
        except InvalidToken as exc:
            raise InvalidEvent(exc.message) from None
        if len(_CHECKED_TOKENS) >= _MAX_CHECKED_TOKENS:
            _CHECKED_TOKENS.clear()
        _CHECKED_TOKENS.add(value)


class StoredEvent(Event, kw_only=True, omit_defaults=True):
    """An event as the ledger holds it, with what the worker assigned at commit."""

    seq: int  # per tenant+stream, from 1, no gaps
    position: int  # global commit order in this ledger, no gaps
    recorded_at: AwareTime  # the worker's clock: the trusted time
    js_seq: int  # JetStream stream sequence the event arrived in


OutcomeKind = Literal["inserted", "duplicate", "conflict", "rejected"]


class Outcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What became of one consumed event (sent to producers that wait, and in commit notices).

    `code` is an error code from `jetledger.schemas.errors` when the outcome is not stored.
    """

    id: str
    outcome: OutcomeKind
    stream: str | None = None
    seq: int | None = None
    position: int | None = None
    code: str | None = None
    reason: str | None = None
    actual_seq: int | None = None


class CommitNotice(msgspec.Struct, kw_only=True):
    """Published on `<prefix>.live.<tenant>` after each commit that stored events of the
    tenant (core NATS, best effort: a reader that misses one catches up by query)."""

    tenant: str
    first_position: int
    last_position: int
    count: int


def new_id() -> str:
    """A new ULID: unique, and sortable by creation time."""
    return str(ULID())


def new_event(
    *,
    tenant: str,
    stream: str,
    data: Payload | dict[str, Any],
    kind: str | None = None,
    id: str | None = None,
    occurred_at: datetime | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    expected_seq: int | None = None,
) -> Event:
    """Build an event; the kind comes from a typed payload, the id is a fresh ULID by default."""
    if isinstance(data, Payload):
        if kind is not None and kind != data.kind:
            raise InvalidEvent(f"kind {kind!r} does not match payload {type(data).__name__}")
        kind = data.kind
    elif kind is None:
        raise InvalidEvent("kind is required when data is a plain mapping")
    return Event(
        id=id if id is not None else new_id(),
        tenant=check_token(tenant, "tenant"),
        kind=check_token(kind, "kind"),
        stream=stream,
        occurred_at=occurred_at if occurred_at is not None else datetime.now(UTC),
        data=data,
        correlation_id=correlation_id,
        causation_id=causation_id,
        expected_seq=expected_seq,
    )


def typed_data(event: Event) -> Payload | dict[str, Any]:
    """`event.data` as its registered payload type when the kind is known, else as given."""
    if isinstance(event.data, Payload):
        return event.data
    cls = payload_type(event.kind)
    if cls is None:
        return dict(event.data)
    return msgspec.convert(event.data, cls)
