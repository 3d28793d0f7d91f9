"""The operator's image allow-list: a spec.image outside it is refused naming the field, with no
children; inside it, every Job runs that image. Also how `lora-operator run` reads it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from lora_operator.api import constants as c
from lora_operator.cli import build_parser
from lora_operator.cli.run import config_from_args
from lora_operator.controller.reconcile import Decision, Observed, reconcile
from lora_operator.controller.settings import ENV_IMAGE_ALLOWLIST, OperatorConfig

NOW = "2026-01-01T00:00:00Z"
CONFIG = OperatorConfig(trainer_image="ghcr.io/lora-operator/trainer:0.1.0",
                        image_allowlist=("registry.example/",))  # fmt: skip
Body = dict[str, Any]


@pytest.fixture
def body_with(make_body: Callable[[dict[str, Any]], Body]) -> Callable[..., Body]:
    def make(image: str | None, preflight: bool = True) -> Body:
        spec: dict[str, Any] = {"health": {"preflight": {"enabled": preflight}}}
        if image is not None:
            spec["image"] = image
        meta = {"uid": "uid-1", "namespace": "default", "generation": 1}
        return make_body({"metadata": meta, "spec": spec})

    return make


def _accepted(decision: Decision) -> dict[str, Any]:
    return next(x for x in decision.status["conditions"] if x["type"] == c.COND_SPEC_ACCEPTED)


def _images(decision: Decision) -> set[str]:
    return {
        ctr["image"]
        for obj in decision.create
        if obj["kind"] == "Job"
        for ctr in obj["spec"]["template"]["spec"]["containers"]
        + (obj["spec"]["template"]["spec"].get("initContainers") or [])
    }


@pytest.mark.parametrize(
    "image",
    [
        "docker.io/evil/trainer:1",
        "registry.example.evil.io/trainer:1",  # a prefix of the host name is not the registry
        "evil.io/registry.example/trainer:1",
        "registry.example",
    ],
)
def test_an_image_outside_the_allowlist_is_refused_naming_spec_image(
    body_with: Callable[..., Body], image: str
) -> None:
    for preflight in (True, False):
        decision = reconcile(body_with(image, preflight), Observed(), CONFIG, NOW)
        cond = _accepted(decision)
        assert (cond["status"], cond["reason"]) == ("False", c.REASON_INVALID_SPEC), cond
        assert "spec.image" in cond["message"] and image in cond["message"], cond
        assert decision.create == [] and decision.job_patch is None
        assert decision.status["phase"] == c.PHASE_PENDING


def test_an_image_inside_the_allowlist_runs_in_every_job(body_with: Callable[..., Body]) -> None:
    image = "registry.example/team/trainer:2"
    for preflight, kinds in ((True, ["ConfigMap", "Service", "Job"]),
                             (False, ["ConfigMap", "Service", "Job"])):  # fmt: skip
        decision = reconcile(body_with(image, preflight), Observed(), CONFIG, NOW)
        assert _accepted(decision)["status"] == "True"
        assert [x["kind"] for x in decision.create] == kinds
        assert _images(decision) == {image}
    jobs = [x for x in reconcile(body_with(image), Observed(), CONFIG, NOW).create
            if x["kind"] == "Job"]  # fmt: skip
    assert jobs[0]["metadata"]["name"].endswith("-preflight")  # the pre-flight runs it too


def test_without_spec_image_the_operators_own_image_runs(body_with: Callable[..., Body]) -> None:
    decision = reconcile(body_with(None), Observed(), CONFIG, NOW)
    assert _accepted(decision)["status"] == "True"
    assert _images(decision) == {CONFIG.trainer_image}


def test_an_empty_allowlist_allows_any_image(body_with: Callable[..., Body]) -> None:
    config = OperatorConfig(trainer_image=CONFIG.trainer_image)
    decision = reconcile(body_with("docker.io/anyone/trainer:1"), Observed(), config, NOW)
    assert _images(decision) == {"docker.io/anyone/trainer:1"}


def test_the_allowlist_comes_from_the_environment_of_lora_operator_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(ENV_IMAGE_ALLOWLIST, " registry.example/ , ,ghcr.io/lora-operator/,")
    args = build_parser().parse_args(["run", "--standalone"])
    config = config_from_args(args)
    assert config.image_allowlist == ("registry.example/", "ghcr.io/lora-operator/")
    assert OperatorConfig.from_env({ENV_IMAGE_ALLOWLIST: ""}).image_allowlist == ()
    assert OperatorConfig.from_env(
        {ENV_IMAGE_ALLOWLIST: "a.example/,b.example/"}
    ).image_allowlist == ("a.example/", "b.example/")
