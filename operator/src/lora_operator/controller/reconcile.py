"""Reconcile (pure): a LoRAFineTune and its observed children -> what to do.

The decision is a function of the object and what exists, never of the event that woke the
operator, so an operator restart, a missed event or a repeated one converge to the same
state: create the missing children (deterministic names; a 409 is success), patch the Job's
live fields, write the status. The ConfigMap holding the resolved spec is the record of
what started: training fields are compared with it (immutable after start), and a terminal
job never gets children again.
"""

from __future__ import annotations

import functools
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
    build_preflight_job,
    build_spec_configmap,
)
from lora_operator.builders.names import SPEC_FILE
from lora_operator.conditions import derive_phase, is_true, set_condition
from lora_operator.controller.health_watch import Probe, assess, parse_time
from lora_operator.controller.settings import OperatorConfig
from lora_operator.controller.spec_checks import semantic_problems
from lora_operator.validation import DocumentResult, validate_body

LIVE_FIELDS = ("runPolicy",)  # may change while running; everything else is fixed at start
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
VALIDATION_CACHE = 4096  # distinct specs kept validated (a few KiB each)
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
    events: list[EventNote] = field(default_factory=list)
    delete_job: str | None = None  # uid of the training Job to delete (restart, Fail)
    lft_patch: dict[str, Any] | None = None  # merge patch of the LoRAFineTune (not status)
    delete_self: bool = False  # ttlSecondsAfterFinished passed

    @property
    def degraded_reason(self) -> str | None:
        """The Degraded condition's reason while it is True (for the operator's metrics)."""
        conds = self.status.get("conditions") or []
        hit = next((x for x in conds if x.get("type") == c.COND_DEGRADED), None)
        return hit.get("reason") if hit and hit.get("status") == "True" else None


@dataclass
class _Status:
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


def reconcile(
    body: dict[str, Any],
    observed: Observed,
    config: OperatorConfig,
    now: str,
    probe: Probe | None = None,
) -> Decision:
    """The decision for one LoRAFineTune (see the module docstring). PROBE: a fresh read of
    the rank-0 trainer's /health (the health timer), or None (keep the health status)."""
    meta, old = body["metadata"], body.get("status") or {}
    owner = Owner(meta["name"], meta.get("namespace") or "default", meta["uid"])
    st = _Status(list(old.get("conditions") or []), meta.get("generation"), now)
    spec = _accepted_spec(body, observed, config, st)
    status: dict[str, Any] = {}
    out = _Out()
    was_terminal = old.get("phase") in TERMINAL_PHASES
    job = observed.job
    if spec is not None and not was_terminal:
        job = _restart(spec, job, old, st, status, out)
    terminal = was_terminal or job_finished(job)
    if spec is not None and not terminal:
        _children(spec, owner, observed, job, config, st, out)
        out.job_patch = _job_patch(spec, job) if out.delete_job is None else None
    if job is not None:
        _job_conditions(job, st, spec, meta)
    if probe is not None and spec is not None and not terminal and _running(job):
        _health(spec, old, probe, st, status, out, body, job)
    ready = int(((job or {}).get("status") or {}).get("ready") or 0)
    phase = derive_phase(st.conditions, ready)
    if st.get(c.COND_PREFLIGHT_PASSED) and phase == c.PHASE_PENDING:
        phase = c.PHASE_STARTING if not out.preflight_failed else phase
    if was_terminal:
        phase = old["phase"]  # terminal is forever, even if the Job is gone
    elif phase in TERMINAL_PHASES and spec is not None and observed.final_health is not None:
        _final_health(spec, old, observed.final_health, st, status)
    status |= {
        "phase": phase,
        "observedGeneration": meta.get("generation"),
        "conditions": st.conditions,
    }
    status |= _times(old, job, phase, now)
    if phase == c.PHASE_SUCCEEDED and old.get("phase") != phase and "progress" not in status:
        status |= _completed_progress(old)
    if phase != old.get("phase"):
        st.events.append(_phase_event(old.get("phase"), phase, st.conditions))
    delete_self = phase in TERMINAL_PHASES and _ttl_passed(spec, body, status, now)
    return Decision(
        out.create, out.job_patch, status, st.events, out.delete_job, out.lft_patch, delete_self
    )


@dataclass
class _Out:
    """The writes a reconcile decides, gathered by its steps."""

    create: list[dict[str, Any]] = field(default_factory=list)
    job_patch: dict[str, Any] | None = None
    delete_job: str | None = None
    lft_patch: dict[str, Any] | None = None
    preflight_failed: bool = False


def _running(job: dict[str, Any] | None) -> bool:
    """The training Job exists, is not suspended and has not finished."""
    return job is not None and not (job.get("spec") or {}).get("suspend") and not job_finished(job)


