"""The public names are a promise: adding one is a decision, removing one breaks users."""

from __future__ import annotations

import importlib

import pytest

import jetledger.client
import jetledger.schemas
import jetledger.schemas.errors as errors

SCHEMAS_ALL = {
    "CONTENT_TYPE", "DEFAULT_PREFIX", "HEADER_NOTIFY", "JSON", "MSGPACK", "PAYLOADS",
    "ArtifactStateTransitioned", "BudgetExceeded", "CommitNotice", "ConflictError",
    "EnhancementApplied", "ErrorReply", "EscalationRecorded", "EscalationResolved", "Event",
    "EventBatch", "EventTooLarge", "EventsPage", "EventsQuery", "ExecutionCompleted",
    "ExecutionFailed", "ExecutionStarted", "ExpectedSeqMismatch", "FactPromoted", "GetQuery",
    "HeadQuery", "InternalError", "InvalidEvent", "InvalidEventRejected", "InvalidInput",
    "InvalidQuery", "InvalidToken", "JetledgerError", "LedgerTimeout", "NotFound", "Outcome",
    "OutcomeRecorded", "OutcomeUnknown", "Overloaded", "Payload", "PermissionDenied",
    "ProposalCreated", "ProposalValidated", "QueryError", "RejectedError", "RejectionInfo",
    "RejectionsPage", "RejectionsQuery", "StreamQuery", "StreamRecord", "StepCompleted",
    "StepFailed", "StepStarted", "StoredEvent", "StreamHead", "StreamsPage", "StreamsQuery",
    "Subjects", "TaskClaimed", "TenantStats", "TenantStatsQuery", "TaskReleased", "ToolCallCompleted", "ToolCallStarted",
    "TransportError", "Unavailable", "check_token", "decode_event", "encode", "new_event",
    "new_id", "payload_type", "register_payload", "typed_data", "wire_schema",
}


def test_schemas_public_names_are_pinned() -> None:
    assert set(jetledger.schemas.__all__) == SCHEMAS_ALL


def test_client_exports_the_client_and_the_whole_contract() -> None:
    assert set(jetledger.client.__all__) == SCHEMAS_ALL | {"AppendResult", "LedgerClient"}


@pytest.mark.parametrize("module", ["jetledger.schemas", "jetledger.client",
                                    "jetledger.worker", "jetledger.schemas.errors"])
def test_every_exported_name_exists(module: str) -> None:
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert missing == []


def test_every_error_is_a_jetledger_error_with_a_unique_code() -> None:
    classes = [getattr(errors, n) for n in errors.__all__ if isinstance(getattr(errors, n), type)]
    assert all(issubclass(c, errors.JetledgerError) for c in classes)
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    # What travels on the wire comes back as the same type (the base never travels).
    for cls in (c for c in classes if c is not errors.JetledgerError):
        assert type(errors.error_for_code(cls.code, "m")) is cls
