"""health_watch (pure): one /health reading -> status.progress/metrics/health and Degraded."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_operator.api import constants as c
from lora_operator.api.spec import LoRAFineTuneSpec
from lora_operator.controller.health_watch import Probe, assess, parse_body
from lora_operator.validation import validate_body

T0 = "2026-01-01T00:00:00Z"
Body = dict[str, Any]


def at(seconds: int) -> str:
    """T0 + SECONDS as the operator writes times."""
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"2026-01-01T{hours:02d}:{minutes:02d}:{secs:02d}Z"


@pytest.fixture
def spec_of(make_body: Callable[[dict[str, Any]], Body]) -> Callable[..., LoRAFineTuneSpec]:
    """The quickstart's spec (stallTimeoutSeconds 120) with a health patch."""

    def make(**health: Any) -> LoRAFineTuneSpec:
        result = validate_body(make_body({"spec": {"health": health}}))
        assert result.resource is not None, result.problems
        return result.resource.spec

    return make


@pytest.fixture
def spec(spec_of: Callable[..., LoRAFineTuneSpec]) -> LoRAFineTuneSpec:
    return spec_of()


def health_body(step: Any = 50, verdict: Any = c.VERDICT_HEALTHY, **extra: Any) -> Body:
    """A /health body as HealthMonitor.report writes it (engine report + progress)."""
    body: Body = {
        "verdict": verdict,
        "step": step,
        "evaluations": 10,
        "grace_end_step": 20,
        "rules": [],
        "progress": 0.25,
        "total_steps": 200,
        "metrics": {"loss": 1.25, "eval_loss": 1.5, "tokens_per_second": 812.3},
        "epoch": 0.5,
        "eta_seconds": 90.0,
        "on_degraded": "Alert",
        "stopping": None,
        "time": 1767225600.0,
    }
    return body | extra


def rule(name: str, severity: str, since: int = 40, **evidence: Any) -> dict[str, Any]:
    """A firing rule as RuleState.to_dict writes it."""
    return {
        "rule": name,
        "severity": severity,
        "since_step": since,
        "last_firing_step": since + 10,
        "message": f"{name} fires",
        "evidence": evidence or {"ratio": 0.01},
    }


COLLAPSE = rule(c.RULE_LORA_GRADIENT_COLLAPSE, c.VERDICT_DEGRADED, 40, b_over_a=0.002)


def test_a_healthy_body_gives_progress_metrics_and_verdict(spec: LoRAFineTuneSpec) -> None:
    out = assess(spec, {}, Probe(health_body(50)), T0, at(30))
    assert out.known and out.degraded is None
    assert out.status["progress"] == {
        "step": 50,
        "totalSteps": 200,
        "percent": 25.0,
        "epoch": 0.5,
        "etaSeconds": 90.0,
        "lastStepTime": at(30),
    }
    assert out.status["metrics"] == {"loss": 1.25, "evalLoss": 1.5, "tokensPerSecond": 812.3}
    health = out.status["health"]
    assert (health["verdict"], health["reason"], health["step"]) == (c.VERDICT_HEALTHY, None, 50)
    assert health["rulesFiring"] == [] and health["lastCheckTime"] == at(30)
    assert health["message"] == "Healthy at step 50"


def test_metrics_missing_from_a_reading_keep_their_last_value(spec: LoRAFineTuneSpec) -> None:
    old = {"metrics": {"loss": 2.0, "evalLoss": 1.9, "bleu": 0.1}}
    body = health_body(60, metrics={"loss": 1.0, "eval_loss": None})
    out = assess(spec, old, Probe(body), T0, at(30))
    assert out.status["metrics"] == {"loss": 1.0, "evalLoss": 1.9, "bleu": 0.1}


def test_a_degraded_rule_gives_a_degradation_with_its_evidence(spec: LoRAFineTuneSpec) -> None:
    body = health_body(70, c.VERDICT_DEGRADED, rules=[COLLAPSE])
    out = assess(spec, {}, Probe(body), T0, at(30))
    assert out.known and out.degraded is not None
    assert out.degraded.rule == c.RULE_LORA_GRADIENT_COLLAPSE
    assert out.degraded.since_step == 40
    assert (
        "step 70" in out.degraded.message and "LoRAGradientCollapse fires" in out.degraded.message
    )
    health = out.status["health"]
    assert (health["verdict"], health["reason"]) == (
        c.VERDICT_DEGRADED,
        c.RULE_LORA_GRADIENT_COLLAPSE,
    )
    (firing,) = health["rulesFiring"]
    assert firing["evidence"] == {"b_over_a": 0.002} and firing["sinceStep"] == 40
    assert "LoRAGradientCollapse (Degraded)" in health["message"]


def test_the_most_severe_rule_is_the_reason(spec: LoRAFineTuneSpec) -> None:
    critical = rule(c.RULE_NON_FINITE, c.VERDICT_CRITICAL, 65)
    body = health_body(70, c.VERDICT_CRITICAL, rules=[critical, COLLAPSE])
    out = assess(spec, {}, Probe(body), T0, at(30))
    assert out.degraded is not None and out.degraded.rule == c.RULE_NON_FINITE
    assert out.status["health"]["reason"] == c.RULE_NON_FINITE


