"""The one error hierarchy of jetledger; catch `JetledgerError` to catch them all.

    JetledgerError
    ├── InvalidInput                 the caller's input is wrong; nothing was sent
    │   ├── InvalidToken             tenant/kind/prefix/op is not a single subject token
    │   ├── InvalidEvent             envelope fails the schema (naive time, missing field, ...)
    │   └── EventTooLarge            payload + headers exceed the server's max_payload
    ├── RejectedError                the worker consumed the event and refused it
    │   ├── ConflictError            same id, different content: the original stays
    │   ├── ExpectedSeqMismatch      the stream's head was not `expected_seq`
    │   └── InvalidEventRejected     the worker found the event invalid
    ├── QueryError                   the worker answered a query with an error
    │   ├── InvalidQuery             malformed request, bad limit/cursor/time range
    │   └── NotFound                 no such event or stream
    ├── TransportError               the bus did not give a definite answer
    │   ├── Unavailable              nobody answered (no worker, no JetStream stream)
    │   ├── Overloaded               the worker refused the query to protect itself
    │   ├── PermissionDenied         the NATS user may not publish/subscribe there
    │   └── LedgerTimeout            no answer in time
    │       └── OutcomeUnknown       a publish was never confirmed: it may or may not be stored
    └── InternalError                the worker failed unexpectedly (details are in its log)

Every error carries a stable `code` (the same string travels in error replies on the wire).
"""

from __future__ import annotations

__all__ = [
    "ConflictError",
    "EventTooLarge",
    "ExpectedSeqMismatch",
    "InternalError",
    "InvalidEvent",
    "InvalidEventRejected",
    "InvalidInput",
    "InvalidQuery",
    "InvalidToken",
    "JetledgerError",
    "LedgerTimeout",
    "NotFound",
    "OutcomeUnknown",
    "Overloaded",
    "PermissionDenied",
    "QueryError",
    "RejectedError",
    "TransportError",
    "Unavailable",
    "error_for_code",
]


class JetledgerError(Exception):
    """Base of every error jetledger raises."""

    code: str = "error"
    #: status code used in NATS service error headers (HTTP-like).
    status: int = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(JetledgerError, ValueError):
    code = "invalid_input"
    status = 400


class InvalidToken(InvalidInput):
    code = "invalid_token"


class InvalidEvent(InvalidInput):
    code = "invalid_event"


class EventTooLarge(InvalidInput):
    code = "too_large"
    status = 413


class RejectedError(JetledgerError):
    """The worker consumed the event and refused to store it; the reason is in `message`."""

    code = "rejected"
    status = 422

    def __init__(self, message: str, *, event_id: str | None = None) -> None:
        super().__init__(message)
        self.event_id = event_id


class ConflictError(RejectedError):
    code = "conflict"
    status = 409


class ExpectedSeqMismatch(RejectedError):
    code = "expected_seq_mismatch"
    status = 409

    def __init__(
        self, message: str, *, event_id: str | None = None, actual_seq: int | None = None
    ) -> None:
        super().__init__(message, event_id=event_id)
        self.actual_seq = actual_seq


class InvalidEventRejected(RejectedError):
    code = "invalid"


class QueryError(JetledgerError):
    code = "query_error"
    status = 400


class InvalidQuery(QueryError):
    code = "invalid_query"


class NotFound(QueryError):
    code = "not_found"
    status = 404


class TransportError(JetledgerError):
    code = "transport"
    status = 503


class Unavailable(TransportError):
    code = "unavailable"


class Overloaded(TransportError):
    code = "overloaded"


class PermissionDenied(TransportError):
    code = "permission_denied"
    status = 403


class LedgerTimeout(TransportError, TimeoutError):
    code = "timeout"
    status = 504


class OutcomeUnknown(LedgerTimeout):
    code = "outcome_unknown"


class InternalError(JetledgerError):
    code = "internal"
    status = 500


_BY_CODE: dict[str, type[JetledgerError]] = {
    cls.code: cls
    for cls in (
        InvalidInput, InvalidToken, InvalidEvent, EventTooLarge, RejectedError, ConflictError,
        ExpectedSeqMismatch, InvalidEventRejected, QueryError, InvalidQuery, NotFound,
        TransportError, Unavailable, Overloaded, PermissionDenied, LedgerTimeout, OutcomeUnknown,
        InternalError,
    )
}


def error_for_code(code: str, message: str) -> JetledgerError:
    """Rebuild the typed error a worker reported on the wire (unknown codes → InternalError)."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message)
