"""reconcile (pure) over a job's life: pre-flight, gang restart, health readings, TTL."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, cast

import kopf
import pytest

from lora_operator.api import constants as c
from lora_operator.builders import (
    Owner,
    build_indexed_job,
    build_preflight_job,
    build_spec_configmap,
)
from lora_operator.controller.handlers import Controller
from lora_operator.controller.health_watch import Probe
from lora_operator.controller.kube import ApiError
from lora_operator.controller.reconcile import (
    ANNOTATION_HEALTH_SUSPEND,
    Decision,
    Observed,
    reconcile,
)
from lora_operator.controller.settings import OperatorConfig
from lora_operator.validation import validate_body
from tests.conftest import deep_merge

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:01:00Z"
CONFIG = OperatorConfig(trainer_image="ghcr.io/lora-operator/trainer:0.1.0")
OWNER = Owner("quickstart", "default", "uid-1")
Body = dict[str, Any]


@pytest.fixture
def body(make_body: Callable[[dict[str, Any]], Body]) -> Body:
    """The quickstart as the API server returns it (pre-flight on: the default)."""
    return make_body({"metadata": {"uid": "uid-1", "namespace": "default", "generation": 1}})


def built(body: Body) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(ConfigMap, training Job, pre-flight Job) as the operator creates them from BODY."""
    result = validate_body(body)
    assert result.resource is not None, result.problems
    spec = result.resource.spec
    return (
        build_spec_configmap(spec, OWNER),
        build_indexed_job(spec, OWNER, CONFIG.trainer_image),
        build_preflight_job(spec, OWNER, CONFIG.trainer_image),
    )


def job_cond(type_: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": message}


def with_status(job: dict[str, Any], status: dict[str, Any], uid: str = "u1", **spec: Any) -> Any:
    job = copy.deepcopy(job)
    job["metadata"]["uid"] = uid
    job["status"] = status
    job["spec"].update(spec)
    return job


def terminated_pod(code: int, message: str = "") -> dict[str, Any]:
    state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                            "message": message}}  # fmt: skip
    return {"status": {"containerStatuses": [{"name": "trainer", "state": state}]}}


def cond(decision: Decision, type_: str) -> dict[str, Any]:
    return next(x for x in decision.status["conditions"] if x["type"] == type_)


def step(
    body: Body, observed: Observed, now: str = NOW, probe: Probe | None = None
) -> tuple[Body, Decision]:
    """Reconcile and apply the status as the handlers do (a merge patch: null deletes)."""
    decision = reconcile(body, observed, CONFIG, now, probe)
    return deep_merge(body, {"status": decision.status}), decision


def kinds(decision: Decision) -> list[tuple[str, str]]:
    return [(x["kind"], x["metadata"]["name"]) for x in decision.create]


def warnings(decision: Decision) -> list[str]:
    return [e.reason for e in decision.events if e.type == "Warning"]


# --- pre-flight -------------------------------------------------------------------------


