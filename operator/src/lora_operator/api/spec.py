"""spec of a LoRAFineTune: what to train, on what, how, and what counts as healthy.

Every field's description becomes `kubectl explain` text; defaults here are the CRD's
defaults (the API server applies them, the models apply the same ones again harmlessly).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lora_operator.api import constants as c
from lora_operator.api.base import ApiModel, cel, cel_rules
from lora_operator.api.pod import PodSpecOverrides, SecretKeyRef

EvalMetric = Literal["loss", "bleu", "rougeL"]
EVAL_METRICS: tuple[EvalMetric, ...] = ("loss", "bleu", "rougeL")
MODEL_URI_PATTERN = r"^(hf|pvc|file)://[^\s]+$"
DATA_URI_PATTERN = r"^(pvc|file)://[^\s]+$"
OUTPUT_URI_PATTERN = r"^(pvc|file)://[^\s]+$"
INIT_PATTERN = (
    r"^(default|gaussian|orthogonal|pissa|pissa_niter_[1-9][0-9]*|olora"
    r"|eva|corda|loftq|lora_ga|mica)$"
)


class ModelSpec(ApiModel):
    """The base model to adapt."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "!has(self.tokenSecretRef) || self.source.startsWith('hf://')",
                "tokenSecretRef is only used for hf:// sources; remove it",
                ".tokenSecretRef",
            ),
            cel(
                "!has(self.revision) || self.source.startsWith('hf://')",
                "revision is only used for hf:// sources; remove it",
                ".revision",
            ),
        ),
    }

    source: str = Field(
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description=(
            "Where the base model lives: hf://ORG/NAME (Hugging Face hub id), "
            "pvc://CLAIM/PATH (a PersistentVolumeClaim) or file:///ABSOLUTE/PATH."
        ),
    )
    revision: str | None = Field(
        default=None,
        max_length=256,
        description="Hub revision (branch, tag or commit); hf:// only.",
    )
    dtype: Literal["bfloat16", "float16", "float32", "auto"] = Field(
        default="bfloat16", description="dtype the base weights are loaded in."
    )
    tokenizer: str | None = Field(
        default=None,
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description="Tokenizer location when it differs from the model (same URI schemes).",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a hub token for gated or private hf:// models.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run model code shipped with the checkpoint. Off unless you trust the source.",
    )


