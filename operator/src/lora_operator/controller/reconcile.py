"""Reconcile (pure): a LoRAFineTune and its observed children -> what to do.

The decision is a function of the object and what exists, never of the event that woke the
operator, so an operator restart, a missed event or a repeated one converge to the same
state: create the missing children (deterministic names; a 409 is success), patch the Job's
live fields, write the status. The ConfigMap holding the resolved spec is the record of
what started: training fields are compared with it (immutable after start), and a terminal
job never gets children again.
"""

from __future__ import annotations

from typing import Any

from lora_operator.api import constants as c
from lora_operator.builders import (
    Owner,
)
from lora_operator.conditions import derive_phase
from lora_operator.controller.health_status import apply_final_health, apply_health
from lora_operator.controller.health_watch import Probe
from lora_operator.controller.lifecycle import (
    completed_progress,
    create_children,
    job_conditions,
    live_job_patch,
    phase_event,
    restart_gang,
    status_times,
    ttl_passed,
)
from lora_operator.controller.settings import OperatorConfig
from lora_operator.controller.spec_accept import (
    LIVE_FIELDS,
    accepted_spec,
    immutable_changes,
    started_spec,
)
from lora_operator.controller.state import (
    ANNOTATION_HEALTH_SUSPEND,
    TERMINAL_PHASES,
    Decision,
    EventNote,
    Observed,
    StatusDraft,
    Writes,
    failure_reason,
    job_condition,
    job_finished,
    job_running,
)

__all__ = [  # the reconcile API (tests and handlers import from here)
    "ANNOTATION_HEALTH_SUSPEND",
    "LIVE_FIELDS",
    "TERMINAL_PHASES",
    "Decision",
    "EventNote",
    "Observed",
    "failure_reason",
    "immutable_changes",
    "job_condition",
    "job_finished",
    "reconcile",
    "started_spec",
]


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
    st = StatusDraft(list(old.get("conditions") or []), meta.get("generation"), now)
    spec = accepted_spec(body, observed, config, st)
    status: dict[str, Any] = {}
    out = Writes()
    was_terminal = old.get("phase") in TERMINAL_PHASES
    job = observed.job
    if spec is not None and not was_terminal:
        job = restart_gang(spec, job, old, st, status, out)
    terminal = was_terminal or job_finished(job)
    if spec is not None and not terminal:
        create_children(spec, owner, observed, job, config, st, out)
        out.job_patch = live_job_patch(spec, job) if out.delete_job is None else None
    if job is not None:
        job_conditions(job, st, spec, meta)
    if probe is not None and spec is not None and not terminal and job_running(job):
        apply_health(spec, old, probe, st, status, out, body, job)
    ready = int(((job or {}).get("status") or {}).get("ready") or 0)
    phase = derive_phase(st.conditions, ready)
    if st.get(c.COND_PREFLIGHT_PASSED) and phase == c.PHASE_PENDING:
        phase = c.PHASE_STARTING if not out.preflight_failed else phase
    if was_terminal:
        phase = old["phase"]  # terminal is forever, even if the Job is gone
    elif phase in TERMINAL_PHASES and spec is not None and observed.final_health is not None:
        apply_final_health(spec, old, observed.final_health, st, status)
    status |= {
        "phase": phase,
        "observedGeneration": meta.get("generation"),
        "conditions": st.conditions,
    }
    status |= status_times(old, job, phase, now)
    if phase == c.PHASE_SUCCEEDED and old.get("phase") != phase and "progress" not in status:
        status |= completed_progress(old)
    if phase != old.get("phase"):
        st.events.append(phase_event(old.get("phase"), phase, st.conditions))
    delete_self = phase in TERMINAL_PHASES and ttl_passed(spec, body, status, now)
    return Decision(
        out.create, out.job_patch, status, st.events, out.delete_job, out.lft_patch, delete_self,
        out.lft_patch_events,
    )  # fmt: skip
