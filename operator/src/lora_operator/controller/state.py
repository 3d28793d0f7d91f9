"""What a reconcile works with (pure): the observed children, the decision it returns, the
status it drafts (conditions with one Event per transition), and the Job facts it reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lora_operator.api import constants as c
from lora_operator.conditions import set_condition

REASON_STARTED = "JobStarted"
REASON_COMPLETED = "TrainingCompleted"
REASON_NOT_STARTED = "NotStarted"
REASON_RESUMED = "Resumed"
REASON_QUEUED = "QueuedByKueue"
REASON_RESTARTING = "Restarting"
REASON_PREFLIGHT_RUNNING = "PreflightRunning"
REASON_PREFLIGHT_PASSED = "PreflightPassed"
REASON_PREFLIGHT_WARNINGS = "PreflightPassedWithWarnings"
REASON_PREFLIGHT_FAILED = "PreflightFailed"
REASON_RECOVERED = "Recovered"
TERMINAL_PHASES = (c.PHASE_SUCCEEDED, c.PHASE_FAILED)
# Set by the operator on the LoRAFineTune when onDegraded=Suspend suspended it (with
# spec.runPolicy.suspend=true, so the spec says what happened and `suspend: false` resumes).
ANNOTATION_HEALTH_SUSPEND = f"{c.GROUP}/suspended-by-health"


@dataclass(frozen=True)
class Observed:
    """The children as read from the API (None: absent)."""

    configmap: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    job: dict[str, Any] | None = None
    preflight_job: dict[str, Any] | None = None
    preflight_pod: dict[str, Any] | None = None  # the pre-flight Job's (latest) pod
    final_health: dict[str, Any] | None = None  # the rank-0 trainer's termination message


@dataclass(frozen=True)
class EventNote:
    """A Kubernetes Event to post on the LoRAFineTune."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What the handlers do: create, patch the Job, write status, post events."""

    create: list[dict[str, Any]] = field(default_factory=list)
    job_patch: dict[str, Any] | None = None  # merge patch of the Job's spec
    status: dict[str, Any] = field(default_factory=dict)
    events: list[EventNote] = field(default_factory=list)  # the transitions STATUS records
    delete_job: str | None = None  # uid of the training Job to delete (restart, Fail)
    lft_patch: dict[str, Any] | None = None  # merge patch of the LoRAFineTune (not status)
    delete_self: bool = False  # ttlSecondsAfterFinished passed
    lft_patch_events: list[EventNote] = field(default_factory=list)  # once LFT_PATCH landed

    @property
    def degraded_reason(self) -> str | None:
        """The Degraded condition's reason while it is True (for the operator's metrics)."""
        conds = self.status.get("conditions") or []
        hit = next((x for x in conds if x.get("type") == c.COND_DEGRADED), None)
        return hit.get("reason") if hit and hit.get("status") == "True" else None


@dataclass
class StatusDraft:
    conditions: list[dict[str, Any]]
    generation: int | None
    now: str
    events: list[EventNote] = field(default_factory=list)

    def set(
        self,
        type_: str,
        status: bool | str,
        reason: str,
        message: str,
        warn: bool = False,
        warn_on_true: bool = False,
    ) -> bool:
        """Set a condition; True when it transitioned. WARN: a Warning Event when it turns
        False; WARN_ON_TRUE: when it turns True or changes reason while True."""
        before = self.get(type_)
        self.conditions, change = set_condition(
            self.conditions, type_, status, reason, message, self.generation, self.now
        )
        if change is not None and warn and status is False:
            self.events.append(EventNote("Warning", reason, message))
        moved = change is not None or (before or {}).get("reason") != reason
        if warn_on_true and status is True and moved:
            self.events.append(EventNote("Warning", reason, message))
        return change is not None

    def get(self, type_: str) -> dict[str, Any] | None:
        return next((x for x in self.conditions if x.get("type") == type_), None)

    def clear(self, type_: str, reason: str, message: str) -> None:
        """Set TYPE False only when it is present (no noise before a job ever ran)."""
        if any(x.get("type") == type_ for x in self.conditions):
            self.set(type_, False, reason, message)


@dataclass
class Writes:
    """The writes a reconcile decides, gathered by its steps."""

    create: list[dict[str, Any]] = field(default_factory=list)
    job_patch: dict[str, Any] | None = None
    delete_job: str | None = None
    lft_patch: dict[str, Any] | None = None
    lft_patch_events: list[EventNote] = field(default_factory=list)
    preflight_failed: bool = False


def job_running(job: dict[str, Any] | None) -> bool:
    """The training Job exists, is not suspended and has not finished."""
    return job is not None and not (job.get("spec") or {}).get("suspend") and not job_finished(job)


def job_condition(job: dict[str, Any] | None, type_: str) -> dict[str, Any] | None:
    conds = ((job or {}).get("status") or {}).get("conditions") or []
    return next((x for x in conds if x.get("type") == type_ and x.get("status") == "True"), None)


def job_finished(job: dict[str, Any] | None) -> bool:
    return bool(job_condition(job, "Complete") or job_condition(job, "Failed"))


def failure_reason(job_failed: dict[str, Any]) -> str:
    """The Failed condition's reason from the Job's: a health stop is told apart."""
    reason, message = job_failed.get("reason") or "", job_failed.get("message") or ""
    if reason == "PodFailurePolicy" and f"exit code {c.EXIT_HEALTH_STOP}" in message:
        return c.REASON_HEALTH_POLICY
    return {
        "BackoffLimitExceeded": c.REASON_BACKOFF_LIMIT,
        "DeadlineExceeded": c.REASON_DEADLINE,
    }.get(reason, reason or "JobFailed")
