"""`RLPRun.status`: the operator's whole state, kept on the resource itself.

Everything the operator needs to continue a run after a restart is here or derivable from the cluster
(Jobs by deterministic name) and the store (phase manifests). The CRD's status schema is generated from
these models, so the apiserver never prunes a field the operator writes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

RunState = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
PhaseState = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]
RUN_STATES: tuple[str, ...] = ("Pending", "Running", "Succeeded", "Failed", "Suspended")
PHASE_STATES: tuple[str, ...] = ("Pending", "Running", "Succeeded", "Failed", "Skipped")
TERMINAL_RUN_STATES = ("Succeeded", "Failed")
DONE_PHASE_STATES = ("Succeeded", "Skipped")
CONDITION_TYPES = ("Ready", "Validated", "Running", "Succeeded", "Failed", "Suspended")
MAX_MESSAGE = 1024  # conditions, phase records and Events


class _StatusModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="ignore",  # tolerate fields written by a newer operator
    )


class Condition(_StatusModel):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(..., description="Ready, Validated (the preflight), Running, Succeeded, Failed or Suspended.")
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(..., description="CamelCase machine-readable reason of the last transition.")
    message: str = Field("", description="Human-readable detail.")
    last_transition_time: str = Field(..., description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(None, description="metadata.generation this condition is based on.")


class PhaseRecord(_StatusModel):
    """One (round, phase) of the run's plan."""

    name: str = Field(..., description="Phase name (sft, reward, generate, refine, synthesize, optimize, evaluate).")
    round: int = Field(..., description="Round of the phase; 0 for the one-off phases before round 1.")
    state: PhaseState = Field("Pending", description="Pending, Running, Succeeded, Failed or Skipped.")
    attempts: int = Field(0, description="Attempts (Jobs) started, including ones interrupted by suspend.")
    failures: int = Field(0, description="Attempts that failed; the run fails when this reaches backoffLimit.")
    job: str | None = Field(None, description="Job of the current (or last) attempt.")
    started_at: str | None = Field(None, description="When the first attempt started.")
    attempt_started_at: str | None = Field(None, description="When the current attempt's Job was created.")
    finished_at: str | None = Field(None, description="When the phase succeeded, failed or was skipped.")
    next_attempt_at: str | None = Field(None, description="Earliest start of the next attempt (retry backoff).")
    output: str | None = Field(None, description="URI of the phase's output prefix in the store.")
    metrics: dict[str, Any] | None = Field(None, description="Summary metrics from the phase's manifest.")
    reason: str | None = Field(None, description="Reason of the last state change (e.g. JobFailed, AlreadyComplete).")
    message: str | None = Field(None, description="Detail of the last state change.")

    @property
    def key(self) -> tuple[int, str]:
        return (self.round, self.name)


class RLPRunStatus(_StatusModel):
    phase: RunState | None = Field(None, description="Pending, Running, Succeeded, Failed or Suspended.")
    current_phase: str | None = Field(None, description="Phase now running or next to run.")
    round: int | None = Field(None, description="Round of the current phase.")
    message: str | None = Field(None, description="Human-readable summary of the run's state.")
    started_at: str | None = None
    finished_at: str | None = None
    observed_generation: int | None = Field(None, description="metadata.generation last acted upon.")
    spec_hash: str | None = Field(None, description="Hash of the fields that may not change while the run exists.")
    redo: str | None = Field(None, description="The rlp.dev/redo annotation value last acted upon.")
    phases: list[PhaseRecord] = Field(default_factory=list, description="Per-phase records in execution order.")
    conditions: list[Condition] = Field(default_factory=list)

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> RLPRunStatus:
        return cls.model_validate(dict(body.get("status") or {}))

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def set_condition(
        self, type_: str, status: str, reason: str, message: str, now: str, generation: int | None
    ) -> bool:
        """Set a condition; lastTransitionTime moves only when `status` changes. Returns True if changed."""
        cond = self.condition(type_)
        if cond is None:
            self.conditions.append(
                Condition(
                    type=type_,
                    status=status,
                    reason=reason,
                    message=message,
                    last_transition_time=now,
                    observed_generation=generation,
                )
            )
            self.conditions.sort(key=lambda c: CONDITION_TYPES.index(c.type) if c.type in CONDITION_TYPES else 99)
            return True
        changed = (cond.status, cond.reason, cond.message, cond.observed_generation) != (
            status,
            reason,
            message,
            generation,
        )
        if cond.status != status:
            cond.last_transition_time = now
        cond.status, cond.reason, cond.message, cond.observed_generation = status, reason, message, generation
        return changed


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def fmt_time(t: dt.datetime, precise: bool = False) -> str:
    """RFC 3339 in UTC; `precise` keeps milliseconds (used for retry deadlines)."""
    t = t.astimezone(dt.UTC)
    if precise:
        return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> dt.datetime | None:
    if not s:
        return None
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def trim(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` on one line (runs of whitespace folded), cut to `limit` characters with an ellipsis."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
