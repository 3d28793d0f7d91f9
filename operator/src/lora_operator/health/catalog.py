"""Every rule's definition, in the order of lora_operator.api.constants.RULE_NAMES."""

from __future__ import annotations

from lora_operator.api import constants as c
from lora_operator.health import rules as r
from lora_operator.health.rules import Rule
from lora_operator.health.stream import TRAIN_LOSS_SPAN

RULES: tuple[Rule, ...] = (
    Rule(
        c.RULE_NON_FINITE,
        "The LoRA parameters or Adam's second moment hold NaN/Inf (after the step), or the "
        "loss was non-finite (with a non-zero gradient) on several steps in a row. A "
        "non-finite gradient norm with a finite loss alone does not count: fp16 loss scaling "
        "skips such steps on purpose.",
        3,
        "consecutive training steps with a non-finite loss and a gradient norm that is not 0 "
        "(non-finite parameters or Adam state fire at once)",
        "nonfinite_param, nonfinite_exp_avg_sq, nonfinite_grad counts; matrices with a "
        "non-finite norm; or the number of non-finite steps",
        r.check_non_finite,
    ),
    Rule(
        c.RULE_NO_SUPERVISED_TOKENS,
        "The loss is NaN (or exactly 0, as the Hugging Face Trainer of transformers 5 logs "
        "it) while the gradient is exactly 0: no token of the batches carries a label "
        "(every label -100).",
        3,
        "consecutive training steps with a NaN (or exactly 0) loss and a zero gradient norm",
        "the number of such steps",
        r.check_no_supervised_tokens,
    ),
    Rule(
        c.RULE_NO_GRADIENT_FLOW,
        "The lora_B gradients (and usually lora_A's) are None: no gradient reaches the "
        "adapter, while the loss may still fall through other trainable modules.",
        1.0,
        "fraction of lora_B matrices whose grad is None",
        "lora_B and lora_A grads that are None, matrices in total",
        r.check_no_gradient_flow,
    ),
    Rule(
        c.RULE_LORA_A_GRADIENT_ZERO,
        "At step >= 2 the lora_A gradient is exactly 0 although the learning rate (of any "
        "param group) summed over the earlier steps is > 0: lora_B never moved off its zero "
        "init (lr 0 for lora_B's group, a scheduler bug).",
        0.25,
        "fraction of modules whose lora_A grad norm is exactly 0",
        "modules with a zero lora_A grad, the summed lr before the step, the first modules",
        r.check_a_gradient_zero,
    ),
    Rule(
        c.RULE_LORA_GRADIENT_COLLAPSE,
        "After grace, ||grad lora_B|| / ||grad lora_A|| stays far above what healthy runs show "
        "(healthy: <= 12 at step 50): lora_B is not growing, so lora_A gets no gradient.",
        50,
        "ratio ||grad B|| / ||grad A|| per module (dimensionless)",
        "median ratio, modules flagged, summed lr of lora_B, the worst modules",
        r.check_gradient_collapse,
        uses_grace=True,
        persistent=True,
    ),
    Rule(
        c.RULE_ADAPTER_NOT_LEARNING,
        "After grace, the adapter's weight update is tiny relative to the base weight "
        "(healthy: ~0.1-0.9): training does not change the model.",
        0.02,
        "dW_rel = ||scale * B @ A||_F / ||W||_F per module (dimensionless; calibrate per model)",
        "median dW_rel, modules flagged, summed lr of lora_B, the worst modules",
        r.check_adapter_not_learning,
        uses_grace=True,
        persistent=True,
    ),
    Rule(
        c.RULE_ADAPTER_DECAY,
        "After grace, ||lora_A|| has shrunk well below its initial norm (healthy runs grow "
        "it): coupled L2 weight decay is eating the adapter.",
        0.75,
        "||A|| / ||A at the first collected step|| per module",
        "median norm ratio, modules flagged, the worst modules",
        r.check_adapter_decay,
        uses_grace=True,
        persistent=True,
    ),
    Rule(
        c.RULE_EVAL_NOT_IMPROVING,
        f"Over the last {r.EVAL_WINDOW} eval records the training loss fell by a clear margin "
        f"while no eval metric (loss, BLEU, ROUGE-L) improved by more than "
        f"{r.EVAL_MIN_GAIN:.0%}: training fits something that does not generalise.",
        0.1,
        "relative fall of the training loss (mean of the last "
        f"{TRAIN_LOSS_SPAN} logged losses) between the first and last eval of the window",
        "train loss fall, eval metrics at the first and last eval, their steps",
        r.check_eval_not_improving,
        # Not persistent: its condition changes only when an eval record arrives, so three
        # evaluations in a row would add two evaluation intervals of delay and no evidence
        # (failure lab, eval-flat: fired at step 65, 4 steps past its deadline).
    ),
    Rule(
        c.RULE_STALLED,
        "Operator-side: no step progress for spec.health.stallTimeoutSeconds (the trainer "
        "cannot see this; the engine does not evaluate it).",
        900,
        "seconds without step progress (spec.health.stallTimeoutSeconds; the threshold "
        "override is not used)",
        "the last step and when it was reached",
        None,
    ),
    Rule(
        c.RULE_GRADIENT_UNDERFLOW,
        "Many gradient elements are exactly 0 (fp32 runs: none): gradients underflow, "
        "typically fp16 autocast without loss scaling.",
        0.001,
        "fraction of grad elements exactly 0 per LoRA matrix with a non-zero grad",
        "median zero fraction, matrices flagged, the worst matrices",
        r.check_gradient_underflow,
    ),
    Rule(
        c.RULE_LORA_A_GRADIENT_NONE,
        "The lora_A gradients are None while lora_B's are not: lora_A is frozen. Intended "
        "for LoRA-FA; otherwise a bug.",
        0.25,
        "fraction of modules whose lora_A grad is None",
        "modules with a None lora_A grad",
        r.check_a_gradient_none,
    ),
    Rule(
        c.RULE_NAN_LOSS_BATCH,
        "A batch had a non-finite loss (e.g. a batch without supervised tokens); the Hugging "
        "Face Trainer's NaN/Inf log filter hides these.",
        1,
        "non-finite-loss training steps since the previous evaluation",
        "the number of such steps",
        r.check_nan_loss_batch,
    ),
    Rule(
        c.RULE_STATIC_CONFIG,
        "The spec cannot train well: alpha/sqrt(r) too small, warmup >= total steps, or a "
        "learning rate of 0 (also seen in the trace after grace).",
        1.0,
        "alpha / sqrt(r) (dimensionless)",
        "alpha/sqrt(r), warmup and total steps",
        r.check_static_config,
    ),
    Rule(
        c.RULE_DATA_QUALITY,
        "The data statistics (data_stats.json) show padding trained as labels, no supervised "
        "token at all, samples without a supervised token, or malformed samples.",
        0.05,
        "fraction of supervised labels that are the pad token",
        "pad/eos label fractions, supervised fraction, counts of bad samples",
        r.check_data_quality,
    ),
)

RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}
