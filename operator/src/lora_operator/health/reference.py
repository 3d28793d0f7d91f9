"""docs/health-rules.md, generated from the rule definitions (written by `make crds`)."""

from __future__ import annotations

from lora_operator.health.catalog import RULES
from lora_operator.health.config import GRACE_EXTRA_STEPS, GRACE_TOTAL_FRACTION
from lora_operator.health.rules import FLAGGED_FRACTION, Rule

HEADER = """\
<!-- Generated from lora_operator.health by `make crds`; do not edit by hand. -->

# Health rules

The trainer evaluates these rules on its `trace.jsonl` records (docs/trace-schema.md) and
`lora-operator health replay TRACE.jsonl [--spec SPEC.yaml]` replays them on a finished or
running trace. The verdict is the highest severity among the firing rules (Healthy when none
fires; Unknown before the first evaluation). Rule names are the `Degraded` condition's
reasons; each has a runbook in `docs/runbooks/<Rule>.md`. Why these rules and not the naive
"B/A gradient ratio > 100" one: see the design note on LoRA training health.

## When rules are evaluated

- An evaluation runs on the first training record at or after step 1, then on the first
  training record at or past each multiple of `spec.health.evaluationIntervalSteps`
  (default 10). Telemetry rules judge the newest telemetry record since the previous
  evaluation; without a new one they keep their state.
- Module-level rules aggregate over adapted modules: a rule fires when at least
  {flagged:.0%} of the modules cross its threshold (absolute gradient norms differ ~100x
  between modules, so no rule uses an absolute gradient threshold). The evidence gives the
  median over modules, how many were flagged and the worst three.
- Persistent rules (column "in a row") must hold at `spec.health.consecutiveEvaluations`
  (default 3) evaluations in a row before they fire; the others fire at the first evaluation
  where they hold. A rule stops firing at the first evaluation where it no longer holds.
- Evidence (in `/health`, conditions and the replay's JSON): `step` of the evaluation,
  `values` (the measured numbers), `worst` (up to three modules or matrices with their value,
  worst first) and `condition_since_step` (the first evaluation of the current run of holds).
- Several rules firing: `/health` lists them most severe first, then by the step they
  started firing, then in the order of the table below (the more specific rule first, e.g.
  LoRAGradientCollapse before AdapterNotLearning); the first one is the primary reason.
- `spec.health.rules[]` overrides a rule's `enabled`, `threshold` (in the unit below) and
  `severity`.
- Out-of-order records: a training record whose step is not after the last accepted one is
  ignored with a warning until the trace passes that step again (a resumed run re-appends
  the steps after its checkpoint; the rules' state carries on across the resume).

## Grace period

The grace period applies to LoRAGradientCollapse, AdapterNotLearning and AdapterDecay (the
ratio and size rules), which are not judged while it lasts. It ends at the first step where
the summed learning rate of lora_B reaches `spec.health.grace.lrSum` (default 5e-3) OR the
step reaches max(`spec.health.grace.minSteps` (default 50), min(warmup steps,
{fraction} x total steps) + {extra}), whichever comes first, so a broken warmup cannot hide a
run in grace forever.

- Summed learning rate of lora_B: the `lr_sum` of the lora_B matrices in the newest
  telemetry record (the largest one), or the records' `lr` summed over the steps when that is
  larger (traces without telemetry). After a resume (where the trainer's sum restarts at 0)
  it continues from the value at the checkpoint.
- Warmup steps: `spec.training.warmup.steps`, or ceil(`warmup.ratio` x total steps); 0 when
  unknown (no `--spec`, or a ratio with `epochs`). Total steps: `spec.training.maxSteps`;
  when unknown the min() is just the warmup.
- Once over, grace never starts again.

## Rules

| rule | severity | threshold (default) | unit | grace | in a row |
|---|---|---|---|---|---|
"""


def _row(rule: Rule) -> str:
    grace = "yes" if rule.uses_grace else "no"
    persistent = "yes" if rule.persistent else "no"
    if rule.check is None:
        grace = persistent = "operator"
    return (
        f"| [{rule.name}](runbooks/{rule.name}.md) | {rule.severity} | {rule.threshold:g} | "
        f"{_cell(rule.unit)} | {grace} | {persistent} |"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _section(rule: Rule) -> str:
    return (
        f"### {rule.name}\n\n{rule.meaning}\n\n"
        f"- Default severity: {rule.severity}; threshold {rule.threshold:g} ({rule.unit}).\n"
        f"- Evidence: {rule.evidence}.\n"
        f"- Runbook: [runbooks/{rule.name}.md](runbooks/{rule.name}.md).\n"
    )


def render_rules_doc() -> str:
    header = HEADER.format(
        flagged=FLAGGED_FRACTION, fraction=GRACE_TOTAL_FRACTION, extra=GRACE_EXTRA_STEPS
    )
    sections = "\n".join(_section(rule) for rule in RULES)
    table = "\n".join(_row(rule) for rule in RULES)
    return f"{header}{table}\n\n## What each rule means\n\n{sections}"
