"""The engine on imperfect input: NaN strings, missing fields, old schemas, resumes, disorder."""

from __future__ import annotations

import math
from typing import Any

import pytest

from lora_operator.api import constants as c
from lora_operator.api.spec import HealthSpec, LoRASpec, TrainingSpec
from lora_operator.health import HealthConfig, HealthEngine, parse_record, replay
from tests.health.streams import telemetry, trace, training

CFG = HealthConfig(evaluation_interval_steps=5)


def _collapse(step: int) -> dict[str, Any]:
    return telemetry(step, lr=1e-6, grad_a=1e-4, grad_b=0.05)


def test_nonfinite_strings_become_floats() -> None:
    record = parse_record(training(3, loss="NaN", grad_norm="Infinity"))
    assert record.loss is not None and math.isnan(record.loss)
    assert record.grad_norm == math.inf
    assert parse_record({"step": 1, "loss": "-Infinity"}).loss == -math.inf


def test_engine_reports_verdict_and_evidence_like_health_endpoint() -> None:
    engine = HealthEngine(CFG)
    assert engine.report()["verdict"] == c.VERDICT_UNKNOWN
    for record in trace(70, lr=1e-6, telemetry_at=_collapse):
        engine.observe(record)
    report = engine.report()
    assert report["verdict"] == c.VERDICT_DEGRADED and report["step"] == 70
    rule = next(r for r in report["rules"] if r["rule"] == c.RULE_LORA_GRADIENT_COLLAPSE)
    assert rule["since_step"] == 60 and rule["severity"] == c.VERDICT_DEGRADED
    assert rule["evidence"]["step"] == 70 and rule["evidence"]["condition_since_step"] == 50
    assert len(rule["evidence"]["worst"]) == 3
    assert rule["last_firing_step"] == 70


def test_primary_reason_comes_first_and_infinite_evidence_is_json_safe() -> None:
    """collapse-demo's contract: reason LoRAGradientCollapse although dW_rel is tiny too."""
    engine = HealthEngine(CFG)
    for record in trace(
        70, lr=0.0, telemetry_at=lambda s: telemetry(s, lr=0.0, grad_a=0.0, dw=0.0)
    ):
        engine.observe(record)
    rules = engine.report()["rules"]
    assert [r["rule"] for r in rules[:2]] == ["LoRAGradientCollapse", "AdapterNotLearning"]
    assert rules[0]["evidence"]["values"]["median_ratio"] == "Infinity"


def test_missing_fields_do_not_crash_and_leave_rules_unjudged() -> None:
    records: list[dict[str, Any]] = [{"step": s, "loss": 2.0} for s in range(1, 80)]
    bare = telemetry(60, lr=1e-6, grad_a=1e-4, grad_b=0.05)
    for entry in bare["lora"]:
        for key in ("grad_zero_fraction", "param_norm", "param_norm_init", "lr_sum"):
            entry.pop(key)
    del bare["lora_modules"], bare["lr_sum_groups"], bare["lr_groups"]
    records[59] = bare
    timeline = replay(records, CFG)
    assert timeline.evaluations > 0 and timeline.warnings == ()
    assert {e.rule for e in timeline.rules} <= {c.RULE_LORA_GRADIENT_COLLAPSE}


def test_old_schema_without_version_and_with_hf_names() -> None:
    """Version 0: no `schema`, Hugging Face log names, no telemetry: loss rules still work."""
    records = [{"global_step": s, "learning_rate": 0.0, "loss": 2.0} for s in range(1, 61)]
    records += [{"global_step": s, "learning_rate": 0.0, "loss": "NaN"} for s in range(61, 66)]
    record = parse_record(records[0])
    assert (record.schema, record.step, record.lr) == (0, 1, 0.0)
    timeline = replay(records, CFG)
    fired = {e.rule: e for e in timeline.rules}
    assert timeline.grace_end_step == 50
    assert "0 on every step" in fired[c.RULE_STATIC_CONFIG].message
    assert fired[c.RULE_NON_FINITE].first_firing_step == 65


def test_malformed_records_are_skipped_with_a_warning() -> None:
    engine = HealthEngine(CFG)
    assert engine.observe(["not", "an", "object"], line=3) is False  # type: ignore[arg-type]
    assert engine.observe({"loss": 1.0}, line=4) is False
    assert engine.observe({"step": "x"}, line=5) is False
    assert [w.split(":")[0] for w in engine.warnings] == ["line 3", "line 4", "line 5"]


