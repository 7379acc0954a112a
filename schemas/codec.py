"""Encoding on the wire: MessagePack by default, JSON when the Content-Type header says so.

Encoders and decoders are built once and reused (msgspec's fast path). Validation of an
envelope happens here, so client and worker apply exactly the same rules.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, TypeVar

import msgspec

from .envelope import MAX_BATCH_EVENTS, Event, EventBatch, check_envelope_tokens
from .errors import InvalidEvent
from .payloads import payload_type

__all__ = [
    "CONTENT_TYPE",
    "HEADER_NOTIFY",
    "JSON",
    "MSGPACK",
    "canonical_bytes",
    "content_type_of",
    "decode",
    "batch_items",
    "decode_batch",
    "decode_event",
    "encode",
    "encode_bundle",
    "normalize_event",
]

MSGPACK: Final = "application/msgpack"
JSON: Final = "application/json"
CONTENT_TYPE: Final = "Content-Type"
#: An inbox on which the worker publishes the `Outcome` of each event once committed.
HEADER_NOTIFY: Final = "Jetledger-Notify"

_msgpack_enc = msgspec.msgpack.Encoder()
_json_enc = msgspec.json.Encoder()
# Canonical form: deterministic key order, so equal content hashes equal.
_canonical_enc = msgspec.msgpack.Encoder(order="deterministic")
_DECODERS: dict[tuple[type[Any], str], Any] = {}

T = TypeVar("T")


def content_type_of(headers: dict[str, str] | None) -> str:
    """The wire format of a message: JSON only if asked for, anything else is MessagePack."""
    if headers:
        value = headers.get(CONTENT_TYPE) or headers.get(CONTENT_TYPE.lower())
        if value and value != MSGPACK and value.split(";")[0].strip().lower() == JSON:
            return JSON
    return MSGPACK


def encode(obj: Any, content_type: str = MSGPACK) -> bytes:
    return _json_enc.encode(obj) if content_type == JSON else _msgpack_enc.encode(obj)


def _decoder(type_: type[T], content_type: str) -> Any:
    key = (type_, content_type)
    dec = _DECODERS.get(key)
    if dec is None:
        dec = (
            msgspec.json.Decoder(type_)
            if content_type == JSON
            else msgspec.msgpack.Decoder(type_)
        )
        _DECODERS[key] = dec
    return dec


def decode(data: bytes, type_: type[T], content_type: str = MSGPACK) -> T:
    """Decode and validate; raises `msgspec.ValidationError`/`DecodeError` on bad input."""
    result: T = _decoder(type_, content_type).decode(data)
    return result


def normalize_event(event: Event, *, strict: bool = False) -> Event:
    """Check the tokens of a decoded envelope and validate `data` against the kind's payload
    type; returns the event with typed data.

    Raises `InvalidEvent` saying what is wrong. In strict mode unknown kinds are refused.
    """
    check_envelope_tokens(event)
    cls = payload_type(event.kind)
    if cls is None:
        if strict:
            raise InvalidEvent(f"kind {event.kind!r} is not a registered payload kind (strict)")
        if not isinstance(event.data, dict):
            raise InvalidEvent(f"data of kind {event.kind!r} must be a mapping")
        return event
    if isinstance(event.data, cls):
        return event
    try:
        typed = msgspec.convert(event.data, cls)
    except msgspec.ValidationError as exc:
        raise InvalidEvent(f"data is not a valid {cls.__name__} payload: {exc}") from None
    return msgspec.structs.replace(event, data=typed)


def decode_event(data: bytes, content_type: str = MSGPACK, *, strict: bool = False) -> Event:
    """Bytes → validated, normalized `Event`; raises `InvalidEvent` with the reason."""
    try:
        event = decode(data, Event, content_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidEvent(f"not a valid event envelope ({content_type}): {exc}") from None
    return normalize_event(event, strict=strict)


def decode_batch(data: bytes, content_type: str = MSGPACK, *, strict: bool = False) -> EventBatch:
    try:
        batch = decode(data, EventBatch, content_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidEvent(f"not a valid event batch ({content_type}): {exc}") from None
    return EventBatch(events=[normalize_event(e, strict=strict) for e in batch.events],
                      atomic=batch.atomic)


class _RawBatch(msgspec.Struct, kw_only=True, omit_defaults=True):
    """An `EventBatch` whose events stay undecoded bytes, exactly as they arrived."""

    events: Annotated[list[msgspec.Raw],
                      msgspec.Meta(min_length=1, max_length=MAX_BATCH_EVENTS)]
    atomic: bool = True


def batch_items(data: bytes, content_type: str = MSGPACK) -> tuple[list[bytes], bool]:
    """A batch's events as the bytes each arrived as (in `content_type`), and its `atomic`
    flag, without validating the events: one event of a bundle can then be decided (and
    kept as a rejection) on its own. Raises `InvalidEvent` if the batch frame itself is
    not valid."""
    try:
        frame = decode(data, _RawBatch, content_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise InvalidEvent(f"not a valid event batch ({content_type}): {exc}") from None
    return [bytes(item) for item in frame.events], frame.atomic


def encode_bundle(items: list[bytes], content_type: str = MSGPACK) -> bytes:
    """A bundle (`EventBatch` with `atomic=False`) of events already encoded one by one in
    `content_type`: the same bytes as encoding the events, without encoding them again."""
    return encode(_RawBatch(events=[msgspec.Raw(i) for i in items], atomic=False),
                  content_type)


def canonical_bytes(event: Event) -> bytes:
    """The stored form of an event: MessagePack with deterministic key order."""
    return _canonical_enc.encode(event)
