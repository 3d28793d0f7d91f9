"""Every rule on synthetic streams: when it fires, when it must not, and its evidence."""

from __future__ import annotations

from typing import Any

import pytest

from lora_operator.api import constants as c
from lora_operator.health import HealthConfig, RuleSettings, Timeline, replay
from tests.health.streams import N_MODULES, evaluation, telemetry, trace, training

CFG = HealthConfig(evaluation_interval_steps=5)


def _replay(records: list[dict[str, Any]], config: HealthConfig = CFG, **kw: Any) -> Timeline:
    return replay(records, config, **kw)


def _collapse(step: int) -> dict[str, Any]:
    """lr 1e-6: lora_B barely moves, so its gradient dwarfs lora_A's (ratio 500)."""
    return telemetry(step, lr=1e-6, grad_a=1e-4, grad_b=0.05)


def test_healthy_stream_stays_healthy() -> None:
    timeline = _replay(trace(200))
    assert timeline.worst_verdict == c.VERDICT_HEALTHY
    assert timeline.rules == ()
    assert timeline.exit_code == c.EXIT_VERDICT_HEALTHY


def test_collapse_fires_after_grace_and_three_evaluations_with_evidence() -> None:
    timeline = _replay(trace(100, lr=1e-6, telemetry_at=_collapse))
    assert timeline.grace_end_step == 50  # lr sum stays tiny: the step cap max(50, 0 + 10)
    entry = timeline.rules[0]
    assert (entry.rule, entry.severity) == (c.RULE_LORA_GRADIENT_COLLAPSE, c.VERDICT_DEGRADED)
    assert (entry.first_condition_step, entry.first_firing_step) == (50, 60)
    values = entry.evidence["values"]
    assert values["median_ratio"] == pytest.approx(500)
    assert values["modules_flagged"] == N_MODULES
    assert entry.evidence["worst"][0]["module"].startswith("layer ")
    assert "lora_B is not growing" in entry.message
    assert timeline.exit_code == c.EXIT_VERDICT_DEGRADED


def test_collapse_ratio_during_grace_is_not_judged() -> None:
    """A 500x ratio in the first 50 steps is what healthy low-lr runs show."""
    timeline = _replay(trace(49, lr=1e-6, telemetry_at=_collapse))
    assert timeline.worst_verdict == c.VERDICT_HEALTHY


@pytest.mark.parametrize(
    ("warmup", "total", "cap"),
    [(None, None, 50), (100, 1000, 110), (1000, 200, 50), (300, 2000, 310)],
)
def test_grace_step_cap_is_max_of_min_steps_and_capped_warmup(
    warmup: int | None, total: int | None, cap: int
) -> None:
    config = HealthConfig(evaluation_interval_steps=5, warmup_steps=warmup, total_steps=total)
    assert config.grace_step_cap == cap
    timeline = _replay(trace(cap + 20, lr=1e-6, telemetry_at=_collapse), config)
    assert timeline.grace_end_step == cap
    assert timeline.first_firing(c.RULE_LORA_GRADIENT_COLLAPSE) == cap + 10


@pytest.mark.parametrize(("lr", "end"), [(1e-3, 5), (2e-4, 25), (1e-4, 50)])
def test_grace_ends_when_summed_lr_of_b_reaches_5e_3(lr: float, end: int) -> None:
    assert _replay(trace(60, lr=lr)).grace_end_step == end


def test_degraded_rules_need_consecutive_evaluations() -> None:
    def flapping(step: int) -> dict[str, Any]:
        return _collapse(step) if step != 60 else telemetry(step, lr=1e-6)

    timeline = _replay(trace(100, lr=1e-6, telemetry_at=flapping))
    # 50, 55 hold, 60 does not, then 65, 70, 75 in a row.
    assert timeline.first_firing(c.RULE_LORA_GRADIENT_COLLAPSE) == 75
    once = HealthConfig(evaluation_interval_steps=5, consecutive_evaluations=1)
    assert (
        _replay(trace(100, lr=1e-6, telemetry_at=flapping), once).first_firing(
            c.RULE_LORA_GRADIENT_COLLAPSE
        )
        == 50
    )


