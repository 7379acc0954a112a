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
    "EventsPage",
    "EventsQuery",
    "GetQuery",
    "HeadQuery",
    "Order",
    "StreamHead",
    "StreamsPage",
    "StreamsQuery",
]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]
Order = Literal["asc", "desc"]


class EventsQuery(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Events of the tenant, every filter optional and combined with AND, ordered by position.

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
    """Streams of the tenant, most recently active first."""

    limit: Limit = DEFAULT_LIMIT
    cursor: str | None = None


class StreamsPage(msgspec.Struct, kw_only=True, omit_defaults=True):
    streams: list[StreamHead]
    next_cursor: str | None = None


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
}
