"""JSON Schema of every wire type, generated from the msgspec types (the single source)."""

from __future__ import annotations

from typing import Any

import msgspec

from .envelope import CommitNotice, Event, EventBatch, Outcome, StoredEvent
from .payloads import PAYLOADS
from .queries import OPS, ErrorReply

__all__ = ["WIRE_TYPES", "wire_schema"]

WIRE_TYPES: tuple[type[Any], ...] = (
    Event,
    EventBatch,
    StoredEvent,
    Outcome,
    CommitNotice,
    ErrorReply,
    *(t for pair in OPS.values() for t in pair),
    *PAYLOADS.values(),
)


def wire_schema() -> dict[str, Any]:
    """One JSON Schema document with every wire type under `$defs`."""
    types = list(dict.fromkeys(WIRE_TYPES))
    _, components = msgspec.json.schema_components(types, ref_template="#/$defs/{name}")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "jetledger wire contract",
        "$defs": components,
        "x-payload-kinds": {kind: cls.__name__ for kind, cls in PAYLOADS.items()},
    }
