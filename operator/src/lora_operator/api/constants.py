"""Names shared by the operator, the trainer, the chart and the docs.

Everything here is a contract (see docs/ and the architecture note): rule names double as the
Degraded condition's reasons, exit codes are read by the Job's podFailurePolicy, and label
keys select the operator's children.
"""

from __future__ import annotations

from typing import Final

GROUP: Final = "lora-operator.dev"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"
KIND: Final = "LoRAFineTune"
PLURAL: Final = "lorafinetunes"
SINGULAR: Final = "lorafinetune"
SHORT_NAMES: Final = ("lft",)
CATEGORIES: Final = ("all", "training")
CRD_NAME: Final = f"{PLURAL}.{GROUP}"

# Labels, annotations and finalizers live under the API group.
LABEL_PREFIX: Final = f"{GROUP}/"
LABEL_JOB_NAME: Final = f"{GROUP}/job-name"
LABEL_ROLE: Final = f"{GROUP}/role"
LABEL_NODE_RANK: Final = f"{GROUP}/node-rank"
LABEL_MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE: Final = "lora-operator"
FINALIZER: Final = f"{GROUP}/finalizer"
KUEUE_QUEUE_LABEL: Final = "kueue.x-k8s.io/queue-name"

# Exit codes. Every CLI: 0 ok, 1 invalid input or runtime error, 2 usage.
EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
# Verdict-bearing commands (health replay, preflight, local).
EXIT_VERDICT_HEALTHY: Final = 0
EXIT_VERDICT_WARNING: Final = 10
EXIT_VERDICT_DEGRADED: Final = 20
# A rank stopped on the health policy; the Job's podFailurePolicy maps it to FailJob.
EXIT_HEALTH_STOP: Final = 86

# Default port of the trainer's /metrics and /health (named port "metrics").
METRICS_PORT_NAME: Final = "metrics"
DEFAULT_METRICS_PORT: Final = 9400

# Phases (status.phase).
PHASE_PENDING: Final = "Pending"
PHASE_STARTING: Final = "Starting"
PHASE_RUNNING: Final = "Running"
PHASE_SUCCEEDED: Final = "Succeeded"
PHASE_FAILED: Final = "Failed"
PHASE_SUSPENDED: Final = "Suspended"
PHASES: Final = (
    PHASE_PENDING,
    PHASE_STARTING,
    PHASE_RUNNING,
    PHASE_SUCCEEDED,
    PHASE_FAILED,
    PHASE_SUSPENDED,
)

# Condition types (metav1.Condition, keyed by type).
COND_RUNNING: Final = "Running"
COND_SUCCEEDED: Final = "Succeeded"
COND_FAILED: Final = "Failed"
COND_SUSPENDED: Final = "Suspended"
COND_DEGRADED: Final = "Degraded"
COND_PREFLIGHT_PASSED: Final = "PreflightPassed"
COND_SPEC_ACCEPTED: Final = "SpecAccepted"
CONDITION_TYPES: Final = (
    COND_RUNNING,
    COND_SUCCEEDED,
    COND_FAILED,
    COND_SUSPENDED,
    COND_DEGRADED,
    COND_PREFLIGHT_PASSED,
    COND_SPEC_ACCEPTED,
)

# Health verdicts, in increasing order of severity (Unknown is not a severity).
VERDICT_HEALTHY: Final = "Healthy"
VERDICT_WARNING: Final = "Warning"
VERDICT_DEGRADED: Final = "Degraded"
VERDICT_CRITICAL: Final = "Critical"
VERDICT_UNKNOWN: Final = "Unknown"
VERDICTS: Final = (
    VERDICT_HEALTHY,
    VERDICT_WARNING,
    VERDICT_DEGRADED,
    VERDICT_CRITICAL,
    VERDICT_UNKNOWN,
)
# Severities a rule can carry (a firing rule raises the verdict to its severity).
SEVERITIES: Final = (VERDICT_WARNING, VERDICT_DEGRADED, VERDICT_CRITICAL)

# Health rule names: also the Degraded condition's reasons.
RULE_NON_FINITE: Final = "NonFinite"
RULE_NO_SUPERVISED_TOKENS: Final = "NoSupervisedTokens"
RULE_NO_GRADIENT_FLOW: Final = "NoGradientFlow"
RULE_LORA_A_GRADIENT_ZERO: Final = "LoRAAGradientZero"
RULE_LORA_GRADIENT_COLLAPSE: Final = "LoRAGradientCollapse"
RULE_ADAPTER_NOT_LEARNING: Final = "AdapterNotLearning"
RULE_ADAPTER_DECAY: Final = "AdapterDecay"
RULE_EVAL_NOT_IMPROVING: Final = "EvalNotImproving"
RULE_GRADIENT_UNDERFLOW: Final = "GradientUnderflow"
RULE_LORA_A_GRADIENT_NONE: Final = "LoRAAGradientNone"
RULE_NAN_LOSS_BATCH: Final = "NaNLossBatch"
RULE_STATIC_CONFIG: Final = "StaticConfig"
RULE_DATA_QUALITY: Final = "DataQuality"
RULE_STALLED: Final = "Stalled"  # operator-side: no step progress

# Default severity of each rule; spec.health.rules may override it.
RULE_DEFAULT_SEVERITY: Final = {
    RULE_NON_FINITE: VERDICT_CRITICAL,
    RULE_NO_SUPERVISED_TOKENS: VERDICT_CRITICAL,
    RULE_NO_GRADIENT_FLOW: VERDICT_CRITICAL,
    RULE_LORA_A_GRADIENT_ZERO: VERDICT_CRITICAL,
    RULE_LORA_GRADIENT_COLLAPSE: VERDICT_DEGRADED,
    RULE_ADAPTER_NOT_LEARNING: VERDICT_DEGRADED,
    RULE_ADAPTER_DECAY: VERDICT_DEGRADED,
    RULE_EVAL_NOT_IMPROVING: VERDICT_DEGRADED,
    RULE_STALLED: VERDICT_DEGRADED,
    RULE_GRADIENT_UNDERFLOW: VERDICT_WARNING,
    RULE_LORA_A_GRADIENT_NONE: VERDICT_WARNING,
    RULE_NAN_LOSS_BATCH: VERDICT_WARNING,
    RULE_STATIC_CONFIG: VERDICT_WARNING,
    RULE_DATA_QUALITY: VERDICT_WARNING,
}
RULE_NAMES: Final = tuple(RULE_DEFAULT_SEVERITY)

# Reasons of conditions other than Degraded.
REASON_SPEC_VALID: Final = "SpecValid"
REASON_INVALID_SPEC: Final = "InvalidSpec"
REASON_IMMUTABLE_FIELD: Final = "ImmutableFieldChanged"
REASON_HEALTH_POLICY: Final = "HealthPolicy"
REASON_BACKOFF_LIMIT: Final = "BackoffLimitExceeded"
REASON_DEADLINE: Final = "DeadlineExceeded"
REASON_USER_SUSPENDED: Final = "SuspendedByUser"
REASON_HEALTHY: Final = "Healthy"
