"""Table columns of the built-in kinds the local runner produces (kubectl get pods / jobs).

Simplified versions of kube-apiserver's printers (pkg/printers/internalversion/printers.go):
pods show READY, STATUS (the container's waiting/terminated reason, Terminating, or the
phase), RESTARTS, IP; jobs show STATUS, COMPLETIONS and DURATION.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
Printer = tuple[list[Obj], Callable[[Obj], dict[str, Any]]]  # columns, cells by name


def _col(name: str, priority: int = 0, type_: str = "string") -> Obj:
    return {"name": name, "type": type_, "format": "", "description": "", "priority": priority}


def _pod_status(pod: Obj) -> str:
    status = pod.get("status") or {}
    reason = str(status.get("phase") or "Pending")
    for cs in status.get("containerStatuses") or []:
        state = cs.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif (state.get("terminated") or {}).get("reason"):
            reason = state["terminated"]["reason"]
    if pod["metadata"].get("deletionTimestamp"):
        return "Terminating"
    return reason


def _pod_cells(pod: Obj) -> dict[str, Any]:
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    total = len((pod.get("spec") or {}).get("containers") or [])
    ready = sum(1 for cs in statuses if cs.get("ready"))
    restarts = sum(int(cs.get("restartCount", 0)) for cs in statuses)
    ip = (pod.get("status") or {}).get("podIP") or "<none>"
    node = (pod.get("spec") or {}).get("nodeName") or "<none>"
    return {
        "Ready": f"{ready}/{total}",
        "Status": _pod_status(pod),
        "Restarts": restarts,
        "IP": ip,
        "Node": node,
    }


def _true(obj: Obj, ctype: str) -> bool:
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == ctype and c.get("status") == "True" for c in conds)


def _seconds(start: str | None, end: str | None) -> str:
    if not start:
        return ""
    stop = _parse(end) if end else datetime.datetime.now(datetime.UTC)
    return f"{max(0, int((stop - _parse(start)).total_seconds()))}s"


def _parse(stamp: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _job_cells(job: Obj) -> dict[str, Any]:
    status, spec = job.get("status") or {}, job.get("spec") or {}
    state = "Running"
    for ctype in ("Complete", "Failed", "Suspended", "FailureTarget", "SuccessCriteriaMet"):
        if _true(job, ctype):
            state = ctype
            break
    completions = f"{status.get('succeeded', 0)}/{spec.get('completions', 1)}"
    duration = _seconds(status.get("startTime"), status.get("completionTime"))
    return {"Status": state, "Completions": completions, "Duration": duration}


PRINTERS: dict[tuple[str, str], Printer] = {
    ("", "pods"): (
        [
            _col("Ready"),
            _col("Status"),
            _col("Restarts", type_="integer"),
            _col("IP", 1),
            _col("Node", 1),
        ],
        _pod_cells,
    ),
    ("batch", "jobs"): ([_col("Status"), _col("Completions"), _col("Duration")], _job_cells),
}