def test_out_of_order_step_is_ignored_with_a_warning() -> None:
    records = trace(100, lr=1e-6, telemetry_at=_collapse)
    stray = _collapse(20)  # an old step in the middle of the trace
    disordered = [*records[:70], stray, *records[70:]]
    baseline, timeline = replay(records, CFG), replay(disordered, CFG)
    assert timeline.rules == baseline.rules
    assert "step 20 is not after step 70" in timeline.warnings[0]
    assert "ignored 1 record(s) from step 20" in timeline.warnings[1]


def test_resumed_run_reappending_steps_keeps_first_firing_steps() -> None:
    """docs/trace-schema.md: a resumed run appends the steps after its checkpoint again."""
    first_run = trace(80, lr=1e-6, telemetry_at=_collapse)
    resumed = [r for r in trace(120, lr=1e-6, telemetry_at=_collapse) if r["step"] > 60]
    for record in resumed:  # the trainer's lr sums restart at 0 in the new process
        if "lr_sum_groups" in record:
            record["lr_sum_groups"] = [1e-6 * (record["step"] - 60)]
            for entry in record["lora"]:
                entry["lr_sum"] = 1e-6 * (record["step"] - 60)
    timeline = replay([*first_run, *resumed], CFG)
    straight = replay(trace(120, lr=1e-6, telemetry_at=_collapse), CFG)
    assert timeline.first_firing(c.RULE_LORA_GRADIENT_COLLAPSE) == 60
    assert timeline.rules == straight.rules and timeline.verdict == straight.verdict
    assert "ignored 20 record(s) from step 61 on" in timeline.warnings


def test_resume_inside_grace_continues_the_summed_lr() -> None:
    config = HealthConfig(evaluation_interval_steps=5, grace_min_steps=1000)
    first = [telemetry(s, lr=1e-4) for s in range(1, 21)]
    again = [telemetry(s, lr=1e-4, lr_sum=1e-4 * (s - 10)) for s in range(11, 71)]
    assert replay([*first, *again], config).grace_end_step == 50


def test_config_from_spec_uses_warmup_total_and_overrides() -> None:
    health = HealthSpec.model_validate(
        {"evaluationIntervalSteps": 5, "rules": [{"name": "AdapterDecay", "enabled": False}]}
    )
    training_spec = TrainingSpec.model_validate({"maxSteps": 1000, "warmup": {"ratio": 0.1}})
    config = HealthConfig.from_spec(health, training_spec, LoRASpec())
    assert (config.warmup_steps, config.total_steps, config.grace_step_cap) == (100, 1000, 110)
    assert config.settings("AdapterDecay").enabled is False
    engine = HealthEngine(config)
    assert "AdapterDecay" not in engine.states


@pytest.mark.parametrize("value", ["NaN", "Infinity", None, "garbage", [], {}])
def test_odd_values_in_any_field_never_crash(value: object) -> None:
    record = telemetry(5)
    for key in ("loss", "grad_norm", "lr", "nonfinite_param", "grad_none"):
        record[key] = value
    for entry in record["lora"]:
        entry["grad_norm"] = entry["param_norm"] = entry["lr_sum"] = value
    for module in record["lora_modules"]:
        module["dw_rel"] = value
    engine = HealthEngine(CFG)
    for r in [*trace(4), record, *trace(80)[5:]]:
        engine.observe(r)
    assert engine.verdict in c.VERDICTS


def test_the_termination_message_fits_the_kubelet_limit_and_keeps_the_verdict() -> None:
    import json

    from lora_operator.health.summary import termination_message

    rule = {"rule": "LoRAGradientCollapse", "severity": "Degraded", "since_step": 50,
            "message": "m" * 3000, "evidence": {"worst": ["x" * 500] * 20}}  # fmt: skip
    report = {"verdict": "Degraded", "step": 60, "total_steps": 200, "rules": [rule] * 5}
    text = termination_message(report)
    assert len(text.encode()) <= 4096
    body = json.loads(text)
    assert (body["verdict"], body["step"], body["rules"][0]["rule"]) == (
        "Degraded", 60, "LoRAGradientCollapse")  # fmt: skip
    small = {"verdict": "Healthy", "step": 3, "rules": []}
    assert json.loads(termination_message(small)) == small
