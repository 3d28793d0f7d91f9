"""The local Job controller for batch/v1 Indexed Jobs (what kube-controller-manager does).

Honoured: completions and parallelism (one pod per pending index, at most `parallelism`
active), pod names `<job>-<index>-<rand>` with the Job labels
(batch.kubernetes.io/job-name, controller-uid, job-completion-index), the completion-index
annotation, JOB_COMPLETION_INDEX env, hostname `<job>-<index>` (+ template subdomain) and a
controlling ownerReference (garbage collection deletes the pods with the Job); the
`batch.kubernetes.io/job-tracking` finalizer so every terminated pod is counted once
(status.succeeded/failed, completedIndexes) even when the pod is deleted: listed in
status.uncountedTerminatedPods, released, then counted, so Complete/Failed never shows
while a counted pod still holds the finalizer and a failed status write loses no count;
backoffLimit
(a failed index gets a new pod until failed > backoffLimit -> Failed/BackoffLimitExceeded);
podFailurePolicy rules in order (onExitCodes In/NotIn with containerName, onPodConditions;
FailJob -> Failed/PodFailurePolicy, Ignore -> not counted, Count); suspend (active pods
deleted and not counted, Suspended condition, startTime reset; resume creates pods again);
activeDeadlineSeconds (Failed/DeadlineExceeded); FailureTarget / SuccessCriteriaMet first,
then Failed / Complete once no pod is terminating (Kubernetes 1.31+), completionTime.

Not emulated: NonIndexed Jobs (left alone), backoffLimitPerIndex / maxFailedIndexes /
FailIndex, successPolicy, the exponential back-off delay between retries (a failed index is
retried at once), podReplacementPolicy (a replacement waits for the old pod to terminate, the
behaviour with podFailurePolicy), ttlSecondsAfterFinished, managedBy (Jobs managed by
another controller are skipped), selector defaulting.
"""

from __future__ import annotations

import copy
import datetime
import random
from typing import Any

from lora_operator.local.kubeapi import KubeClient, Obj, path
from lora_operator.local.store import now_iso

PODS = "/api/v1/pods"
JOBS = "/apis/batch/v1/jobs"
TRACKING = "batch.kubernetes.io/job-tracking"
INDEX = "batch.kubernetes.io/job-completion-index"
JOB_NAME = "batch.kubernetes.io/job-name"
CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
_CHARS = "bcdfghjklmnpqrstvwxz2456789"
_INDEX_ENV = {
    "name": "JOB_COMPLETION_INDEX",
    "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{INDEX}']"}},
}


def format_indexes(indexes: set[int]) -> str:
    """`0-2,5,7,8`: the interval format of completedIndexes."""
    out, ordered = [], sorted(indexes)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        sep = "," if j == i + 1 else "-"  # as the Job controller writes it: 0,1 but 0-2
        out.append(str(ordered[i]) if i == j else f"{ordered[i]}{sep}{ordered[j]}")
        i = j + 1
    return ",".join(out)


def parse_indexes(text: str | None) -> set[int]:
    out: set[int] = set()
    for part in (text or "").split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def set_condition(conds: list[Obj], ctype: str, status: bool, reason: str, message: str) -> None:
    """Add or update a condition; lastTransitionTime changes only with the status."""
    value = "True" if status else "False"
    for cond in conds:
        if cond["type"] == ctype:
            if cond["status"] != value:
                cond["lastTransitionTime"] = now_iso()
            cond.update(status=value, reason=reason, message=message, lastProbeTime=now_iso())
            return
    conds.append(
        {
            "type": ctype,
            "status": value,
            "reason": reason,
            "message": message,
            "lastProbeTime": now_iso(),
            "lastTransitionTime": now_iso(),
        }
    )


def has_condition(status: Obj, ctype: str) -> bool:
    return any(c["type"] == ctype and c["status"] == "True" for c in status.get("conditions") or [])


def _uncounted(pods: list[Obj]) -> Obj:
    """status.uncountedTerminatedPods for PODS: their UIDs by how they ended."""
    out: Obj = {}
    for pod in pods:
        key = "succeeded" if _phase(pod) == "Succeeded" else "failed"
        out.setdefault(key, []).append(pod["metadata"]["uid"])
    return out


def _phase(pod: Obj) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def _index(pod: Obj) -> int:
    return int(pod["metadata"].get("labels", {}).get(INDEX, "-1"))


