"""Status helpers (pure): metav1 conditions keyed by type, and the phase a job is in.

Conditions follow the Kubernetes API conventions: one entry per type, lastTransitionTime
changes only when status changes, observedGeneration records the spec generation the
condition was computed for. The phase is derived from the conditions, never stored apart
from them, so `kubectl get lft` cannot show a stale phase (Kubeflow's printer-column bug).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lora_operator.api import constants as c


@dataclass(frozen=True)
class ConditionChange:
    """What set_condition did: None when nothing changed, else the new status."""

    type: str
    status: str
    reason: str
    message: str


def set_condition(
    conditions: Sequence[dict[str, Any]],
    type_: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> tuple[list[dict[str, Any]], ConditionChange | None]:
    """The conditions with TYPE set; the change to report as an Event, if it transitioned."""
    status_text = status if isinstance(status, str) else ("True" if status else "False")
    current = next((dict(x) for x in conditions if x.get("type") == type_), None)
    entry = {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
        "observedGeneration": generation,
    }
    transitioned = current is None or current.get("status") != status_text
    if not transitioned and current is not None:
        entry["lastTransitionTime"] = current.get("lastTransitionTime", now)
    if generation is None:
        entry.pop("observedGeneration")
    others = [dict(x) for x in conditions if x.get("type") != type_]
    changed = (
        transitioned
        or current is None  # (implied by transitioned; narrows the type)
        or any(current.get(k) != entry.get(k) for k in ("reason", "message", "observedGeneration"))
    )
    report = ConditionChange(type_, status_text, reason, message) if transitioned else None
    return ([*others, entry] if changed else [dict(x) for x in conditions]), report


def is_true(conditions: Sequence[dict[str, Any]], type_: str) -> bool:
    return any(x.get("type") == type_ and x.get("status") == "True" for x in conditions)


def derive_phase(conditions: Sequence[dict[str, Any]], pods_running: int) -> str:
    """The phase column: terminal conditions win, then Suspended, then Running/Starting."""
    for type_, phase in (
        (c.COND_SUCCEEDED, c.PHASE_SUCCEEDED),
        (c.COND_FAILED, c.PHASE_FAILED),
        (c.COND_SUSPENDED, c.PHASE_SUSPENDED),
    ):
        if is_true(conditions, type_):
            return phase
    if is_true(conditions, c.COND_RUNNING):
        return c.PHASE_RUNNING if pods_running > 0 else c.PHASE_STARTING
    return c.PHASE_PENDING