class DatasetSpec(ApiModel):
    """Training data: JSONL conversations (system/user/assistant turns)."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "!(has(self.evalSource) && has(self.evalSplit))",
                "set either evalSource or evalSplit, not both",
            )
        ),
    }

    source: str = Field(
        pattern=DATA_URI_PATTERN,
        max_length=1024,
        description="JSONL training file: pvc://CLAIM/PATH or file:///ABSOLUTE/PATH.",
    )
    format: Literal["conversations"] = Field(
        default="conversations",
        description=(
            'Record format: {"conversations": [{"role": "system|user|assistant", '
            '"content": "..."}]} per line.'
        ),
    )
    eval_source: str | None = Field(
        default=None,
        pattern=DATA_URI_PATTERN,
        max_length=1024,
        description="Separate JSONL evaluation file (same format).",
    )
    eval_split: float | None = Field(
        default=None,
        gt=0.0,
        lt=0.5,
        description="Fraction of the training file held out for evaluation (when no evalSource).",
    )
    chat_template: Literal["tokenizer", "chatml"] = Field(
        default="tokenizer",
        description=(
            "tokenizer: the tokenizer's own chat template. chatml: <|im_start|>/<|im_end|> "
            "added as real special tokens (embeddings resized)."
        ),
    )
    max_length: int = Field(
        default=2048, ge=16, le=131072, description="Maximum tokens per sample (or packed row)."
    )
    packing: bool = Field(
        default=False,
        description="Pack several samples per row; samples never attend to each other.",
    )


class LoRASpec(ApiModel):
    """The LoRA adapter (peft LoraConfig)."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel("self.alpha > 0.0", "alpha must be > 0 (the adapter would have no effect)"),
            cel(
                "self.init != 'orthogonal' || self.r % 2 == 0",
                "init orthogonal needs an even r",
                ".r",
            ),
            cel(
                "!(self.init in ['eva', 'corda'])",
                "init eva and corda need a data-driven initialisation pass that v1alpha1 does "
                "not run; use default, gaussian, pissa or olora",
                ".init",
            ),
            cel(
                "self.init != 'loftq'",
                "init loftq needs a quantized base model, which v1alpha1 does not load; "
                "use default or pissa",
                ".init",
            ),
            cel(
                "self.init != 'lora_ga'",
                "init lora_ga needs a gradient-estimation pass that v1alpha1 does not run; "
                "use default or pissa",
                ".init",
            ),
            cel(
                "self.init != 'mica'",
                "init mica freezes lora_B on purpose, which the health rules cannot tell from "
                "a broken run; use default or olora",
                ".init",
            ),
            cel(
                "!has(self.loraPlusLrRatio) || !self.useDora",
                "loraPlusLrRatio and useDora cannot be combined; drop one of them",
            ),
        ),
    }

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the adapter.")
    alpha: float = Field(
        default=32.0,
        le=1.0e6,
        description="Scaling numerator: scale = alpha/r (alpha/sqrt(r) with rsLoRA).",
    )
    dropout: float = Field(default=0.05, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        max_length=64,
        description="Module names (or suffixes) to adapt, e.g. q_proj, v_proj, gate_proj.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Modules trained in full and saved with the adapter (e.g. lm_head).",
    )
    init: str = Field(
        default="default",
        pattern=INIT_PATTERN,
        description=(
            "Adapter initialisation: default (kaiming A, B=0), gaussian, orthogonal (even r), "
            "pissa, pissa_niter_N, olora. eva, corda, loftq, lora_ga and mica are rejected."
        ),
    )
    use_rslora: bool = Field(default=False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")
    lora_plus_lr_ratio: float | None = Field(
        default=None,
        ge=1.0,
        le=1024.0,
        description="LoRA+: learning rate of B = ratio x learning rate of A (e.g. 16).",
    )


class WarmupSpec(ApiModel):
    """Learning-rate warmup: a ratio of total steps or a number of steps."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "!(has(self.ratio) && has(self.steps))",
                "set warmup.ratio or warmup.steps, not both",
            )
        ),
    }

    ratio: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Fraction of total steps."
    )
    steps: int | None = Field(default=None, ge=0, description="Number of warmup steps.")


class EvalSpec(ApiModel):
    """Evaluation during and at the end of training."""

    every_steps: int = Field(default=50, ge=1, description="Evaluate every N optimizer steps.")
    metrics: list[EvalMetric] = Field(
        default_factory=lambda: list(EVAL_METRICS),
        min_length=1,
        max_length=3,
        description="loss on supervised tokens; bleu and rougeL of generated assistant replies.",
    )
    max_samples: int = Field(
        default=64, ge=1, le=100000, description="Evaluation samples used per evaluation."
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=4096, description="Generation length for bleu and rougeL."
    )


class TrainingSpec(ApiModel):
    """Optimisation settings."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "has(self.epochs) != has(self.maxSteps)",
                "set exactly one of training.epochs and training.maxSteps",
            ),
        ),
    }

    learning_rate: float = Field(default=2.0e-4, ge=0.0, le=1.0, description="Peak learning rate.")
    epochs: float | None = Field(
        default=None, gt=0.0, le=1000.0, description="Passes over the data (xor maxSteps)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, le=100000000, description="Optimizer steps to run (xor epochs)."
    )
    micro_batch_size: int = Field(
        default=4, ge=1, le=4096, description="Samples per device per step."
    )
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=4096, description="Micro-batches accumulated per optimizer step."
    )
    max_grad_norm: float = Field(
        default=1.0, ge=0.0, description="Gradient clipping threshold (0 disables clipping)."
    )
    warmup: WarmupSpec = Field(
        default_factory=lambda: WarmupSpec(ratio=0.03),
        description="Learning-rate warmup.",
    )
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule after warmup."
    )
    weight_decay: float = Field(
        default=0.0, ge=0.0, le=10.0, description="Decoupled (AdamW) weight decay."
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16",
        description="bf16 (default), fp16 with dynamic loss scaling, or fp32.",
    )
    gradient_checkpointing: bool = Field(
        default=False,
        description="Recompute activations in backward (non-reentrant, LoRA grads keep flowing).",
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Random seed.")
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation settings.")
    checkpoint_every_steps: int = Field(
        default=200, ge=1, description="Write a resumable checkpoint every N optimizer steps."
    )


class PerformanceSpec(ApiModel):
    """Speed settings. Each default keeps the plain path's numerics (docs/performance.md)."""

    adapter_fast_path: bool = Field(
        default=True,
        description="Under bf16/fp16 autocast, feed LoRA layers their input in the compute "
        "dtype instead of an fp32 copy (same values; saves a cast and its memory per layer).",
    )
    fused_kernels: Literal["auto", "liger", "none"] = Field(
        default="auto",
        description="Fused RMSNorm, SwiGLU, RoPE and linear cross-entropy (Liger kernels): "
        "auto uses them on CUDA when the image has liger-kernel and the model type is "
        "supported; liger requires them; none never.",
    )
    checkpointing: Literal["all", "auto"] = Field(
        default="all",
        description="With training.gradientCheckpointing: all checkpoints every decoder "
        "layer; auto measures one layer's activations at start and checkpoints only as many "
        "layers as the GPU's memory needs (single-process or DDP, not DeepSpeed).",
    )
    memory_fraction: float = Field(
        default=0.9,
        gt=0.1,
        le=1.0,
        description="Share of GPU memory checkpointing: auto may plan to use.",
    )
    compile: bool = Field(
        default=False, description="torch.compile the model (slow first steps; see docs)."
    )


class DeepSpeedSpec(ApiModel):
    """DeepSpeed ZeRO settings (generated config) or a user-supplied config."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "!self.offloadParams || self.zeroStage == 3",
                "offloadParams needs zeroStage 3",
                ".offloadParams",
            ),
            cel(
                "!self.offloadOptimizer || self.zeroStage >= 1",
                "offloadOptimizer needs zeroStage 1, 2 or 3",
                ".offloadOptimizer",
            ),
        ),
    }

    zero_stage: int = Field(default=2, ge=0, le=3, description="ZeRO stage 0-3.")
    offload_optimizer: bool = Field(default=False, description="Offload optimizer state to CPU.")
    offload_params: bool = Field(default=False, description="Offload parameters to CPU (ZeRO-3).")
    config_map_ref: str | None = Field(
        default=None,
        max_length=253,
        description=(
            "Name of a ConfigMap (key ds_config.json) with a full DeepSpeed config; "
            "replaces the generated one."
        ),
    )


class DistributedSpec(ApiModel):
    """How many processes, on how many nodes, started by which launcher."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "self.device == 'cpu' || self.nodes * self.gpusPerNode >= 1",
                "nodes x gpusPerNode must be >= 1 on device cuda; "
                "set gpusPerNode >= 1 or device: cpu",
                ".gpusPerNode",
            ),
            cel(
                "!has(self.processesPerNode) || self.device == 'cpu'",
                "processesPerNode is for device cpu; on cuda it equals gpusPerNode",
                ".processesPerNode",
            ),
        ),
    }

    nodes: int = Field(default=1, ge=1, le=1024, description="Pods (nodes) in the gang.")
    gpus_per_node: int = Field(
        default=1, ge=0, le=64, description="GPUs per pod (one process each)."
    )
    device: Literal["cuda", "cpu"] = Field(
        default="cuda", description="cuda for GPU training; cpu for tests and demos."
    )
    processes_per_node: int | None = Field(
        default=None, ge=1, le=256, description="Processes per pod on device cpu (default 1)."
    )
    launcher: Literal["torchrun", "deepspeed"] = Field(
        default="torchrun",
        description="torchrun (static rendezvous at pod 0) or the deepspeed launcher (--no_ssh).",
    )
    deepspeed: DeepSpeedSpec | None = Field(
        default=None, description="DeepSpeed ZeRO; absent means plain DDP."
    )


