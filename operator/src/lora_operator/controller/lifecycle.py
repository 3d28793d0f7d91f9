"""The job's lifecycle steps of a reconcile (pure): children and the pre-flight gate, gang
restarts, the Job's live fields, conditions from the Job, times, phase Events, TTL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.builders import (
    Owner,
    build_headless_service,
    build_indexed_job,
    build_preflight_job,
    build_spec_configmap,
)
from lora_operator.controller.health_watch import parse_time
from lora_operator.controller.settings import OperatorConfig
from lora_operator.controller.state import (
    ANNOTATION_HEALTH_SUSPEND,
    REASON_COMPLETED,
    REASON_PREFLIGHT_FAILED,
    REASON_PREFLIGHT_PASSED,
    REASON_PREFLIGHT_RUNNING,
    REASON_PREFLIGHT_WARNINGS,
    REASON_QUEUED,
    REASON_RESTARTING,
    REASON_RESUMED,
    REASON_STARTED,
    TERMINAL_PHASES,
    EventNote,
    Observed,
    StatusDraft,
    Writes,
    failure_reason,
    job_condition,
    job_finished,
)


def restart_gang(
    spec: LoRAFineTuneSpec,
    job: dict[str, Any] | None,
    old: dict[str, Any],
    st: StatusDraft,
    status: dict[str, Any],
    out: Writes,
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
            return job  # exhausted: the Job's failure stands (see job_conditions)
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


def create_children(
    spec: LoRAFineTuneSpec,
    owner: Owner,
    observed: Observed,
    job: dict[str, Any] | None,
    config: OperatorConfig,
    st: StatusDraft,
    out: Writes,
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
    if preflight and not preflight_gate(spec, owner, observed, image, st, out):
        return
    out.create.append(build_indexed_job(spec, owner, image))


def preflight_gate(
    spec: LoRAFineTuneSpec,
    owner: Owner,
    observed: Observed,
    image: str,
    st: StatusDraft,
    out: Writes,
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
    code, message = preflight_result(pjob, observed.preflight_pod)
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


def preflight_result(pjob: dict[str, Any], pod: dict[str, Any] | None) -> tuple[int | None, str]:
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


def completed_progress(old: dict[str, Any]) -> dict[str, Any]:
    """Progress at success: every planned step done (the last /health read may be older)."""
    progress = dict(old.get("progress") or {})
    total = progress.get("totalSteps")
    if not total:
        return {}
    return {"progress": progress | {"step": total, "percent": 100.0, "etaSeconds": 0.0}}


def ttl_passed(
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


def live_job_patch(spec: LoRAFineTuneSpec, job: dict[str, Any] | None) -> dict[str, Any] | None:
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


def job_conditions(
    job: dict[str, Any], st: StatusDraft, spec: LoRAFineTuneSpec | None, meta: dict[str, Any]
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


def status_times(
    old: dict[str, Any], job: dict[str, Any] | None, phase: str, now: str
) -> dict[str, Any]:
    jstatus = (job or {}).get("status") or {}
    times: dict[str, Any] = {}
    start = old.get("startTime") or jstatus.get("startTime")
    if start:
        times["startTime"] = start
    if phase in TERMINAL_PHASES:
        times["completionTime"] = old.get("completionTime") or jstatus.get("completionTime") or now
    return times


def phase_event(old: str | None, new: str, conditions: Sequence[dict[str, Any]]) -> EventNote:
    cond = {c.PHASE_SUCCEEDED: c.COND_SUCCEEDED, c.PHASE_FAILED: c.COND_FAILED,
            c.PHASE_SUSPENDED: c.COND_SUSPENDED}.get(new)  # fmt: skip
    detail = next((x for x in conditions if x.get("type") == cond), None)
    message = f"phase {old or 'none'} -> {new}"
    if detail is not None:
        message += f": {detail.get('reason')}: {detail.get('message')}"
    return EventNote("Warning" if new == c.PHASE_FAILED else "Normal", new, message)