def test_a_warning_only_rule_is_no_degradation(spec: LoRAFineTuneSpec) -> None:
    warn = rule(c.RULE_GRADIENT_UNDERFLOW, c.VERDICT_WARNING, 30)
    out = assess(spec, {}, Probe(health_body(50, c.VERDICT_WARNING, rules=[warn])), T0, at(30))
    assert out.known and out.degraded is None
    health = out.status["health"]
    assert (health["verdict"], health["reason"]) == (c.VERDICT_WARNING, c.RULE_GRADIENT_UNDERFLOW)


GARBAGE: list[Any] = [
    None,
    "Healthy",
    [health_body()],
    42,
    {},
    health_body(verdict="Fine"),
    health_body(verdict=None),
    health_body(step=-1),
    health_body(step="50"),
    health_body(step=True),
    health_body(step=float("nan")),
    health_body(rules=None),
    health_body(rules={"rule": "NonFinite"}),
    health_body(c.VERDICT_DEGRADED, rules=[rule("NoSuchRule", c.VERDICT_DEGRADED)]),
    health_body(c.VERDICT_DEGRADED, rules=[rule(c.RULE_NON_FINITE, "Fatal")]),
    health_body(c.VERDICT_DEGRADED, rules=[COLLAPSE, "LoRAGradientCollapse"]),
]


@pytest.mark.parametrize("body", GARBAGE)
def test_garbage_bodies_give_unknown_and_never_degrade(spec: LoRAFineTuneSpec, body: Any) -> None:
    assert parse_body(body) is None
    old = {"health": {"step": 40, "verdict": c.VERDICT_DEGRADED}, "progress": {"step": 40}}
    out = assess(spec, old, Probe(body), T0, at(30))
    assert not out.known and out.degraded is None
    assert set(out.status) == {"health"}  # progress and metrics left as they were
    health = out.status["health"]
    assert (health["verdict"], health["step"], health["rulesFiring"]) == (c.VERDICT_UNKNOWN, 40, [])
    assert "malformed" in health["message"]


def test_nan_and_infinite_numbers_are_dropped_not_written(spec: LoRAFineTuneSpec) -> None:
    body = health_body(
        50,
        metrics={"loss": float("nan"), "eval_loss": float("inf"), "tokens_per_second": True},
        epoch=float("-inf"),
        eta_seconds=float("nan"),
        total_steps=-5,
    )
    out = assess(spec, {"metrics": {"loss": 2.0}}, Probe(body), T0, at(30))
    assert out.known
    assert out.status["metrics"] == {"loss": 2.0}
    progress = out.status["progress"]
    assert progress["epoch"] is None and progress["etaSeconds"] is None
    assert progress["totalSteps"] is None and progress["percent"] is None
    json.dumps(out.status, allow_nan=False)  # the API server takes no NaN


def test_huge_evidence_is_kept_small(spec: LoRAFineTuneSpec) -> None:
    evidence = {f"k{i}": "x" * 10_000 for i in range(100)} | {"nan": float("nan")}
    big = rule(c.RULE_LORA_GRADIENT_COLLAPSE, c.VERDICT_DEGRADED, 40) | {
        "message": "m" * 100_000,
        "evidence": evidence,
    }
    body = health_body(50, c.VERDICT_DEGRADED, rules=[big] * 50)
    out = assess(spec, {}, Probe(body), T0, at(30))
    assert out.degraded is not None and len(out.degraded.message) <= 1024
    assert len(out.status["health"]["rulesFiring"]) <= 8
    assert len(json.dumps(out.status, allow_nan=False)) < 100_000


@pytest.mark.parametrize(
    "evidence",
    [
        {"series": [1.0, float("nan")]},
        {"a": {"b": {"c": [{"blob": "x" * 200_000}]}}},
    ],
)
def test_list_evidence_is_kept_small_and_finite(spec: LoRAFineTuneSpec, evidence: Any) -> None:
    firing = rule(c.RULE_LORA_GRADIENT_COLLAPSE, c.VERDICT_DEGRADED, 40) | {"evidence": evidence}
    out = assess(spec, {}, Probe(health_body(50, c.VERDICT_DEGRADED, rules=[firing])), T0, at(30))
    assert len(json.dumps(out.status, allow_nan=False)) < 20_000