def policy_action(job: Obj, pod: Obj) -> tuple[str, str]:
    """The podFailurePolicy action for a failed pod (FailJob, Ignore or Count) and why."""
    rules = ((job["spec"].get("podFailurePolicy") or {}).get("rules")) or []
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    conditions = (pod.get("status") or {}).get("conditions") or []
    for i, rule in enumerate(rules):
        on_codes = rule.get("onExitCodes")
        if on_codes:
            for cs in statuses:
                code = ((cs.get("state") or {}).get("terminated") or {}).get("exitCode")
                if code in (None, 0) or on_codes.get("containerName") not in (None, cs["name"]):
                    continue
                hit = code in on_codes["values"]
                if hit == (on_codes.get("operator", "In") == "In"):
                    return rule["action"], (
                        f"Container {cs['name']} for pod {pod['metadata']['namespace']}/"
                        f"{pod['metadata']['name']} failed with exit code {code} matching "
                        f"{rule['action']} rule at index {i}"
                    )
        for pattern in rule.get("onPodConditions") or []:
            want = pattern.get("status", "True")
            if any(c["type"] == pattern["type"] and c["status"] == want for c in conditions):
                return rule["action"], (
                    f"Pod {pod['metadata']['namespace']}/{pod['metadata']['name']} has condition "
                    f"{pattern['type']} matching {rule['action']} rule at index {i}"
                )
    return "Count", ""


