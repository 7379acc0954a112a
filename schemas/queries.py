"""Request and reply types of the query service (`<prefix>.q.<tenant>.<op>`).

Requests are encoded like events (MessagePack, or JSON with `Content-Type: application/json`)
and the reply comes back in the request's encoding. Errors come back with the NATS service
error headers (`Nats-Service-Error`, `Nats-Service-Error-Code`) and an `ErrorReply` body.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec

from .envelope import AwareTime, Id, StoredEvent, StreamName, Token

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "OPS",
    "ErrorReply",
    "OrderBy",
    "RejectionInfo",
    "RejectionsPage",
    "RejectionsQuery",
    "StreamQuery",
    "StreamRecord",
    "EventsPage",
    "EventsQuery",
    "GetQuery",
    "HeadQuery",
    "Order",
    "StreamHead",
    "StreamsPage",
    "StreamsQuery",
    "TenantStats",
    "TenantStatsQuery",
]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]
Order = Literal["asc", "desc"]
#: "position": commit order (the default). "occurred_at": the producers' clocks, ties broken
#: by position, to interleave events of several sources by when they happened.
OrderBy = Literal["position", "occurred_at"]


class EventsQuery(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Events of the tenant, every filter optional and combined with AND.

    `time_from`/`time_to` bound `occurred_at` inclusively. `after_seq` needs `stream`.
    `cursor` continues a previous page (it stays correct while new events arrive).
    """

    stream: StreamName | None = None
    kinds: list[Token] = []
    correlation_id: Id | None = None
    causation_id: Id | None = None
    time_from: AwareTime | None = None
    time_to: AwareTime | None = None
    after_position: Annotated[int, msgspec.Meta(ge=0)] | None = None
    after_seq: Annotated[int, msgspec.Meta(ge=0)] | None = None
    limit: Limit = DEFAULT_LIMIT
    order: Order = "asc"
    order_by: OrderBy = "position"
    cursor: str | None = None


class EventsPage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A page of events; `next_cursor` is absent on the last page."""

    events: list[StoredEvent]
    next_cursor: str | None = None


class GetQuery(msgspec.Struct, kw_only=True):
    """One event by id (reply: `StoredEvent`, or a `not_found` error)."""

    id: Id


class HeadQuery(msgspec.Struct, kw_only=True):
    """A stream's head (reply: `StreamHead`, or a `not_found` error if it has no events)."""

    stream: StreamName


class StreamHead(msgspec.Struct, kw_only=True, omit_defaults=True):
    stream: str
    seq: int  # latest seq = number of events in the stream
    first_position: int
    last_position: int
    last_kind: str
    created_at: datetime
    updated_at: datetime


class StreamsQuery(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Streams of the tenant, newest (most recently created) first by default.

    `last_kinds` keeps streams whose latest event is of one of these kinds: "escalations
    recorded and not yet resolved" is `last_kinds=["escalation_recorded"]`.
    """

    last_kinds: list[Token] = []
    limit: Limit = DEFAULT_LIMIT
    order: Order = "desc"
    cursor: str | None = None


class StreamsPage(msgspec.Struct, kw_only=True, omit_defaults=True):
    streams: list[StreamHead]
    next_cursor: str | None = None


class StreamQuery(msgspec.Struct, kw_only=True):
    """One stream's record: its head, the event that opened it and the latest one."""

    stream: StreamName


class StreamRecord(msgspec.Struct, kw_only=True):
    head: StreamHead
    first: StoredEvent
    last: StoredEvent


class RejectionsQuery(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the worker refused for this tenant, and why (newest first by default)."""

    codes: list[str] = []
    limit: Limit = DEFAULT_LIMIT
    order: Order = "desc"
    cursor: str | None = None


class RejectionInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    rid: int
    js_seq: int
    subject: str
    code: str
    reason: str
    recorded_at: datetime
    event_id: str | None = None
    raw_size: int = 0


class RejectionsPage(msgspec.Struct, kw_only=True, omit_defaults=True):
    rejections: list[RejectionInfo]
    next_cursor: str | None = None


class TenantStatsQuery(msgspec.Struct, kw_only=True):
    """Counts for the tenant (no parameters)."""


class TenantStats(msgspec.Struct, kw_only=True, omit_defaults=True):
    events: int
    streams: int
    rejections: int
    last_position: int | None = None
    last_recorded_at: datetime | None = None


class ErrorReply(msgspec.Struct, kw_only=True):
    """Body of an error reply; `code` is a code from `jetledger.schemas.errors`."""

    code: str
    message: str


#: op -> (request type, reply type)
OPS: Final[dict[str, tuple[type[msgspec.Struct], type[msgspec.Struct]]]] = {
    "events": (EventsQuery, EventsPage),
    "get": (GetQuery, StoredEvent),
    "head": (HeadQuery, StreamHead),
    "streams": (StreamsQuery, StreamsPage),
    "stream": (StreamQuery, StreamRecord),
    "rejections": (RejectionsQuery, RejectionsPage),
    "stats": (TenantStatsQuery, TenantStats),
}