def test_any_json_body_never_raises_and_a_failed_read_never_degrades(
    spec: LoRAFineTuneSpec,
) -> None:

    scalars = st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=8)
    names = st.sampled_from([*c.RULE_NAMES, "Nope"])
    levels = st.sampled_from([*c.VERDICTS, "Fatal"])
    json_like = st.recursive(
        scalars,
        lambda kids: (
            st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
        ),
        max_leaves=12,
    )
    rule_like = st.fixed_dictionaries(
        {"rule": names, "severity": levels},
        optional={"since_step": scalars, "message": scalars, "evidence": json_like},
    )
    body_like = st.fixed_dictionaries(
        {
            "verdict": levels | scalars,
            "step": scalars,
            "rules": st.lists(rule_like, max_size=3) | json_like,
        },
        optional={
            "total_steps": scalars,
            "epoch": scalars,
            "eta_seconds": scalars,
            "metrics": st.dictionaries(st.sampled_from(["loss", "eval_loss", "bleu"]), scalars)
            | json_like,
        },
    )

    @settings(max_examples=200, deadline=None, database=None)
    @given(body=body_like | json_like, error=st.sampled_from([None, "timeout"]))
    def check(body: Any, error: str | None) -> None:
        old = {"health": {"step": 7}, "progress": {"step": 7, "lastStepTime": T0}}
        out = assess(spec, old, Probe(body, error), T0, at(30))
        if not out.known:
            assert out.degraded is None
            assert out.status["health"]["verdict"] == c.VERDICT_UNKNOWN
            assert out.status["health"]["step"] == 7
        else:
            assert out.status["health"]["verdict"] in c.VERDICTS
            assert isinstance(out.status["progress"]["step"], int)
            for value in out.status["metrics"].values():
                assert math.isfinite(value)

    check()


@pytest.mark.parametrize("error", ["unreachable", "timeout", "http_status"])
def test_an_unreachable_trainer_keeps_the_previous_step(spec: LoRAFineTuneSpec, error: str) -> None:
    old = {
        "progress": {"step": 80, "lastStepTime": T0},
        "health": {"verdict": c.VERDICT_HEALTHY, "step": 80, "reason": None},
    }
    out = assess(spec, old, Probe(None, error, "connection refused"), T0, at(500))
    assert not out.known and out.degraded is None
    health = out.status["health"]
    assert (health["verdict"], health["step"], health["reason"]) == (c.VERDICT_UNKNOWN, 80, None)
    assert error in health["message"] and "connection refused" in health["message"]
    assert "progress" not in out.status  # lastStepTime untouched: no stall from a failed read


def test_a_step_that_advances_resets_last_step_time(spec: LoRAFineTuneSpec) -> None:
    old = {"progress": {"step": 50, "lastStepTime": T0}}
    same = assess(spec, old, Probe(health_body(50)), T0, at(60))
    assert same.status["progress"]["lastStepTime"] == T0
    moved = assess(spec, old, Probe(health_body(55)), T0, at(60))
    assert moved.status["progress"]["lastStepTime"] == at(60)


def test_stalled_fires_only_after_the_stall_timeout(spec: LoRAFineTuneSpec) -> None:
    old = {"progress": {"step": 50, "lastStepTime": T0}}
    running_since = "2025-12-31T23:00:00Z"
    early = assess(spec, old, Probe(health_body(50)), running_since, at(119))
    assert early.degraded is None and early.status["health"]["verdict"] == c.VERDICT_HEALTHY
    late = assess(spec, old, Probe(health_body(50)), running_since, at(120))
    assert late.degraded is not None and late.degraded.rule == c.RULE_STALLED
    assert "120 s" in late.degraded.message and "at step 50" in late.degraded.message
    health = late.status["health"]
    assert (health["verdict"], health["reason"]) == (c.VERDICT_DEGRADED, c.RULE_STALLED)
    assert health["rulesFiring"][-1]["evidence"] == {
        "step": 50,
        "idle_seconds": 120,
        "timeout_seconds": 120,
    }


def test_a_recent_resume_pauses_the_stall_clock(spec: LoRAFineTuneSpec) -> None:
    old = {"progress": {"step": 50, "lastStepTime": T0}}
    resumed = at(100)  # Running turned True again 100 s after the last step
    out = assess(spec, old, Probe(health_body(50)), resumed, at(200))
    assert out.degraded is None
    out = assess(spec, old, Probe(health_body(50)), resumed, at(220))
    assert out.degraded is not None and out.degraded.rule == c.RULE_STALLED


def test_stalled_is_off_when_the_rule_is_disabled(spec_of: Callable[..., LoRAFineTuneSpec]) -> None:
    spec = spec_of(rules=[{"name": c.RULE_STALLED, "enabled": False}])
    old = {"progress": {"step": 50, "lastStepTime": T0}}
    out = assess(spec, old, Probe(health_body(50)), T0, at(3600))
    assert out.degraded is None and out.status["health"]["verdict"] == c.VERDICT_HEALTHY


def test_a_stalled_rule_at_warning_severity_reports_warning(
    spec_of: Callable[..., LoRAFineTuneSpec],
) -> None:
    spec = spec_of(rules=[{"name": c.RULE_STALLED, "severity": c.VERDICT_WARNING}])
    old = {"progress": {"step": 50, "lastStepTime": T0}}
    out = assess(spec, old, Probe(health_body(50)), T0, at(3600))
    assert out.degraded is None
    assert out.status["health"]["reason"] == c.RULE_STALLED
    assert out.status["health"]["verdict"] == c.VERDICT_WARNING
