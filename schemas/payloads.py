"""Typed payloads for the event kinds of agent systems, registered by kind.

An event whose `kind` is registered here must carry a `data` object that decodes as that
payload type; any other kind carries a plain mapping (like a `Custom` event) unless the worker
runs in strict mode. Evolution follows msgspec's rules: new fields get defaults, no field
ever changes type, and a kind name is never reused for a different shape.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, ClassVar, TypeVar

import msgspec

from .subjects import check_token

__all__ = [
    "PAYLOADS",
    "ArtifactStateTransitioned",
    "BudgetExceeded",
    "EnhancementApplied",
    "EscalationRecorded",
    "EscalationResolved",
    "ExecutionCompleted",
    "ExecutionFailed",
    "ExecutionStarted",
    "FactPromoted",
    "OutcomeRecorded",
    "Payload",
    "ProposalCreated",
    "ProposalValidated",
    "StepCompleted",
    "StepFailed",
    "StepStarted",
    "TaskClaimed",
    "TaskReleased",
    "ToolCallCompleted",
    "ToolCallStarted",
    "payload_type",
    "register_payload",
]


class Payload(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Base of typed payloads. Subclasses set `kind` and are registered with `register_payload`."""

    kind: ClassVar[str]


#: kind -> payload type. Extend with `register_payload`.
PAYLOADS: dict[str, type[Payload]] = {}

P = TypeVar("P", bound=type[Payload])


def register_payload(cls: P) -> P:
    """Class decorator: make `cls.kind` a known kind whose `data` must decode as `cls`."""
    kind = check_token(cls.kind, "payload kind")
    existing = PAYLOADS.get(kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"kind {kind!r} is already registered to {existing.__name__}")
    PAYLOADS[kind] = cls
    return cls


def payload_type(kind: str) -> type[Payload] | None:
    return PAYLOADS.get(kind)


# --- proposals and facts (experience stores) -------------------------------------------


@register_payload
class ProposalCreated(Payload):
    kind = "proposal_created"
    proposal_id: str
    title: str
    body: str = ""
    author: str | None = None


@register_payload
class ProposalValidated(Payload):
    kind = "proposal_validated"
    proposal_id: str
    valid: bool
    reasons: list[str] = []
    validator: str | None = None


@register_payload
class FactPromoted(Payload):
    kind = "fact_promoted"
    fact_id: str
    statement: str
    confidence: float | None = None
    sources: list[str] = []


# --- executions, steps and tool calls (execution event stores) -------------------------


@register_payload
class ExecutionStarted(Payload):
    kind = "execution_started"
    execution_id: str
    agent: str
    goal: str = ""
    inputs: dict[str, Any] = {}


@register_payload
class ExecutionCompleted(Payload):
    kind = "execution_completed"
    execution_id: str
    result: dict[str, Any] = {}
    duration_ms: int | None = None


@register_payload
class ExecutionFailed(Payload):
    kind = "execution_failed"
    execution_id: str
    error: str
    retryable: bool = False


@register_payload
class StepStarted(Payload):
    kind = "step_started"
    step_id: str
    name: str
    attempt: int = 1


@register_payload
class StepCompleted(Payload):
    kind = "step_completed"
    step_id: str
    output: dict[str, Any] = {}
    duration_ms: int | None = None


@register_payload
class StepFailed(Payload):
    kind = "step_failed"
    step_id: str
    error: str
    attempt: int = 1
    retryable: bool = False


@register_payload
class ToolCallStarted(Payload):
    kind = "tool_call_started"
    call_id: str
    tool: str
    arguments: dict[str, Any] = {}


@register_payload
class ToolCallCompleted(Payload):
    kind = "tool_call_completed"
    call_id: str
    tool: str
    ok: bool = True
    result: Any = None
    error: str | None = None
    duration_ms: int | None = None


@register_payload
class BudgetExceeded(Payload):
    kind = "budget_exceeded"
    budget: str  # e.g. "tokens", "usd", "wall_clock_s"
    limit: float
    used: float


@register_payload
class OutcomeRecorded(Payload):
    kind = "outcome_recorded"
    outcome: str  # e.g. "success", "partial", "failure"
    score: float | None = None
    notes: str = ""


# --- escalations, artifacts, coordination ----------------------------------------------


@register_payload
class EscalationRecorded(Payload):
    kind = "escalation_recorded"
    escalation_id: str
    reason: str
    severity: str = "normal"
    assignee: str | None = None


@register_payload
class EscalationResolved(Payload):
    kind = "escalation_resolved"
    escalation_id: str
    resolution: str
    resolved_by: str | None = None


@register_payload
class ArtifactStateTransitioned(Payload):
    kind = "artifact_state_transitioned"
    artifact_id: str
    from_state: str | None
    to_state: str
    reason: str = ""


@register_payload
class EnhancementApplied(Payload):
    """One entry of an append-only enhance log (an edit an agent made to an artifact)."""

    kind = "enhancement_applied"
    target: str
    change: str
    before: str | None = None
    after: str | None = None


@register_payload
class TaskClaimed(Payload):
    """Coordination ledger: an agent takes a unit of work."""

    kind = "task_claimed"
    task_id: str
    agent: str
    lease_until: datetime | None = None


@register_payload
class TaskReleased(Payload):
    kind = "task_released"
    task_id: str
    agent: str
    done: bool = True
