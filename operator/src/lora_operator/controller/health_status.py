"""Health readings into the status (pure): progress, metrics, health and Degraded from a
/health read or the trainer's final verdict, and onDegraded's action."""

from __future__ import annotations

from typing import Any

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.conditions import is_true
from lora_operator.controller.health_watch import Probe, assess
from lora_operator.controller.state import (
    ANNOTATION_HEALTH_SUSPEND,
    REASON_RECOVERED,
    EventNote,
    StatusDraft,
    Writes,
)


def apply_health(
    spec: LoRAFineTuneSpec,
    old: dict[str, Any],
    probe: Probe,
    st: StatusDraft,
    status: dict[str, Any],
    out: Writes,
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
        out.lft_patch_events.append(
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


def apply_final_health(
    spec: LoRAFineTuneSpec,
    old: dict[str, Any],
    body: dict[str, Any],
    st: StatusDraft,
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