def _restart(
    spec: LoRAFineTuneSpec,
    job: dict[str, Any] | None,
    old: dict[str, Any],
    st: _Status,
    status: dict[str, Any],
    out: _Out,
) -> dict[str, Any] | None:
    """Whole-gang restart after an infrastructure failure, within runPolicy.backoffLimit.

    A pod failure fails the Job (its backoffLimit is 0); the operator counts the restart in
    status (with the failed Job's uid, so it is counted once even if the delete is retried)
    and deletes the Job; the next reconcile creates it again and the trainer resumes from its
    last checkpoint. Returns the Job as the rest of the reconcile should see it (None while
    it is being replaced).
    """
    failed = job_condition(job, "Failed")
    if job is None or failed is None or failure_reason(failed) != c.REASON_BACKOFF_LIMIT:
        return job
    uid = job["metadata"].get("uid")
    restarts = int(old.get("restarts") or 0)
    limit = spec.run_policy.backoff_limit
    if uid is None or old.get("restartedJobUid") != uid:
        if restarts >= limit:
            return job  # exhausted: the Job's failure stands (see _job_conditions)
        restarts += 1
        status |= {"restarts": restarts, "restartedJobUid": uid}
        cause = failed.get("message") or "a pod failed"
        st.events.append(
            EventNote(
                "Warning",
                REASON_RESTARTING,
                f"{cause}; restarting the whole gang from the last checkpoint "
                f"(restart {restarts} of spec.runPolicy.backoffLimit {limit})",
            )
        )
    out.delete_job = uid
    st.set(c.COND_RUNNING, True, REASON_RESTARTING, f"gang restart {restarts} of {limit}")
    return None


def _children(
    spec: LoRAFineTuneSpec,
    owner: Owner,
    observed: Observed,
    job: dict[str, Any] | None,
    config: OperatorConfig,
    st: _Status,
    out: _Out,
) -> None:
    """Create what is missing: ConfigMap and Service, then the pre-flight Job, then (once it
    passed, or without pre-flight) the training Job."""
    if observed.configmap is None:
        out.create.append(build_spec_configmap(spec, owner))
    if observed.service is None:
        out.create.append(build_headless_service(spec, owner))
    if job is not None or out.delete_job is not None:
        return
    image = spec.image or config.trainer_image
    preflight = spec.health.preflight.enabled and observed.job is None
    if preflight and not _preflight(spec, owner, observed, image, st, out):
        return
    out.create.append(build_indexed_job(spec, owner, image))


def _preflight(
    spec: LoRAFineTuneSpec,
    owner: Owner,
    observed: Observed,
    image: str,
    st: _Status,
    out: _Out,
) -> bool:
    """PreflightPassed from the pre-flight pod; True when training may start."""
    cond = st.get(c.COND_PREFLIGHT_PASSED)
    if cond is not None and cond.get("status") == "True":
        return True
    pjob = observed.preflight_job
    if pjob is None:
        out.create.append(build_preflight_job(spec, owner, image))
    if pjob is None or not job_finished(pjob):
        st.set(
            c.COND_PREFLIGHT_PASSED,
            "Unknown",
            REASON_PREFLIGHT_RUNNING,
            "the pre-flight pod checks data, adapter and a few instrumented steps",
        )
        return False
    code, message = _preflight_result(pjob, observed.preflight_pod)
    if code == c.EXIT_VERDICT_HEALTHY:
        st.set(c.COND_PREFLIGHT_PASSED, True, REASON_PREFLIGHT_PASSED, message)
        return True
    if code == c.EXIT_VERDICT_WARNING:
        st.set(c.COND_PREFLIGHT_PASSED, True, REASON_PREFLIGHT_WARNINGS, message, warn_on_true=True)
        return True
    if code != c.EXIT_VERDICT_DEGRADED:
        message = f"the pre-flight pod did not finish its checks (exit {code}): {message}"
    st.set(c.COND_PREFLIGHT_PASSED, False, REASON_PREFLIGHT_FAILED, message, warn=True)
    st.set(c.COND_FAILED, True, REASON_PREFLIGHT_FAILED, f"no training pod started: {message}")
    out.preflight_failed = True
    return False


def _preflight_result(pjob: dict[str, Any], pod: dict[str, Any] | None) -> tuple[int | None, str]:
    """(exit code, termination message) of the pre-flight container."""
    statuses = ((pod or {}).get("status") or {}).get("containerStatuses") or []
    terminated = next(
        (s["state"]["terminated"] for s in statuses if (s.get("state") or {}).get("terminated")),
        None,
    )
    if terminated is None:
        failed = job_condition(pjob, "Failed") or {}
        return None, failed.get("message") or failed.get("reason") or "no pod status"
    message = (terminated.get("message") or "").strip() or terminated.get("reason") or ""
    return terminated.get("exitCode"), message