class JobController:
    """Reconciles Indexed Jobs with their pods (call `sync` on every change)."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    async def sync(self) -> None:
        jobs = await self.client.list(JOBS)
        pods = await self.client.list(f"{PODS}?labelSelector={CONTROLLER_UID}")
        by_uid: dict[str, list[Obj]] = {}
        for pod in pods:
            by_uid.setdefault(pod["metadata"]["labels"][CONTROLLER_UID], []).append(pod)
        for job in jobs:
            spec = job.get("spec") or {}
            if spec.get("completionMode") != "Indexed" or spec.get("managedBy") not in (
                None,
                "kubernetes.io/job-controller",
            ):
                continue
            await self._sync_job(job, by_uid.pop(job["metadata"]["uid"], []))
        for orphans in by_uid.values():  # the Job is gone: let garbage collection finish
            for pod in orphans:
                await self._release(pod)

    async def _release(self, pod: Obj) -> None:
        meta = pod["metadata"]
        if TRACKING in (meta.get("finalizers") or []):
            rest = [f for f in meta["finalizers"] if f != TRACKING]
            await self.client.patch(
                path("v1", "pods", meta["namespace"], meta["name"]),
                {"metadata": {"finalizers": rest or None}},
            )

    async def _delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        await self.client.delete(path("v1", "pods", meta["namespace"], meta["name"]))

    async def _sync_job(self, job: Obj, pods: list[Obj]) -> None:
        spec, meta, old = job["spec"], job["metadata"], job.get("status") or {}
        status: Obj = copy.deepcopy(old)
        finished = has_condition(old, "Complete") or has_condition(old, "Failed")
        counted, failure = self._count(job, pods, status, finished)
        live = [p for p in pods if _phase(p) not in ("Succeeded", "Failed")]
        active = [p for p in live if not p["metadata"].get("deletionTimestamp")]
        terminating = [p for p in live if p["metadata"].get("deletionTimestamp")]
        ending = not finished and self._decide(spec, status, failure)
        suspended = bool(spec.get("suspend"))
        if finished or ending or suspended:
            for pod in active:
                await self._delete(pod)
            terminating, active = terminating + active, []
        if not finished:
            self._suspension(status, suspended)
        if ending and not terminating:
            self._finish(status)
        if not (finished or ending or suspended):
            active += await self._scale(job, status, active, terminating)
        ready = [p for p in active if has_condition(p.get("status") or {}, "Ready")]
        status.update(active=len(active), ready=len(ready), terminating=len(terminating))
        status.update(uncountedTerminatedPods={})
        url = path("batch/v1", "jobs", meta["namespace"], meta["name"]) + "/status"
        listed = _uncounted(counted) if not finished else {}
        if listed:
            # as the real Job controller: the pods it counts are first listed as uncounted,
            # then their finalizers go, and only then the counts and a terminal condition
            # (Complete or Failed never shows while a counted pod still holds a finalizer)
            await self.client.patch(url, {"status": {"uncountedTerminatedPods": listed}})
        for pod in counted:
            await self._release(pod)
        if listed or status != old:
            cleared = dict.fromkeys(listed)  # a merge patch removes the lists with None
            await self.client.patch(url, {"status": status | {"uncountedTerminatedPods": cleared}})

    def _count(
        self, job: Obj, pods: list[Obj], status: Obj, finished: bool
    ) -> tuple[list[Obj], tuple[str, str] | None]:
        """Account terminated pods that still carry the tracking finalizer (or are listed in
        status.uncountedTerminatedPods), once each."""
        status.setdefault("succeeded", 0)
        status.setdefault("failed", 0)
        completed = parse_indexes(status.get("completedIndexes"))
        suspended = bool(job["spec"].get("suspend"))
        counted, failure = [], None
        # pods a sync listed and released but could not count (it stopped before its write)
        listed = {
            uid
            for uids in (status.get("uncountedTerminatedPods") or {}).values()
            for uid in uids or []
        }
        for pod in pods:
            if _phase(pod) not in ("Succeeded", "Failed"):
                continue
            tracked = TRACKING in (pod["metadata"].get("finalizers") or [])
            if not tracked and pod["metadata"]["uid"] not in listed:
                continue
            counted.append(pod)
            if finished:
                continue
            if _phase(pod) == "Succeeded":
                if _index(pod) not in completed:
                    status["succeeded"] += 1
                completed.add(_index(pod))
            elif not suspended and not has_condition(status, "FailureTarget"):
                action, why = policy_action(job, pod)  # pods stopped by suspend don't count
                if action != "Ignore":
                    status["failed"] += 1
                if action == "FailJob" and failure is None:
                    failure = ("PodFailurePolicy", why)
        if completed:
            status["completedIndexes"] = format_indexes(completed)
        return counted, failure

    def _decide(self, spec: Obj, status: Obj, failure: tuple[str, str] | None) -> bool:
        """Set FailureTarget or SuccessCriteriaMet when reached; True when the Job ends."""
        conds: list[Obj] = status.setdefault("conditions", [])
        failure = failure or self._failure(spec, status)
        if failure is not None and not has_condition(status, "FailureTarget"):
            set_condition(conds, "FailureTarget", True, *failure)
        completed = parse_indexes(status.get("completedIndexes"))
        if len(completed) >= int(spec.get("completions") or 1) and not has_condition(
            status, "SuccessCriteriaMet"
        ):
            message = "Reached expected number of succeeded pods"
            set_condition(conds, "SuccessCriteriaMet", True, "CompletionsReached", message)
        return has_condition(status, "FailureTarget") or has_condition(status, "SuccessCriteriaMet")

    def _suspension(self, status: Obj, suspended: bool) -> None:
        """Suspended condition; startTime is cleared while suspended and set on (re)start."""
        conds: list[Obj] = status.setdefault("conditions", [])
        if suspended:
            if not has_condition(status, "Suspended"):
                set_condition(conds, "Suspended", True, "JobSuspended", "Job suspended")
            status.pop("startTime", None)
            return
        if has_condition(status, "Suspended"):
            set_condition(conds, "Suspended", False, "JobResumed", "Job resumed")
        status.setdefault("startTime", now_iso())

    async def _scale(
        self, job: Obj, status: Obj, active: list[Obj], terminating: list[Obj]
    ) -> list[Obj]:
        """Create pods for pending indexes (none running, terminating or done), parallelism."""
        spec, ns = job["spec"], job["metadata"]["namespace"]
        busy = {_index(p) for p in active + terminating}
        busy |= parse_indexes(status.get("completedIndexes"))
        room = int(spec.get("parallelism", 1)) - len(active)
        pending = [i for i in range(int(spec.get("completions") or 1)) if i not in busy]
        return [
            await self.client.create(path("v1", "pods", ns), self._pod(job, index))
            for index in pending[: max(0, room)]
        ]

    def _failure(self, spec: Obj, status: Obj) -> tuple[str, str] | None:
        if status.get("failed", 0) > int(spec.get("backoffLimit", 6)):
            return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
        deadline, start = spec.get("activeDeadlineSeconds"), status.get("startTime")
        if deadline is not None and start and not spec.get("suspend"):
            started = datetime.datetime.fromisoformat(start.replace("Z", "+00:00"))
            age = datetime.datetime.now(datetime.UTC) - started
            if age.total_seconds() >= float(deadline):
                return "DeadlineExceeded", "Job was active longer than specified deadline"
        return None

    def _finish(self, status: Obj) -> None:
        """FailureTarget -> Failed, SuccessCriteriaMet -> Complete (no pod is terminating)."""
        conds: list[Obj] = status["conditions"]
        for cond in list(conds):
            if cond["type"] == "FailureTarget" and cond["status"] == "True":
                set_condition(conds, "Failed", True, cond["reason"], cond["message"])
                return
        for cond in list(conds):
            if cond["type"] == "SuccessCriteriaMet" and cond["status"] == "True":
                set_condition(conds, "Complete", True, cond["reason"], cond["message"])
                status["completionTime"] = now_iso()

    def _pod(self, job: Obj, index: int) -> Obj:
        meta, template = job["metadata"], copy.deepcopy(job["spec"]["template"])
        name, uid = meta["name"], meta["uid"]
        pmeta: dict[str, Any] = template.setdefault("metadata", {})
        suffix = "".join(random.choice(_CHARS) for _ in range(5))
        pmeta["name"] = f"{name}-{index}-{suffix}"
        pmeta["namespace"] = meta["namespace"]
        pmeta["labels"] = {
            **(pmeta.get("labels") or {}),
            CONTROLLER_UID: uid,
            "controller-uid": uid,
            JOB_NAME: name,
            "job-name": name,
            INDEX: str(index),
        }
        pmeta["annotations"] = {**(pmeta.get("annotations") or {}), INDEX: str(index)}
        pmeta["finalizers"] = [TRACKING]
        pmeta["ownerReferences"] = [
            {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "name": name,
                "uid": uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        spec = template.setdefault("spec", {})
        spec["hostname"] = f"{name}-{index}"
        for container in spec.get("containers") or []:
            container["env"] = [_INDEX_ENV, *(container.get("env") or [])]
        return {"apiVersion": "v1", "kind": "Pod", **template}