def test_rule_clears_when_the_condition_stops() -> None:
    def recovering(step: int) -> dict[str, Any]:
        return _collapse(step) if step <= 70 else telemetry(step, lr=1e-6)

    timeline = _replay(trace(100, lr=1e-6, telemetry_at=recovering))
    assert timeline.worst_verdict == c.VERDICT_DEGRADED
    assert timeline.verdict == c.VERDICT_HEALTHY
    assert not timeline.rules[0].firing_at_end
    assert [t.verdict for t in timeline.transitions][-1] == c.VERDICT_HEALTHY


def test_adapter_not_learning_needs_a_quarter_of_modules() -> None:
    two_small = [1e-3, 0.3, 0.3, 5e-4, 0.3, 0.3, 0.3, 0.3]
    timeline = _replay(trace(80, telemetry_at=lambda s: telemetry(s, dw=two_small)))
    entry = timeline.rules[0]
    assert entry.rule == c.RULE_ADAPTER_NOT_LEARNING
    assert entry.evidence["values"]["modules_flagged"] == 2
    worst = entry.evidence["worst"]
    assert [w["module"] for w in worst] == ["layer 0 o", "layer 0 q"]  # smallest first
    one_small = [1e-3, *[0.3] * 7]
    assert _replay(trace(80, telemetry_at=lambda s: telemetry(s, dw=one_small))).rules == ()


def test_adapter_decay_fires_when_a_shrinks_below_three_quarters() -> None:
    timeline = _replay(trace(80, telemetry_at=lambda s: telemetry(s, a_norm=1.2, a_init=2.0)))
    entry = timeline.rules[0]
    assert entry.rule == c.RULE_ADAPTER_DECAY
    assert entry.evidence["values"]["median_a_norm_ratio"] == pytest.approx(0.6)
    grown = trace(80, telemetry_at=lambda s: telemetry(s, a_norm=2.6, a_init=2.0))
    assert _replay(grown).rules == ()


def test_a_gradient_zero_is_critical_once_b_had_a_learning_rate() -> None:
    records = trace(10, telemetry_at=lambda s: telemetry(s, grad_a=0.0))
    timeline = _replay(records)
    entry = timeline.rules[0]
    assert (entry.rule, entry.severity) == (c.RULE_LORA_A_GRADIENT_ZERO, c.VERDICT_CRITICAL)
    assert entry.first_firing_step == 5  # step 1 (B = 0 by design) does not count
    assert entry.evidence["values"]["lr_sum_before"] == pytest.approx(4e-3)


def test_a_gradient_zero_when_only_b_group_has_lr_zero() -> None:
    """A scheduler bug: lora_B's param group stays at lr 0 while lora_A's trains."""

    def b_group_frozen(step: int) -> dict[str, Any]:
        record = telemetry(step, grad_a=0.0, lr_sum=0.0)
        record["lr_groups"], record["lr_sum_groups"] = [1e-3, 0.0], [1e-3 * step, 0.0]
        return record

    timeline = _replay(trace(10, telemetry_at=b_group_frozen))
    assert timeline.first_firing(c.RULE_LORA_A_GRADIENT_ZERO) == 5


def test_a_gradient_zero_at_step_one_or_with_lr_zero_is_not_critical() -> None:
    step_one = [telemetry(1, grad_a=0.0, zero_fraction_a=1.0)]
    assert _replay(step_one).rules == ()  # nor GradientUnderflow: an all-zero grad is not that
    lr_zero = trace(20, lr=0.0, telemetry_at=lambda s: telemetry(s, lr=0.0, grad_a=0.0))
    assert c.RULE_LORA_A_GRADIENT_ZERO not in {e.rule for e in _replay(lr_zero).rules}