class ResourcesSpec(ApiModel):
    """Per-pod compute resources."""

    cpu: str = Field(default="8", pattern=r"^[0-9]+(\.[0-9]+)?m?$", description="CPU request.")
    memory: str = Field(
        default="64Gi", pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$", description="Memory request."
    )
    gpu_resource_name: str = Field(
        default="nvidia.com/gpu",
        pattern=r"^[a-z0-9.-]+/[a-z0-9.-]+$",
        description="Extended resource name of the GPU.",
    )
    shm_size: str = Field(
        default="16Gi",
        pattern=r"^[0-9]+(\.[0-9]+)?([KMGTPE]i?)?$",
        description="Size of the memory-backed /dev/shm.",
    )


class MonitoringSpec(ApiModel):
    """Telemetry exported by the trainer."""

    interval_steps: int = Field(
        default=10, ge=1, le=100000, description="Collect LoRA/Adam statistics every N steps."
    )
    port: int = Field(
        default=c.DEFAULT_METRICS_PORT,
        ge=1024,
        le=65535,
        description="Port of /metrics and /health (named port 'metrics').",
    )
    per_module: bool = Field(
        default=True, description="Export per-layer/module/matrix series (off: aggregates only)."
    )


class RuleOverride(ApiModel):
    """Per-rule switch, threshold and severity."""

    name: Literal[c.RULE_NAMES] = Field(description="Rule name, e.g. LoRAGradientCollapse.")  # type: ignore[valid-type]
    enabled: bool = Field(default=True, description="Evaluate this rule.")
    threshold: float | None = Field(
        default=None, description="Rule threshold (see docs/health-rules.md for each rule's unit)."
    )
    severity: Literal["Warning", "Degraded", "Critical"] | None = Field(
        default=None, description="Severity when firing (default: the rule's own)."
    )