def test_a_new_job_runs_the_preflight_before_any_training_pod(body: Body) -> None:
    decision = reconcile(body, Observed(), CONFIG, NOW)
    assert [k for k, _ in kinds(decision)] == ["ConfigMap", "Service", "Job"]
    (pjob,) = [x for x in decision.create if x["kind"] == "Job"]
    assert pjob["metadata"]["name"] == "quickstart-preflight"
    assert pjob["metadata"]["labels"][c.LABEL_ROLE] == "preflight"
    command = pjob["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--preflight" in command and "--termination-log" in command
    assert decision.status["phase"] == c.PHASE_STARTING
    passed = cond(decision, c.COND_PREFLIGHT_PASSED)
    assert (passed["status"], passed["reason"]) == ("Unknown", "PreflightRunning")


def test_while_the_preflight_runs_nothing_more_is_created(body: Body) -> None:
    configmap, _, pjob = built(body)
    running = Observed(configmap, {"kind": "Service"}, None, with_status(pjob, {"active": 1}))
    body, _ = step(body, Observed())
    body, decision = step(body, running, LATER)
    assert decision.create == [] and decision.status["phase"] == c.PHASE_STARTING
    assert cond(decision, c.COND_PREFLIGHT_PASSED)["status"] == "Unknown"


def preflight_done(body: Body, code: int, message: str = "") -> Observed:
    configmap, _, pjob = built(body)
    finished = (
        job_cond("Complete") if code in (0, 10) else job_cond("Failed", "BackoffLimitExceeded")
    )
    return Observed(
        configmap,
        {"kind": "Service"},
        None,
        with_status(pjob, {"conditions": [finished]}, "p1"),
        terminated_pod(code, message),
    )


def test_a_passed_preflight_starts_training_in_the_same_decision(body: Body) -> None:
    body, _ = step(body, Observed())
    body, decision = step(body, preflight_done(body, 0, "all checks passed"), LATER)
    assert kinds(decision) == [("Job", "quickstart")]
    passed = cond(decision, c.COND_PREFLIGHT_PASSED)
    assert (passed["status"], passed["reason"]) == ("True", "PreflightPassed")
    assert decision.status["phase"] == c.PHASE_STARTING
    assert warnings(decision) == []


def test_preflight_warnings_pass_with_a_warning_event(body: Body) -> None:
    body, _ = step(body, Observed())
    observed = preflight_done(body, 10, "StaticConfig: warmup is longer than training")
    body, decision = step(body, observed, LATER)
    assert kinds(decision) == [("Job", "quickstart")]
    passed = cond(decision, c.COND_PREFLIGHT_PASSED)
    assert (passed["status"], passed["reason"]) == ("True", "PreflightPassedWithWarnings")
    assert "StaticConfig" in passed["message"]
    assert warnings(decision) == ["PreflightPassedWithWarnings"]
    _, again = step(body, observed, LATER)
    assert warnings(again) == []  # told once


def test_a_failed_preflight_fails_the_job_and_starts_nothing(body: Body) -> None:
    body, _ = step(body, Observed())
    message = "NoSupervisedTokens: every label is masked (check the prompt template)"
    observed = preflight_done(body, 20, message)
    body, decision = step(body, observed, LATER)
    assert decision.create == []
    passed = cond(decision, c.COND_PREFLIGHT_PASSED)
    assert (passed["status"], passed["reason"], passed["message"]) == ("False", "PreflightFailed",
                                                                       message)  # fmt: skip
    failed = cond(decision, c.COND_FAILED)
    assert (failed["status"], failed["reason"]) == ("True", "PreflightFailed")
    assert message in failed["message"]
    assert decision.status["phase"] == c.PHASE_FAILED
    assert "PreflightFailed" in warnings(decision) and c.PHASE_FAILED in warnings(decision)
    body, again = step(body, observed, "2026-01-01T00:02:00Z")
    assert again.create == [] and again.status["phase"] == c.PHASE_FAILED
    body, gone = step(body, Observed(observed.configmap, observed.service), "2026-01-01T00:03:00Z")
    assert gone.create == [] and gone.status["phase"] == c.PHASE_FAILED


def test_a_preflight_pod_that_crashed_fails_the_job(body: Body) -> None:
    body, _ = step(body, Observed())
    body, decision = step(body, preflight_done(body, 1, "Traceback: ImportError"), LATER)
    assert decision.create == [] and decision.status["phase"] == c.PHASE_FAILED
    message = cond(decision, c.COND_PREFLIGHT_PASSED)["message"]
    assert "exit 1" in message and "ImportError" in message


# --- gang restart -----------------------------------------------------------------------


def running_observed(body: Body, job_status: dict[str, Any] | None = None, uid: str = "u1",
                     **spec: Any) -> Observed:  # fmt: skip
    configmap, job, _ = built(body)
    status = {"active": 2, "ready": 2} if job_status is None else job_status
    return Observed(configmap, {"kind": "Service"}, with_status(job, status, uid, **spec))


def started(body: Body) -> Body:
    """BODY after pre-flight passed and the training Job started running."""
    body, _ = step(body, Observed())
    body, _ = step(body, preflight_done(body, 0), NOW)
    body, decision = step(body, running_observed(body), NOW)
    assert decision.status["phase"] == c.PHASE_RUNNING
    return body


BACKOFF = {"conditions": [job_cond("Failed", "BackoffLimitExceeded",
                                   "Job has reached the specified backoff limit")]}  # fmt: skip


def test_an_infrastructure_failure_restarts_the_whole_gang_once(body: Body) -> None:
    body = started(body)
    failed = running_observed(body, BACKOFF, "u1")
    body, decision = step(body, failed, LATER)
    assert (decision.status["restarts"], decision.status["restartedJobUid"]) == (1, "u1")
    assert decision.delete_job == "u1" and decision.create == [] and decision.job_patch is None
    (event,) = [e for e in decision.events if e.reason == "Restarting"]
    assert event.type == "Warning" and "1 of" in event.message and "backoffLimit 3" in event.message
    assert decision.status["phase"] != c.PHASE_FAILED
    # the delete is retried: the same failed Job is not counted again
    body, again = step(body, failed, "2026-01-01T00:02:00Z")
    assert again.delete_job == "u1" and body["status"]["restarts"] == 1
    assert "restarts" not in again.status and not [
        e for e in again.events if e.reason == "Restarting"
    ]
    # the Job is gone: it is created again (pre-flight not repeated)
    body, recreated = step(body, Observed(failed.configmap, failed.service), "2026-01-01T00:03:00Z")
    assert kinds(recreated) == [("Job", "quickstart")]
    assert recreated.delete_job is None and body["status"]["restarts"] == 1


def test_after_backoff_limit_restarts_the_job_fails(body: Body) -> None:
    body = started(body)
    for n in (1, 2, 3):
        body, decision = step(body, running_observed(body, BACKOFF, f"u{n}"), LATER)
        assert decision.status["restarts"] == n and decision.delete_job == f"u{n}"
        assert f"restart {n} of" in next(
            e.message for e in decision.events if e.reason == "Restarting"
        )
        body, _ = step(body, running_observed(body, None, f"u{n + 1}"), LATER)
    body, decision = step(body, running_observed(body, BACKOFF, "u4"), LATER)
    assert decision.delete_job is None and decision.status["phase"] == c.PHASE_FAILED
    failed = cond(decision, c.COND_FAILED)
    assert (failed["status"], failed["reason"]) == ("True", c.REASON_BACKOFF_LIMIT)
    assert body["status"]["restarts"] == 3


@pytest.mark.parametrize(
    ("job_failed", "reason"),
    [
        (job_cond("Failed", "PodFailurePolicy", "container trainer exited with exit code 86"),
         c.REASON_HEALTH_POLICY),
        (job_cond("Failed", "DeadlineExceeded", "Job was active longer than specified deadline"),
         c.REASON_DEADLINE),
    ],
)  # fmt: skip
def test_health_stops_and_deadlines_are_never_restarted(
    body: Body, job_failed: dict[str, Any], reason: str
) -> None:
    body = started(body)
    body, decision = step(body, running_observed(body, {"conditions": [job_failed]}), LATER)
    assert decision.delete_job is None and "restarts" not in decision.status
    assert decision.status["phase"] == c.PHASE_FAILED
    assert cond(decision, c.COND_FAILED)["reason"] == reason
    assert "Restarting" not in [e.reason for e in decision.events]


# --- health readings --------------------------------------------------------------------


def health(step_: int = 60, verdict: str = c.VERDICT_HEALTHY, *rules: dict[str, Any]) -> Probe:
    return Probe({"verdict": verdict, "step": step_, "rules": list(rules), "total_steps": 200,
                  "metrics": {"loss": 1.0}})  # fmt: skip


COLLAPSE = {
    "rule": c.RULE_LORA_GRADIENT_COLLAPSE,
    "severity": c.VERDICT_DEGRADED,
    "since_step": 50,
    "last_firing_step": 60,
    "message": "lora_B gradient norm collapsed to 1e-9 of lora_A's",
    "evidence": {"ratio": 1e-9},
}
DEGRADED = health(60, c.VERDICT_DEGRADED, COLLAPSE)


def test_a_degraded_reading_sets_degraded_with_one_warning(body: Body) -> None:
    body = started(body)
    observed = running_observed(body)
    body, decision = step(body, observed, LATER, DEGRADED)
    degraded = cond(decision, c.COND_DEGRADED)
    assert (degraded["status"], degraded["reason"]) == ("True", c.RULE_LORA_GRADIENT_COLLAPSE)
    assert "step 60" in degraded["message"]
    assert [(e.type, e.reason) for e in decision.events] == [
        ("Warning", c.RULE_LORA_GRADIENT_COLLAPSE)
    ]
    assert decision.status["health"]["verdict"] == c.VERDICT_DEGRADED
    assert decision.status["progress"]["step"] == 60
    assert (
        decision.status["phase"] == c.PHASE_RUNNING
        and decision.degraded_reason == c.RULE_LORA_GRADIENT_COLLAPSE
    )
    assert decision.lft_patch is None and decision.delete_job is None  # onDegraded Alert
    body, again = step(body, observed, "2026-01-01T00:02:00Z", DEGRADED)
    assert again.events == [] and cond(again, c.COND_DEGRADED)["status"] == "True"
    # a failed read keeps Degraded as it was
    body, unknown = step(body, observed, "2026-01-01T00:03:00Z", Probe(None, "timeout", "5 s"))
    assert unknown.events == [] and cond(unknown, c.COND_DEGRADED)["status"] == "True"
    assert unknown.status["health"]["verdict"] == c.VERDICT_UNKNOWN
    # healthy again: Degraded False and a Recovered event
    body, healthy = step(body, observed, "2026-01-01T00:04:00Z", health(70))
    recovered = cond(healthy, c.COND_DEGRADED)
    assert (recovered["status"], recovered["reason"]) == ("False", c.REASON_HEALTHY)
    assert [(e.type, e.reason) for e in healthy.events] == [("Normal", "Recovered")]
    assert healthy.degraded_reason is None


async def test_a_failed_suspend_patch_loses_no_degraded_event(
    body: Body, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The status write lands, the LoRAFineTune patch answers 500: the Degraded Warning is
    posted anyway (the next reconcile sees no transition), the policy's Event is not (it
    goes out when the retried patch lands)."""
    body["spec"]["health"]["onDegraded"] = "Suspend"
    body = started(body)
    _, decision = step(body, running_observed(body), LATER, DEGRADED)
    posted: list[tuple[str, str]] = []
    monkeypatch.setattr(
        kopf, "event", lambda _b, *, type, reason, message: posted.append((type, reason))
    )
    writes: list[str] = []

    class Kube:  # the status subresource answers, the object's own patch does not
        def patch_status(self, *_: Any) -> None:
            writes.append("status")

        def patch_lorafinetune(self, *_: Any) -> None:
            raise ApiError(500, "etcdserver: request timed out")

    with pytest.raises(ApiError):
        await Controller(CONFIG)._apply(cast(Any, Kube()), body, decision)
    assert writes == ["status"]
    assert posted == [("Warning", c.RULE_LORA_GRADIENT_COLLAPSE)]


def test_a_failed_read_never_marks_a_healthy_job_degraded(body: Body) -> None:
    body = started(body)
    _, decision = step(body, running_observed(body), LATER, Probe(None, "unreachable", "refused"))
    assert all(x["type"] != c.COND_DEGRADED for x in decision.status["conditions"])
    assert decision.events == []


def test_on_degraded_suspend_suspends_and_says_why(body: Body) -> None:
    body["spec"]["health"]["onDegraded"] = "Suspend"
    body = started(body)
    body, decision = step(body, running_observed(body), LATER, DEGRADED)
    assert decision.lft_patch is not None and decision.job_patch == {"suspend": True}
    assert decision.lft_patch["spec"] == {"runPolicy": {"suspend": True}}
    note = decision.lft_patch["metadata"]["annotations"][ANNOTATION_HEALTH_SUSPEND]
    assert c.RULE_LORA_GRADIENT_COLLAPSE in note
    # the Degraded Warning goes out with the status; the policy's with the patch it explains
    assert c.RULE_LORA_GRADIENT_COLLAPSE in warnings(decision)
    assert [e.reason for e in decision.lft_patch_events] == [c.REASON_HEALTH_POLICY]
    # the handlers apply the patch; the Job gets suspended
    body = copy.deepcopy(body)
    body["metadata"].setdefault("annotations", {})[ANNOTATION_HEALTH_SUSPEND] = note
    body["spec"]["runPolicy"] = {"suspend": True}
    suspended = running_observed(body, {"conditions": [job_cond("Suspended")]}, suspend=True)
    body, after = step(body, suspended, "2026-01-01T00:02:00Z", DEGRADED)
    assert after.status["phase"] == c.PHASE_SUSPENDED
    reason = cond(after, c.COND_SUSPENDED)
    assert (reason["status"], reason["reason"]) == ("True", c.REASON_HEALTH_POLICY)
    assert after.lft_patch is None and after.job_patch is None
    assert "health" not in after.status  # no probe used while suspended


def test_on_degraded_fail_fails_the_job_and_deletes_it(body: Body) -> None:
    body["spec"]["health"]["onDegraded"] = "Fail"
    body = started(body)
    observed = running_observed(body)
    body, decision = step(body, observed, LATER, DEGRADED)
    assert decision.status["phase"] == c.PHASE_FAILED
    failed = cond(decision, c.COND_FAILED)
    assert (failed["status"], failed["reason"]) == ("True", c.REASON_HEALTH_POLICY)
    assert c.RULE_LORA_GRADIENT_COLLAPSE in failed["message"]
    assert decision.delete_job == "u1" and decision.job_patch is None and decision.create == []
    assert decision.status["completionTime"] == LATER
    gone = Observed(observed.configmap, observed.service)
    body, later = step(body, gone, "2026-01-01T00:02:00Z", DEGRADED)
    assert later.create == [] and later.status["phase"] == c.PHASE_FAILED
    assert later.delete_job is None and later.events == []


@pytest.mark.parametrize(
    ("job_status", "suspend"),
    [
        ({"conditions": [job_cond("Suspended")]}, True),
        ({"conditions": [job_cond("Complete", "CompletionsReached")]}, False),
        ({"conditions": [job_cond("Failed", "DeadlineExceeded")]}, False),
    ],
)
def test_no_probe_is_used_when_the_job_is_not_running(
    body: Body, job_status: dict[str, Any], suspend: bool
) -> None:
    body["spec"]["health"]["onDegraded"] = "Fail"
    body["spec"]["runPolicy"] = {"suspend": suspend}
    body = started(body) if not suspend else body
    _, decision = step(body, running_observed(body, job_status, suspend=suspend), LATER, DEGRADED)
    assert not {"health", "progress", "metrics"} & set(decision.status)
    assert all(x["type"] != c.COND_DEGRADED for x in decision.status["conditions"])
    assert decision.delete_job is None and decision.lft_patch is None


# --- TTL --------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [60, None])
def test_ttl_deletes_a_finished_job_once_it_passed(body: Body, ttl: int | None) -> None:
    body["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": ttl} if ttl is not None else {}
    body = started(body)
    done = running_observed(body, {"conditions": [job_cond("Complete", "CompletionsReached")],
                                   "completionTime": NOW})  # fmt: skip
    body, at_end = step(body, done, NOW)
    assert at_end.status["phase"] == c.PHASE_SUCCEEDED and not at_end.delete_self
    _, early = step(body, done, "2026-01-01T00:00:59Z")
    assert not early.delete_self
    _, due = step(body, done, LATER)
    assert due.delete_self is (ttl is not None)
    _, much_later = step(body, Observed(), "2026-01-02T00:00:00Z")
    assert much_later.delete_self is (ttl is not None)


def test_ttl_never_deletes_a_running_job(body: Body) -> None:
    body["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 0}
    body = started(body)
    _, decision = step(body, running_observed(body), "2026-01-02T00:00:00Z")
    assert not decision.delete_self


def test_the_final_verdict_of_a_finished_job_comes_from_the_termination_message(
    body: Body,
) -> None:
    """A job too short for the health timer: its rank-0 trainer's last /health body (left in
    its termination message) gives the final progress, metrics and verdict."""
    body = started(body)
    configmap, job, _ = built(body)
    done = with_status(job, {"conditions": [job_cond("Complete", "CompletionsReached")]})
    final = health(200, c.VERDICT_HEALTHY).body
    assert final is not None
    observed = Observed(configmap, {"kind": "Service"}, done, final_health=dict(final))
    body, decision = step(body, observed, LATER)
    assert decision.status["phase"] == c.PHASE_SUCCEEDED
    assert decision.status["health"]["verdict"] == c.VERDICT_HEALTHY
    assert decision.status["progress"]["percent"] == 100.0
    assert cond(decision, c.COND_DEGRADED)["status"] == "False"
    # a health stop (exit 86) ends Failed with the rule as Degraded's reason and evidence
    body = started(deep_merge(body, {"status": None}))
    stopped = with_status(job, {"conditions": [job_cond(
        "Failed", "PodFailurePolicy", "container trainer exited with exit code 86")]})  # fmt: skip
    degraded = DEGRADED.body
    assert degraded is not None
    observed = Observed(configmap, {"kind": "Service"}, stopped, final_health=dict(degraded))
    body, decision = step(body, observed, LATER)
    assert decision.status["phase"] == c.PHASE_FAILED
    assert cond(decision, c.COND_FAILED)["reason"] == c.REASON_HEALTH_POLICY
    assert cond(decision, c.COND_DEGRADED)["reason"] == c.RULE_LORA_GRADIENT_COLLAPSE
    assert ("Warning", c.RULE_LORA_GRADIENT_COLLAPSE) in [
        (e.type, e.reason) for e in decision.events
    ]