def test_no_gradient_flow_from_step_one() -> None:
    timeline = _replay(trace(5, telemetry_at=lambda s: telemetry(s, grad_a=None, grad_b=None)))
    entry = timeline.rules[0]
    assert (entry.rule, entry.first_firing_step) == (c.RULE_NO_GRADIENT_FLOW, 1)
    assert entry.evidence["values"]["b_grads_none"] == N_MODULES
    assert timeline.exit_code == c.EXIT_VERDICT_DEGRADED


def test_frozen_lora_a_is_a_warning_not_no_gradient_flow() -> None:
    timeline = _replay(trace(5, telemetry_at=lambda s: telemetry(s, grad_a=None)))
    assert [e.rule for e in timeline.rules] == [c.RULE_LORA_A_GRADIENT_NONE]
    assert timeline.exit_code == c.EXIT_VERDICT_WARNING


def test_non_finite_params_are_critical() -> None:
    records = trace(10, telemetry_at=lambda s: telemetry(s, nonfinite_param=3 if s >= 5 else 0))
    timeline = _replay(records)
    assert (timeline.rules[0].rule, timeline.rules[0].first_firing_step) == (c.RULE_NON_FINITE, 5)
    assert timeline.rules[0].evidence["values"]["nonfinite_param"] == 3


def test_non_finite_param_norm_string_is_critical() -> None:
    timeline = _replay([telemetry(1, a_norm="NaN")])
    assert timeline.rules[0].rule == c.RULE_NON_FINITE


def test_nan_loss_streak_is_critical_but_one_nan_batch_is_a_warning() -> None:
    nan_steps = {21, 22, 23}
    streak = trace(30, loss_at=lambda s: "NaN" if s in nan_steps else 2.0)
    for record in streak:
        if record["step"] in nan_steps:
            record["grad_norm"] = "Infinity"
    timeline = _replay(streak)
    assert timeline.first_firing(c.RULE_NON_FINITE) == 25
    single = _replay(trace(30, loss_at=lambda s: "NaN" if s == 22 else 2.0))
    assert [e.rule for e in single.rules] == [c.RULE_NAN_LOSS_BATCH]
    assert single.worst_verdict == c.VERDICT_WARNING
    assert single.verdict == c.VERDICT_HEALTHY  # cleared at the next evaluation
    overflow = trace(30)  # fp16 loss scaling: inf gradient norms, finite loss, steps skipped
    for record in overflow[:10]:
        record["grad_norm"] = "Infinity"
    assert _replay(overflow).rules == ()


def test_nan_loss_with_zero_gradient_is_no_supervised_tokens() -> None:
    records = [training(s, loss="NaN", grad_norm=0.0) for s in range(1, 11)]
    timeline = _replay(records)
    entry = next(e for e in timeline.rules if e.rule == c.RULE_NO_SUPERVISED_TOKENS)
    assert (entry.severity, entry.first_firing_step) == (c.VERDICT_CRITICAL, 5)
    assert c.RULE_NON_FINITE not in {e.rule for e in timeline.rules}


def test_zero_loss_with_zero_gradient_is_no_supervised_tokens() -> None:
    """transformers 5.23's Trainer logs loss 0.0 (not NaN) when every label is -100
    (failure lab, labels-masked: loss 0.0 and grad_norm 0.0 on all 100 steps)."""
    records = [training(s, loss=0.0, grad_norm=0.0) for s in range(1, 11)]
    timeline = _replay(records)
    entry = next(e for e in timeline.rules if e.rule == c.RULE_NO_SUPERVISED_TOKENS)
    assert (entry.severity, entry.first_firing_step) == (c.VERDICT_CRITICAL, 5)
    assert {e.rule for e in timeline.rules} == {c.RULE_NO_SUPERVISED_TOKENS}
    # a zero loss with a gradient, or a zero gradient with a loss, is not "nothing supervised"
    assert _replay([training(s, loss=0.0, grad_norm=0.5) for s in range(1, 11)]).rules == ()
    assert _replay([training(s, loss=2.0, grad_norm=0.0) for s in range(1, 11)]).rules == ()