class GraceSpec(ApiModel):
    """When the ratio and size rules start judging (see docs/health-rules.md)."""

    lr_sum: float = Field(
        default=5.0e-3, gt=0.0, description="Grace ends once the summed learning rate reaches this."
    )
    min_steps: int = Field(
        default=50, ge=0, description="...or at max(minSteps, min(warmup, 0.2 x total) + 10)."
    )


class PreflightSpec(ApiModel):
    """An instrumented step before training starts."""

    enabled: bool = Field(default=True, description="Run the preflight checks.")


class HealthSpec(ApiModel):
    """Health policy: one source of thresholds for conditions, alerts and dashboards."""

    evaluation_interval_steps: int = Field(
        default=10, ge=1, le=100000, description="Evaluate the rules every N steps."
    )
    consecutive_evaluations: int = Field(
        default=3, ge=1, le=100, description="Evaluations a Degraded rule must fire in a row."
    )
    grace: GraceSpec = Field(default_factory=GraceSpec, description="Grace period.")
    rules: list[RuleOverride] = Field(
        default_factory=list,
        max_length=len(c.RULE_NAMES),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="Per-rule overrides, keyed by name.",
    )
    stall_timeout_seconds: int = Field(
        default=900, ge=60, description="No step progress for this long marks the job Stalled."
    )
    on_degraded: Literal["Alert", "Suspend", "Fail"] = Field(
        default="Alert",
        description="Alert (condition, Event, metric), Suspend (stop pods, keep job) or Fail.",
    )
    preflight: PreflightSpec = Field(default_factory=PreflightSpec, description="Preflight.")


class RunPolicySpec(ApiModel):
    """Lifecycle of the job (live: may change while running)."""

    suspend: bool = Field(
        default=False, description="Stop the pods (checkpoint first); resume with false."
    )
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Gang restarts allowed on infrastructure failures."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the job after this much running time."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished job (and its children) after this."
    )
    managed_by: str | None = Field(
        default=None, max_length=63, description="Passed to the Job's spec.managedBy (e.g. Kueue)."
    )


class OutputSpec(ApiModel):
    """Where adapters and checkpoints go."""

    uri: str = Field(
        pattern=OUTPUT_URI_PATTERN,
        max_length=1024,
        description="pvc://CLAIM/PATH (ReadWriteMany for multi-node) or file:///ABSOLUTE/PATH.",
    )
    resume: Literal["auto", "never"] = Field(
        default="auto", description="auto: continue from the latest checkpoint found there."
    )


class LoRAFineTuneSpec(ApiModel):
    """A LoRA fine-tuning job that cannot fail silently."""

    model_config = {
        **ApiModel.model_config,
        "json_schema_extra": cel_rules(
            cel(
                "self.distributed.nodes == 1 || !self.output.uri.startsWith('file://')",
                "a multi-node job needs a shared output: use pvc://CLAIM/PATH "
                "(ReadWriteMany), not file://",
                ".output.uri",
            ),
            cel(
                "self.distributed.nodes == 1 || !self.dataset.source.startsWith('file://')",
                "a multi-node job reads its data on every node: use pvc://CLAIM/PATH, not file://",
                ".dataset.source",
            ),
        ),
    }

    model: ModelSpec = Field(description="Base model.")
    dataset: DatasetSpec = Field(description="Training and evaluation data.")
    lora: LoRASpec = Field(default_factory=LoRASpec, description="The adapter.")
    training: TrainingSpec = Field(description="Optimisation.")
    distributed: DistributedSpec = Field(
        default_factory=DistributedSpec, description="Processes, nodes, launcher, DeepSpeed."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Per-pod resources."
    )
    pod: PodSpecOverrides = Field(default_factory=PodSpecOverrides, description="Pod overrides.")
    image: str | None = Field(
        default=None, max_length=512, description="Trainer image (default: the operator's setting)."
    )
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec, description="Telemetry.")
    performance: PerformanceSpec = Field(
        default_factory=PerformanceSpec, description="Throughput settings."
    )
    health: HealthSpec = Field(default_factory=HealthSpec, description="Health policy.")
    run_policy: RunPolicySpec = Field(default_factory=RunPolicySpec, description="Lifecycle.")
    output: OutputSpec = Field(description="Adapter and checkpoint location.")
