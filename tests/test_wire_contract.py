"""The wire contract is documented from the msgspec types themselves, so it cannot drift."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from jetledger.schemas import (
    JSON,
    MSGPACK,
    PAYLOADS,
    Event,
    InvalidEvent,
    InvalidToken,
    StepStarted,
    Subjects,
    decode_event,
    encode,
    envelope,
    wire_schema,
)
from jetledger.schemas.jsonschema import WIRE_TYPES
from jetledger.schemas.queries import OPS

ROOT = Path(__file__).resolve().parent.parent


def test_json_schema_has_every_wire_type_and_payload_kind() -> None:
    defs = wire_schema()["$defs"]
    for type_ in WIRE_TYPES:
        assert type_.__name__ in defs
    for request, reply in OPS.values():
        assert request.__name__ in defs and reply.__name__ in defs
    assert set(wire_schema()["x-payload-kinds"]) == set(PAYLOADS)
    event = defs["Event"]
    assert set(event["required"]) == {"id", "tenant", "kind", "stream", "occurred_at"}


def test_committed_schema_file_matches_the_types() -> None:
    """docs/wire-schema.json is what other languages read; regenerate with
    `jetledger schema > docs/wire-schema.json`."""
    committed = json.loads((ROOT / "docs" / "wire-schema.json").read_text())
    assert committed == json.loads(json.dumps(wire_schema()))


def test_schema_command_prints_the_schema() -> None:
    out = subprocess.run([sys.executable, "-m", "jetledger.client.cli", "schema"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    assert json.loads(out)["$defs"]["StoredEvent"]["title"] == "StoredEvent"


def test_subjects_put_the_tenant_in_the_third_token() -> None:
    s = Subjects("jl")
    assert s.event("acme", "step_started") == "jl.evt.acme.step_started"
    assert s.batch("acme") == "jl.batch.acme"
    assert s.query("acme", "events") == "jl.q.acme.events"
    assert s.live("acme") == "jl.live.acme"
    assert s.parse_ingest("jl.evt.acme.k").tenant == "acme"
    with pytest.raises(InvalidToken):
        Subjects("two.tokens")
    with pytest.raises(InvalidToken):
        s.parse_ingest("jl.evt.acme")


def test_msgpack_and_json_encodings_decode_to_the_same_event() -> None:
    event = Event(id="e1", tenant="acme", kind="step_started", stream="run",
                  occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
                  data=StepStarted(step_id="s", name="n"))
    from_msgpack = decode_event(encode(event, MSGPACK), MSGPACK)
    from_json = decode_event(encode(event, JSON), JSON)
    assert from_msgpack == from_json == event


@pytest.mark.parametrize("content_type", [MSGPACK, JSON])
def test_tenant_and_kind_must_be_subject_tokens_however_many_good_ones_came_before(
    content_type: str,
) -> None:
    """The token check runs once per distinct value (not msgspec's regex on every decode):
    what it remembers is bounded, and an invalid value is refused every time."""
    ok = Event(id="e1", tenant="acme", kind="k", stream="s",
               occurred_at=datetime(2026, 1, 1, tzinfo=UTC))
    for i in range(envelope._MAX_CHECKED_TOKENS + 10):
        decode_event(encode(msgspec.structs.replace(ok, kind=f"k{i}"), content_type),
                     content_type)
    assert len(envelope._CHECKED_TOKENS) <= envelope._MAX_CHECKED_TOKENS
    for field in ("tenant", "kind"):
        for bad in ("has space", "k.x", "", "x" * 65, "ü"):
            with pytest.raises(InvalidEvent, match=f"^{field} .* is not valid: use 1-64"):
                decode_event(encode(msgspec.structs.replace(ok, **{field: bad}), content_type),
                             content_type)


def test_schema_evolution_old_readers_ignore_new_fields_new_readers_default_missing() -> None:
    """msgspec's rules, which the contract follows: a producer on a newer version may add
    fields; an older producer's event (missing the new optional fields) still decodes."""
    newer = {"id": "e", "tenant": "t", "kind": "k", "stream": "s",
             "occurred_at": "2026-01-01T00:00:00Z", "data": {}, "v": 2, "future": [1]}
    event = decode_event(msgspec.json.encode(newer), JSON)
    assert event.v == 2 and event.correlation_id is None