def _eval_trace(eval_losses: list[float]) -> list[dict[str, Any]]:
    records = [evaluation(0, eval_losses[0])]
    for record in trace(150, loss_at=lambda s: 3.0 - s / 100):
        records.append(record)
        if record["step"] % 50 == 0:
            records.append(evaluation(record["step"], eval_losses[record["step"] // 50]))
    return records


def test_eval_not_improving_while_train_loss_falls() -> None:
    timeline = _replay(_eval_trace([3.0, 3.0, 3.01, 3.0]))
    entry = timeline.rules[0]
    assert entry.rule == c.RULE_EVAL_NOT_IMPROVING
    # evals 0, 50, 100 form the first window, judged from step 105. It fires at once: the
    # window changes only with a new eval record, so "3 evaluations in a row" would only
    # delay it (the failure lab's eval-flat run missed its deadline by 4 steps that way).
    assert (entry.first_condition_step, entry.first_firing_step) == (105, 105)
    assert entry.evidence["values"]["train_loss_fall"] > 0.1
    assert _replay(_eval_trace([3.0, 2.5, 2.0, 1.8])).rules == ()


def test_gradient_underflow_warning_ignores_all_zero_grads() -> None:
    underflow = _replay(trace(10, telemetry_at=lambda s: telemetry(s, zero_fraction=0.05)))
    assert [e.rule for e in underflow.rules] == [c.RULE_GRADIENT_UNDERFLOW]
    assert underflow.rules[0].evidence["values"]["median_zero_fraction"] == pytest.approx(0.05)
    tiny = _replay(trace(10, telemetry_at=lambda s: telemetry(s, zero_fraction=0.0005)))
    assert tiny.rules == ()


def test_static_config_checks_alpha_warmup_and_lr() -> None:
    weak = HealthConfig(evaluation_interval_steps=5, lora_r=64, lora_alpha=1.0)
    entry = _replay(trace(5), weak).rules[0]
    assert (entry.rule, entry.first_firing_step) == (c.RULE_STATIC_CONFIG, 1)
    assert entry.evidence["values"]["alpha_over_sqrt_r"] == pytest.approx(0.125)
    fine = HealthConfig(evaluation_interval_steps=5, lora_r=16, lora_alpha=32.0)
    assert _replay(trace(5), fine).rules == ()
    long_warmup = HealthConfig(warmup_steps=500, total_steps=200)
    assert "warmup 500 >= total 200" in _replay(trace(5), long_warmup).rules[0].message
    lr_zero = _replay(trace(60, lr=0.0, telemetry_at=lambda s: telemetry(s, lr=0.0)))
    assert any("0 on every step" in e.message for e in lr_zero.rules)


def test_data_quality_from_data_stats() -> None:
    bad = {"pad_label_fraction": 0.2, "samples_without_supervision": 3, "malformed": 0}
    entry = _replay(trace(5), data_stats=bad).rules[0]
    assert entry.rule == c.RULE_DATA_QUALITY
    assert "20.0% of supervised labels are the pad token" in entry.message
    assert "3 samples have no supervised token" in entry.message
    nothing = {"samples": 10, "supervised_fraction": 0.0}
    assert (
        "no token of the data is supervised"
        in _replay(trace(5), data_stats=nothing).rules[0].message
    )
    good = {"pad_label_fraction": 0.0, "samples_without_supervision": 0, "malformed": 0}
    assert _replay(trace(5), data_stats=good).rules == ()


def test_overrides_switch_threshold_and_severity() -> None:
    records = trace(100, lr=1e-6, telemetry_at=_collapse)
    name = c.RULE_LORA_GRADIENT_COLLAPSE

    def with_rule(**kw: Any) -> Timeline:
        config = HealthConfig(evaluation_interval_steps=5, rules={name: RuleSettings(**kw)})
        return _replay(records, config)

    assert with_rule(enabled=False).rules == ()
    assert with_rule(threshold=1000.0).rules == ()
    assert with_rule(severity=c.VERDICT_CRITICAL).worst_verdict == c.VERDICT_CRITICAL
