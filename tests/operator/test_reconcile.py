"""reconcile (pure): phase and conditions from the Job, children, immutable fields, bad specs."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from lora_operator.api import constants as c
from lora_operator.builders import Owner, build_indexed_job, build_spec_configmap
from lora_operator.controller.reconcile import Decision, Observed, reconcile
from lora_operator.controller.settings import OperatorConfig
from lora_operator.validation import validate_body

NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"
CONFIG = OperatorConfig(trainer_image="ghcr.io/lora-operator/trainer:0.1.0")
Body = dict[str, Any]


@pytest.fixture
def body(make_body: Callable[[dict[str, Any]], Body]) -> Body:
    """The quickstart as the API server returns it: uid, namespace, generation (pre-flight
    off: tests/operator/test_lifecycle.py covers it)."""
    return make_body(
        {
            "metadata": {"uid": "uid-1", "namespace": "default", "generation": 1},
            "spec": {"health": {"preflight": {"enabled": False}}},
        }
    )


def children(body: Body) -> Observed:
    """The children as the operator creates them from BODY."""
    result = validate_body(body)
    assert result.resource is not None, result.problems
    owner = Owner("quickstart", "default", "uid-1")
    job = build_indexed_job(result.resource.spec, owner, CONFIG.trainer_image)
    return Observed(build_spec_configmap(result.resource.spec, owner), {"kind": "Service"}, job)


def with_job_status(observed: Observed, status: dict[str, Any], **spec: Any) -> Observed:
    job = copy.deepcopy(observed.job)
    assert job is not None
    job["status"] = status
    job["spec"].update(spec)
    return Observed(observed.configmap, observed.service, job)


def job_cond(type_: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": type_, "status": "True", "reason": reason, "message": message}


def cond(decision: Decision, type_: str) -> dict[str, Any]:
    return next(x for x in decision.status["conditions"] if x["type"] == type_)


def step(body: Body, observed: Observed, now: str = NOW) -> tuple[Body, Decision]:
    """Reconcile and apply the status patch, as the handlers do."""
    decision = reconcile(body, observed, CONFIG, now)
    return {**body, "status": {**(body.get("status") or {}), **decision.status}}, decision


def test_a_new_job_gets_its_three_children_with_owner_references(body: Body) -> None:
    decision = reconcile(body, Observed(), CONFIG, NOW)
    assert [x["kind"] for x in decision.create] == ["ConfigMap", "Service", "Job"]
    for child in decision.create:
        assert child["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    (job,) = [x for x in decision.create if x["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == CONFIG.trainer_image
    assert decision.status["phase"] == c.PHASE_PENDING
    assert decision.status["observedGeneration"] == 1
    accepted = cond(decision, c.COND_SPEC_ACCEPTED)
    assert (accepted["status"], accepted["reason"]) == ("True", c.REASON_SPEC_VALID)
    assert accepted["observedGeneration"] == 1


def test_only_missing_children_are_created(body: Body) -> None:
    observed = children(body)
    assert reconcile(body, observed, CONFIG, NOW).create == []
    partial = Observed(observed.configmap, None, None)
    assert [x["kind"] for x in reconcile(body, partial, CONFIG, NOW).create] == ["Service", "Job"]


def test_spec_image_wins_over_the_operator_default(body: Body) -> None:
    body["spec"]["image"] = "registry.example/trainer:2"
    (job,) = [x for x in reconcile(body, Observed(), CONFIG, NOW).create if x["kind"] == "Job"]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example/trainer:2"


@pytest.mark.parametrize(
    ("status", "suspend", "phase", "condition", "reason"),
    [
        ({}, False, c.PHASE_STARTING, c.COND_RUNNING, "JobStarted"),
        ({"active": 1, "ready": 0}, False, c.PHASE_STARTING, c.COND_RUNNING, "JobStarted"),
        ({"active": 1, "ready": 1}, False, c.PHASE_RUNNING, c.COND_RUNNING, "JobStarted"),
        ({"conditions": [job_cond("Suspended")]}, True, c.PHASE_SUSPENDED, c.COND_SUSPENDED,
         c.REASON_USER_SUSPENDED),
        ({"conditions": [job_cond("Complete", "CompletionsReached")]}, False, c.PHASE_SUCCEEDED,
         c.COND_SUCCEEDED, "TrainingCompleted"),
        ({"conditions": [job_cond("Failed", "PodFailurePolicy", "container trainer exited "
                                  "with exit code 86")]}, False, c.PHASE_FAILED, c.COND_FAILED,
         c.REASON_HEALTH_POLICY),
        ({"conditions": [job_cond("Failed", "BackoffLimitExceeded")]}, False, c.PHASE_FAILED,
         c.COND_FAILED, c.REASON_BACKOFF_LIMIT),
        ({"conditions": [job_cond("Failed", "DeadlineExceeded")]}, False, c.PHASE_FAILED,
         c.COND_FAILED, c.REASON_DEADLINE),
    ],
)  # fmt: skip
def test_phase_and_condition_follow_the_job(
    body: Body, status: dict[str, Any], suspend: bool, phase: str, condition: str, reason: str
) -> None:
    body["spec"]["runPolicy"] = {"suspend": suspend, "backoffLimit": 0}  # no gang restart
    decision = reconcile(body, with_job_status(children(body), status, suspend=suspend),
                         CONFIG, NOW)  # fmt: skip
    assert decision.status["phase"] == phase
    found = cond(decision, condition)
    assert (found["status"], found["reason"], found["observedGeneration"]) == ("True", reason, 1)
    assert decision.job_patch is None


def test_one_event_per_phase_transition_and_none_when_steady(body: Body) -> None:
    observed = children(body)
    body, first = step(body, Observed())
    assert [(e.type, e.reason) for e in first.events] == [("Normal", c.PHASE_PENDING)]
    body, running = step(body, with_job_status(observed, {"active": 1, "ready": 1}))
    assert [e.reason for e in running.events] == [c.PHASE_RUNNING]
    assert "Pending -> Running" in running.events[0].message
    body, again = step(body, with_job_status(observed, {"active": 1, "ready": 1}), LATER)
    assert again.events == [] and again.status == {**running.status}  # nothing to write
    failed = job_cond("Failed", "PodFailurePolicy", "exit code 86")
    body, end = step(body, with_job_status(observed, {"conditions": [failed]}))
    (event,) = end.events
    assert (event.type, event.reason) == ("Warning", c.PHASE_FAILED)
    assert c.REASON_HEALTH_POLICY in event.message


def test_last_transition_time_changes_only_with_the_status(body: Body) -> None:
    observed = with_job_status(children(body), {"active": 1, "ready": 1})
    body, first = step(body, observed, NOW)
    body, second = step(body, observed, LATER)
    assert cond(second, c.COND_RUNNING)["lastTransitionTime"] == NOW


def test_a_terminal_job_is_never_recreated(body: Body) -> None:
    observed = children(body)
    done = with_job_status(observed, {"conditions": [job_cond("Complete", "CompletionsReached")],
                                      "completionTime": LATER})  # fmt: skip
    body, decision = step(body, done)
    assert decision.create == [] and decision.status["completionTime"] == LATER
    # the Job (even all children) deleted by someone: still Succeeded, nothing created
    body, decision = step(body, Observed())
    assert decision.create == [] and decision.status["phase"] == c.PHASE_SUCCEEDED
    assert decision.events == []


def test_suspend_and_resume_patch_the_job(body: Body) -> None:
    observed = with_job_status(children(body), {"active": 1, "ready": 1})
    body["spec"]["runPolicy"] = {"suspend": True}
    decision = reconcile(body, observed, CONFIG, NOW)
    assert decision.job_patch == {"suspend": True}
    assert cond(decision, c.COND_SPEC_ACCEPTED)["status"] == "True"  # runPolicy is live
    suspended = with_job_status(observed, {"conditions": [job_cond("Suspended")]}, suspend=True)
    body, decision = step(body, suspended)
    assert decision.job_patch is None and decision.status["phase"] == c.PHASE_SUSPENDED
    body["spec"]["runPolicy"] = {"suspend": False}
    assert reconcile(body, suspended, CONFIG, NOW).job_patch == {"suspend": False}
    body, resumed = step(body, with_job_status(observed, {"active": 1, "ready": 1}))
    assert resumed.status["phase"] == c.PHASE_RUNNING
    back = cond(resumed, c.COND_SUSPENDED)
    assert (back["status"], back["reason"]) == ("False", "Resumed")


def test_kueue_owns_suspend_of_its_jobs(body: Body) -> None:
    observed = children(body)
    assert observed.job is not None
    observed.job["metadata"]["labels"][c.KUEUE_QUEUE_LABEL] = "team-a"
    queued = with_job_status(observed, {}, suspend=True)
    decision = reconcile(body, queued, CONFIG, NOW)
    assert decision.job_patch is None
    assert cond(decision, c.COND_SUSPENDED)["reason"] == "QueuedByKueue"


def test_active_deadline_is_live(body: Body) -> None:
    body["spec"]["runPolicy"] = {"activeDeadlineSeconds": 600}
    decision = reconcile(body, children(body | {"spec": {**body["spec"], "runPolicy": {}}}),
                         CONFIG, NOW)  # fmt: skip
    assert decision.job_patch == {"activeDeadlineSeconds": 600}


def test_training_fields_are_immutable_after_start(body: Body) -> None:
    observed = with_job_status(children(body), {"active": 1, "ready": 1})
    body["metadata"]["generation"] = 2
    body["spec"]["lora"]["r"] = 8
    body["spec"]["training"]["learningRate"] = 1e-3
    body["spec"]["runPolicy"] = {"suspend": True}
    decision = reconcile(body, observed, CONFIG, NOW)
    refused = cond(decision, c.COND_SPEC_ACCEPTED)
    assert (refused["status"], refused["reason"]) == ("False", c.REASON_IMMUTABLE_FIELD)
    assert (
        "spec.lora.r" in refused["message"] and "spec.training.learningRate" in refused["message"]
    )
    assert refused["observedGeneration"] == 2
    assert decision.job_patch == {"suspend": True}  # the live field still applies
    assert decision.create == []
    warnings = [e.reason for e in decision.events if e.type == "Warning"]
    assert warnings == [c.REASON_IMMUTABLE_FIELD]
    # reverting the field accepts the spec again
    body["spec"]["lora"]["r"] = 16
    body["spec"]["training"]["learningRate"] = 3e-3
    body = {**body, "status": decision.status}
    accepted = cond(reconcile(body, observed, CONFIG, NOW), c.COND_SPEC_ACCEPTED)
    assert (accepted["status"], accepted["reason"]) == ("True", c.REASON_SPEC_VALID)


def test_a_missing_job_is_rebuilt_from_the_started_spec(body: Body) -> None:
    observed = children(body)
    body["spec"]["lora"]["r"] = 8  # changed after the ConfigMap was written
    decision = reconcile(body, Observed(observed.configmap, observed.service, None), CONFIG, NOW)
    (job,) = decision.create
    assert job == observed.job


@pytest.mark.parametrize(
    ("patch", "path", "words"),
    [
        ({"pod": {"env": [{"name": "LORA_NNODES", "value": "4"}]}}, "spec.pod.env[0].name",
         "set by the operator"),
        ({"pod": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}},
         "spec.pod.env[1].name", "twice"),
        ({"pod": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}, "spec.pod.volumes[0].name",
         "volume of the operator"),
        ({"pod": {"volumeMounts": [{"name": "nope", "mountPath": "/data"}]}},
         "spec.pod.volumeMounts[0].name", "names no volume"),
        ({"pod": {"volumes": [{"name": "x", "emptyDir": {}}],
                  "volumeMounts": [{"name": "x", "mountPath": "/dev/shm"}]}},
         "spec.pod.volumeMounts[0].mountPath", "mounted by the operator"),
        ({"pod": {"labels": {c.LABEL_JOB_NAME: "other"}}},
         f"spec.pod.labels[{c.LABEL_JOB_NAME}]", "the operator sets"),
        ({"monitoring": {"port": 29500}}, "spec.monitoring.port", "rendezvous port"),
    ],
)  # fmt: skip
def test_semantically_invalid_spec_names_the_field_and_creates_nothing(
    body: Body, patch: dict[str, Any], path: str, words: str
) -> None:
    from tests.conftest import deep_merge

    body = deep_merge(body, {"spec": patch})
    assert validate_body(body).ok  # the CRD (schema + CEL) accepts it
    decision = reconcile(body, Observed(), CONFIG, NOW)
    assert decision.create == []
    refused = cond(decision, c.COND_SPEC_ACCEPTED)
    assert (refused["status"], refused["reason"]) == ("False", c.REASON_INVALID_SPEC)
    assert refused["message"].startswith(path) and words in refused["message"]
    assert decision.status["phase"] == c.PHASE_PENDING
    assert ("Warning", c.REASON_INVALID_SPEC) in [(e.type, e.reason) for e in decision.events]


def test_image_allow_list(body: Body) -> None:
    config = OperatorConfig(image_allowlist=("ghcr.io/lora-operator/",))
    body["spec"]["image"] = "docker.io/someone/trainer:1"
    refused = cond(reconcile(body, Observed(), config, NOW), c.COND_SPEC_ACCEPTED)
    assert refused["status"] == "False" and refused["message"].startswith("spec.image")
    body["spec"]["image"] = "ghcr.io/lora-operator/trainer:0.2.0"
    assert len(reconcile(body, Observed(), config, NOW).create) == 3


def test_schema_invalid_spec_is_refused_too(body: Body) -> None:
    body["spec"]["lora"]["r"] = 0  # what an API server without the CRD's schema would let in
    decision = reconcile(body, Observed(), CONFIG, NOW)
    assert decision.create == []
    assert cond(decision, c.COND_SPEC_ACCEPTED)["message"].startswith("spec.lora.r")


def test_an_invalid_edit_of_a_running_job_keeps_it_running(body: Body) -> None:
    observed = with_job_status(children(body), {"active": 1, "ready": 1})
    body["spec"]["pod"] = {"env": [{"name": "HOME", "value": "/root"}]}
    decision = reconcile(body, observed, CONFIG, NOW)
    assert decision.create == [] and decision.job_patch is None
    assert decision.status["phase"] == c.PHASE_RUNNING
    assert cond(decision, c.COND_SPEC_ACCEPTED)["status"] == "False"


def test_settings_from_env_and_run_flags() -> None:
    from lora_operator.cli import build_parser
    from lora_operator.cli.run import config_from_args

    env = {"LORA_OPERATOR_TRAINER_IMAGE": "img:1", "LORA_OPERATOR_NAMESPACES": "a, b"}
    config = OperatorConfig.from_env(env)
    assert (config.trainer_image, config.namespaces, config.cluster_wide) == ("img:1", ("a", "b"),
                                                                              False)  # fmt: skip
    assert OperatorConfig.from_env({}).cluster_wide
    args = build_parser().parse_args(["run", "-n", "ml", "--namespace", "ops", "--standalone"])
    assert config_from_args(args).namespaces == ("ml", "ops") and args.standalone
    args = build_parser().parse_args(["run", "--all-namespaces", "--trainer-image", "img:2"])
    assert config_from_args(args).cluster_wide
    assert config_from_args(args).trainer_image == "img:2"