def _health(
    spec: LoRAFineTuneSpec,
    old: dict[str, Any],
    probe: Probe,
    st: _Status,
    status: dict[str, Any],
    out: _Out,
    body: dict[str, Any],
    job: dict[str, Any] | None,
) -> None:
    """A /health reading: progress, metrics, health, Degraded, and onDegraded's action."""
    running = st.get(c.COND_RUNNING)
    since = running.get("lastTransitionTime") if running and running["status"] == "True" else None
    outcome = assess(spec, old, probe, since, st.now)
    status |= outcome.status
    if not outcome.known:
        return  # a failed read never marks a job Degraded, nor clears it
    bad = outcome.degraded
    if bad is None:
        was = is_true(st.conditions, c.COND_DEGRADED)
        st.set(c.COND_DEGRADED, False, c.REASON_HEALTHY, "no Degraded or Critical rule fires")
        if was:
            st.events.append(EventNote("Normal", REASON_RECOVERED, "no rule fires any more"))
        return
    st.set(c.COND_DEGRADED, True, bad.rule, bad.message, warn_on_true=True)
    policy = spec.health.on_degraded
    if policy == "Suspend" and not spec.run_policy.suspend:
        note = f"{bad.rule}: {bad.message}"
        out.lft_patch = {
            "metadata": {"annotations": {ANNOTATION_HEALTH_SUSPEND: note}},
            "spec": {"runPolicy": {"suspend": True}},
        }
        out.job_patch = (out.job_patch or {}) | {"suspend": True}
        st.events.append(
            EventNote(
                "Warning",
                c.REASON_HEALTH_POLICY,
                f"suspending (spec.health.onDegraded=Suspend; checkpoints kept; resume with "
                f"spec.runPolicy.suspend=false): {note}",
            )
        )
    elif policy == "Fail" and job is not None:
        message = f"spec.health.onDegraded=Fail: {bad.rule}: {bad.message}"
        st.set(c.COND_FAILED, True, c.REASON_HEALTH_POLICY, message)
        st.set(c.COND_RUNNING, False, c.REASON_HEALTH_POLICY, "stopped by the health policy")
        out.delete_job = job["metadata"].get("uid")
        out.job_patch = None


def _final_health(
    spec: LoRAFineTuneSpec,
    old: dict[str, Any],
    body: dict[str, Any],
    st: _Status,
    status: dict[str, Any],
) -> None:
    """The trainer's last verdict (its termination message) when the job ends: a job too
    short for the health timer still ends with its progress, metrics and verdict."""
    outcome = assess(spec, old, Probe(body=body), None, st.now, judge_stall=False)
    if not outcome.known:
        return
    status |= outcome.status
    bad = outcome.degraded
    if bad is not None:
        st.set(c.COND_DEGRADED, True, bad.rule, bad.message, warn_on_true=True)
    else:
        st.set(c.COND_DEGRADED, False, c.REASON_HEALTHY, "no Degraded or Critical rule fired")


def _completed_progress(old: dict[str, Any]) -> dict[str, Any]:
    """Progress at success: every planned step done (the last /health read may be older)."""
    progress = dict(old.get("progress") or {})
    total = progress.get("totalSteps")
    if not total:
        return {}
    return {"progress": progress | {"step": total, "percent": 100.0, "etaSeconds": 0.0}}


def _ttl_passed(
    spec: LoRAFineTuneSpec | None, body: dict[str, Any], status: dict[str, Any], now: str
) -> bool:
    """ttlSecondsAfterFinished has passed since completionTime."""
    ttl = spec.run_policy.ttl_seconds_after_finished if spec is not None else None
    if ttl is None:
        raw = ((body.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
        ttl = raw if isinstance(raw, int) and raw >= 0 else None
    done, current = parse_time(status.get("completionTime")), parse_time(now)
    if ttl is None or done is None or current is None:
        return False
    return (current - done).total_seconds() >= ttl


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
    result = _validated(json.dumps(envelope, sort_keys=True))
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


@functools.lru_cache(maxsize=VALIDATION_CACHE)
def _validated(envelope: str) -> DocumentResult:
    """validate_body of a JSON text, memoized: a spec is validated (CEL included) once, not
    on every health tick of every job. Results are never mutated."""
    return validate_body(json.loads(envelope), "spec")


def started_spec(configmap: dict[str, Any] | None) -> LoRAFineTuneSpec | None:
    """The spec the job started with (from its ConfigMap), if it started."""
    if configmap is None:
        return None
    text = (configmap.get("data") or {}).get(SPEC_FILE)
    return _started_from(text) if isinstance(text, str) else None


@functools.lru_cache(maxsize=VALIDATION_CACHE)
def _started_from(text: str) -> LoRAFineTuneSpec | None:
    try:
        return LoRAFineTuneSpec.model_validate(json.loads(text)["spec"])
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


def _job_conditions(
    job: dict[str, Any], st: _Status, spec: LoRAFineTuneSpec | None, meta: dict[str, Any]
) -> None:
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
        by_health = (meta.get("annotations") or {}).get(ANNOTATION_HEALTH_SUSPEND)
        if by_health and not queued and (spec is None or spec.run_policy.suspend):
            reason = c.REASON_HEALTH_POLICY
            message = (
                f"suspended by spec.health.onDegraded=Suspend ({by_health}); checkpoints are "
                "kept; resume with spec.runPolicy.suspend=false"
            )
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
