"""Reconcile (pure): a LoRAFineTune and its observed children -> what to do.

The decision is a function of the object and what exists, never of the event that woke the
operator, so an operator restart, a missed event or a repeated one converge to the same
state: create the missing children (deterministic names; a 409 is success), patch the Job's
live fields, write the status. The ConfigMap holding the resolved spec is the record of
what started: training fields are compared with it (immutable after start), and a terminal
job never gets children again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from lora_operator.api import constants as c
from lora_operator.api.schema_check import Problem
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders import (
    Owner,
    build_headless_service,
    build_indexed_job,
    build_spec_configmap,
)
from lora_operator.builders.names import SPEC_FILE
from lora_operator.conditions import derive_phase, set_condition
from lora_operator.controller.settings import OperatorConfig
from lora_operator.controller.spec_checks import semantic_problems
from lora_operator.validation import validate_body

LIVE_FIELDS = ("runPolicy",)  # may change while running; everything else is fixed at start
REASON_STARTED = "JobStarted"
REASON_COMPLETED = "TrainingCompleted"
REASON_NOT_STARTED = "NotStarted"
REASON_RESUMED = "Resumed"
REASON_QUEUED = "QueuedByKueue"
TERMINAL_PHASES = (c.PHASE_SUCCEEDED, c.PHASE_FAILED)


@dataclass(frozen=True)
class Observed:
    """The children as read from the API (None: absent)."""

    configmap: dict[str, Any] | None = None
    service: dict[str, Any] | None = None
    job: dict[str, Any] | None = None


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
    events: list[EventNote] = field(default_factory=list)


@dataclass
class _Status:
    conditions: list[dict[str, Any]]
    generation: int | None
    now: str
    events: list[EventNote] = field(default_factory=list)

    def set(self, type_: str, status: bool, reason: str, message: str, warn: bool = False) -> None:
        self.conditions, change = set_condition(
            self.conditions, type_, status, reason, message, self.generation, self.now
        )
        if change is not None and warn and not status:
            self.events.append(EventNote("Warning", reason, message))

    def clear(self, type_: str, reason: str, message: str) -> None:
        """Set TYPE False only when it is present (no noise before a job ever ran)."""
        if any(x.get("type") == type_ for x in self.conditions):
            self.set(type_, False, reason, message)


def reconcile(
    body: dict[str, Any], observed: Observed, config: OperatorConfig, now: str
) -> Decision:
    """The decision for one LoRAFineTune (see the module docstring)."""
    meta, old = body["metadata"], body.get("status") or {}
    owner = Owner(meta["name"], meta.get("namespace") or "default", meta["uid"])
    st = _Status(list(old.get("conditions") or []), meta.get("generation"), now)
    spec = _accepted_spec(body, observed, config, st)
    job = observed.job
    terminal = old.get("phase") in TERMINAL_PHASES or job_finished(job)
    create: list[dict[str, Any]] = []
    if spec is not None and not terminal:
        create = _missing_children(spec, owner, observed, config)
    job_patch = _job_patch(spec, job) if spec is not None and not terminal else None
    if job is not None:
        _job_conditions(job, st)
    ready = int(((job or {}).get("status") or {}).get("ready") or 0)
    phase = derive_phase(st.conditions, ready)
    if old.get("phase") in TERMINAL_PHASES:
        phase = old["phase"]  # terminal is forever, even if the Job is gone
    status = {
        "phase": phase,
        "observedGeneration": meta.get("generation"),
        "conditions": st.conditions,
    }
    status |= _times(old, job, phase, now)
    if phase != old.get("phase"):
        st.events.append(_phase_event(old.get("phase"), phase, st.conditions))
    return Decision(create, job_patch, status, st.events)


def _accepted_spec(
    body: dict[str, Any], observed: Observed, config: OperatorConfig, st: _Status
) -> LoRAFineTuneSpec | None:
    """The spec to build from, with SpecAccepted set; None when nothing may be built."""
    meta = body["metadata"]
    started = started_spec(observed.configmap)
    envelope = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {"name": meta["name"], "namespace": meta.get("namespace")},
        "spec": body.get("spec"),
    }
    result = validate_body(envelope, "spec")
    problems = result.problems
    if result.resource is not None:
        problems = semantic_problems(result.resource.spec, config)
    if problems or result.resource is None:
        st.set(c.COND_SPEC_ACCEPTED, False, c.REASON_INVALID_SPEC, _describe(problems), warn=True)
        return started  # a running job keeps the spec it started with
    spec = result.resource.spec
    if started is None:
        st.set(c.COND_SPEC_ACCEPTED, True, c.REASON_SPEC_VALID, "spec accepted")
        return spec
    changed = immutable_changes(started, spec)
    if changed:
        message = (
            f"{', '.join(changed)} cannot change after the job started; revert "
            f"{'it' if len(changed) == 1 else 'them'} or create a new LoRAFineTune "
            f"(only {', '.join('spec.' + f for f in LIVE_FIELDS)} may change)"
        )
        st.set(c.COND_SPEC_ACCEPTED, False, c.REASON_IMMUTABLE_FIELD, message, warn=True)
    else:
        st.set(c.COND_SPEC_ACCEPTED, True, c.REASON_SPEC_VALID, "spec accepted")
    return started.model_copy(update={"run_policy": spec.run_policy})


def started_spec(configmap: dict[str, Any] | None) -> LoRAFineTuneSpec | None:
    """The spec the job started with (from its ConfigMap), if it started."""
    if configmap is None:
        return None
    try:
        doc = json.loads((configmap.get("data") or {})[SPEC_FILE])
        return LoRAFineTuneSpec.model_validate(doc["spec"])
    except (KeyError, TypeError, ValueError, ValidationError):
        return None


def immutable_changes(started: LoRAFineTuneSpec, current: LoRAFineTuneSpec) -> list[str]:
    """Field paths (spec.a.b) that differ, outside the live fields."""
    before, after = started.to_wire(), current.to_wire()
    for key in LIVE_FIELDS:
        before.pop(key, None)
        after.pop(key, None)
    return _diff(before, after, "spec")


def _diff(before: Any, after: Any, path: str) -> list[str]:
    if isinstance(before, dict) and isinstance(after, dict):
        return [
            p
            for key in sorted(set(before) | set(after))
            for p in _diff(before.get(key), after.get(key), f"{path}.{key}")
        ]
    return [] if before == after else [path]


def _describe(problems: Sequence[Problem]) -> str:
    return "; ".join(str(p) for p in problems) or "the spec is invalid"


def _missing_children(
    spec: LoRAFineTuneSpec, owner: Owner, observed: Observed, config: OperatorConfig
) -> list[dict[str, Any]]:
    children = []
    if observed.configmap is None:
        children.append(build_spec_configmap(spec, owner))
    if observed.service is None:
        children.append(build_headless_service(spec, owner))
    if observed.job is None:
        image = spec.image or config.trainer_image
        children.append(build_indexed_job(spec, owner, image))
    return children


def _job_patch(spec: LoRAFineTuneSpec, job: dict[str, Any] | None) -> dict[str, Any] | None:
    """The live run-policy fields of the Job that differ from the spec."""
    if job is None:
        return None
    jspec = job.get("spec") or {}
    patch: dict[str, Any] = {}
    kueue = c.KUEUE_QUEUE_LABEL in ((job.get("metadata") or {}).get("labels") or {})
    if not kueue and bool(jspec.get("suspend")) != spec.run_policy.suspend:
        patch["suspend"] = spec.run_policy.suspend  # Kueue owns suspend of its jobs
    deadline = spec.run_policy.active_deadline_seconds
    if jspec.get("activeDeadlineSeconds") != deadline:
        patch["activeDeadlineSeconds"] = deadline
    return patch or None


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


def _job_conditions(job: dict[str, Any], st: _Status) -> None:
    """Running/Succeeded/Failed/Suspended from the Job's spec and conditions."""
    complete, failed = job_condition(job, "Complete"), job_condition(job, "Failed")
    if complete is not None:
        st.set(c.COND_SUCCEEDED, True, REASON_COMPLETED, "every pod of the job succeeded")
        st.set(c.COND_RUNNING, False, REASON_COMPLETED, "the job succeeded")
        st.clear(c.COND_SUSPENDED, REASON_COMPLETED, "the job succeeded")
    elif failed is not None:
        reason = failure_reason(failed)
        st.set(c.COND_FAILED, True, reason, failed.get("message") or "the job failed")
        st.set(c.COND_RUNNING, False, reason, "the job failed")
        st.clear(c.COND_SUSPENDED, reason, "the job failed")
    elif (job.get("spec") or {}).get("suspend"):
        labels = (job.get("metadata") or {}).get("labels") or {}
        queued = c.KUEUE_QUEUE_LABEL in labels
        reason = REASON_QUEUED if queued else c.REASON_USER_SUSPENDED
        message = "waiting for Kueue to admit the job" if queued else "spec.runPolicy.suspend"
        st.set(c.COND_SUSPENDED, True, reason, message)
        st.set(c.COND_RUNNING, False, reason, "the job is suspended")
    else:
        st.clear(c.COND_SUSPENDED, REASON_RESUMED, "the job runs again")
        st.set(c.COND_RUNNING, True, REASON_STARTED, "the training pods are scheduled")


def _times(old: dict[str, Any], job: dict[str, Any] | None, phase: str, now: str) -> dict[str, Any]:
    jstatus = (job or {}).get("status") or {}
    times: dict[str, Any] = {}
    start = old.get("startTime") or jstatus.get("startTime")
    if start:
        times["startTime"] = start
    if phase in TERMINAL_PHASES:
        times["completionTime"] = old.get("completionTime") or jstatus.get("completionTime") or now
    return times


def _phase_event(old: str | None, new: str, conditions: Sequence[dict[str, Any]]) -> EventNote:
    cond = {c.PHASE_SUCCEEDED: c.COND_SUCCEEDED, c.PHASE_FAILED: c.COND_FAILED,
            c.PHASE_SUSPENDED: c.COND_SUSPENDED}.get(new)  # fmt: skip
    detail = next((x for x in conditions if x.get("type") == cond), None)
    message = f"phase {old or 'none'} -> {new}"
    if detail is not None:
        message += f": {detail.get('reason')}: {detail.get('message')}"
    return EventNote("Warning" if new == c.PHASE_FAILED else "Normal", new, message)
