"""Sections for training (LoRA, Ray Train workers), SFT, DPO and the label stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from cai_ray.config.checks import ConfigError, _choice, _fraction, _placement, _positive
from cai_ray.config.inference import SamplingConfig


@dataclass
class LoraConfig:
    enabled: bool = True  # Train a LoRA adapter (false: full fine-tuning).
    r: int = 16  # LoRA rank.
    alpha: int = 32  # LoRA scaling alpha.
    dropout: float = 0.05  # Dropout on the LoRA input.
    # Modules that get a LoRA adapter.
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def validate(self, key: str) -> None:
        if self.enabled:
            _positive(f"{key}.r", self.r)
            _fraction(f"{key}.dropout", self.dropout)
            if not self.target_modules:
                raise ConfigError(f"{key}.target_modules is empty; name the modules to adapt, e.g. [q_proj,v_proj]")


@dataclass
class TrainConfig:
    """How training runs: shared by the sft and dpo stages."""

    workers: int = 2  # Ray Train workers (one training process each).
    use_gpu: bool = False  # One GPU per worker.
    cpus_per_worker: float = 1.0  # CPUs each worker requests.
    # Placement per worker on top of CPUs/GPUs, as in generate.resources / generate.labels.
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # Ray node label selector for the workers.
    zero_stage: int = 2  # DeepSpeed ZeRO stage: 0, 1, 2 or 3.
    precision: str = "fp32"  # fp32, bf16 or fp16 (fp16 needs GPUs).
    batch_size: int = 4  # Examples per worker per micro-step.
    grad_accum: int = 1  # Micro-steps per optimizer step (global batch = batch_size x grad_accum x workers).
    max_length: int = 512  # Tokens per example; longer ones are cut from the end.
    checkpoint_every: int = 50  # Steps between checkpoints (resume points).
    # Metrics go to MLflow every N steps; ray.train.report is a barrier.
    log_every: int = 10
    max_failures: int = 1  # Times Ray Train restarts a failed run from its last checkpoint.
    # A fresh run never picks up an older checkpoint unless this is true.
    resume: bool = False
    # Recompute each decoder layer's activations in backward instead of keeping them:
    # less memory, about one more forward pass of time, the same numbers.
    gradient_checkpointing: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all workers."""
        return self.batch_size * self.grad_accum * self.workers

    def validate(self, key: str = "train") -> None:
        _positive(f"{key}.workers", self.workers)
        _placement(key, self.resources, self.labels, f"{key}.cpus_per_worker", f"{key}.use_gpu")
        _choice(f"{key}.zero_stage", self.zero_stage, (0, 1, 2, 3))
        _choice(f"{key}.precision", self.precision, ("fp32", "bf16", "fp16"))
        if self.precision == "fp16" and not self.use_gpu:
            raise ConfigError(f"{key}.precision=fp16 is not supported on CPU; use {key}.precision=bf16 "
                              f"or fp32, or {key}.use_gpu=true")
        for name in ("batch_size", "grad_accum", "max_length", "checkpoint_every", "log_every"):
            _positive(f"{key}.{name}", getattr(self, name))
        _positive(f"{key}.max_failures", self.max_failures, zero_ok=True)
        self.lora.validate(f"{key}.lora")


@dataclass
class SFTConfig:
    # One (prompt, completion) file trained on as it is, instead of the SL-CAI mix below.
    data: Optional[str] = None
    # SL-CAI: revisions (None: the generate stage's sft.parquet) mixed with helpful rows (None:
    # the generate stage's helpful.parquet; or a file / samples:helpful_sft), with this share of
    # helpful rows: 0 = revisions only, 1 = helpful only.
    revisions: Optional[str] = None
    helpful: Optional[str] = None  # Helpful rows of the mix (see revisions above).
    helpful_ratio: float = 0.5  # Share of helpful rows in the mix: 0 revisions only, 1 helpful only.
    lr: float = 2e-4  # Learning rate.
    epochs: int = 1  # Passes over the data.
    # Stop after this many optimizer steps (-1: run the epochs).
    max_steps: int = -1
    merge: bool = False  # Also write the base model with the adapter merged in.

    def inputs(self) -> dict[str, Optional[str]]:
        """{config key: source} the SFT stage reads; None stands for the generate stage's output."""
        if self.data:
            return {"sft.data": self.data}
        wanted: dict[str, Optional[str]] = {}
        if self.helpful_ratio < 1:
            wanted["sft.revisions"] = self.revisions
        if self.helpful_ratio > 0:
            wanted["sft.helpful"] = self.helpful
        return wanted

    def validate(self, key: str = "sft") -> None:
        _fraction(f"{key}.helpful_ratio", self.helpful_ratio)
        if self.data and (self.revisions or self.helpful):
            raise ConfigError(f"{key}.data replaces the SL-CAI mix; set either {key}.data or "
                              f"{key}.revisions/{key}.helpful, not both")
        _positive(f"{key}.lr", self.lr)
        _positive(f"{key}.epochs", self.epochs)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{key}.max_steps={self.max_steps} must be > 0, or -1 to run the epochs")


@dataclass
class DPOConfig:
    # (prompt, chosen, rejected[, label]) rows; None means the pairs named by ``pairs``.
    data: Optional[str] = None
    # Without dpo.data: "revisions" (generate's revision > initial, label 1.0), "feedback"
    # (the label stage's AI-feedback pairs, soft labels) or "both" (concatenated).
    pairs: str = "revisions"
    # The frozen reference/starting policy; None means the sft stage's adapter.
    sft_adapter: Optional[str] = None
    loss: str = "sigmoid"  # sigmoid (DPO), ipo or soft (DPO on the pairs' soft labels).
    beta: float = 0.1  # DPO beta: how far the policy may move from the reference.
    lr: float = 5e-5  # Learning rate.
    epochs: int = 1  # Passes over the pairs.
    max_steps: int = -1  # Stop after this many optimizer steps (-1: run the epochs).
    merge: bool = False  # Also write the base model with the adapters merged in.

    def validate(self, key: str = "dpo") -> None:
        _choice(f"{key}.loss", self.loss, ("sigmoid", "ipo", "soft"))
        _choice(f"{key}.pairs", self.pairs, ("revisions", "feedback", "both"))
        _positive(f"{key}.beta", self.beta)
        _positive(f"{key}.lr", self.lr)
        _positive(f"{key}.epochs", self.epochs)
        if self.max_steps == 0 or self.max_steps < -1:
            raise ConfigError(f"{key}.max_steps={self.max_steps} must be > 0, or -1 to run the epochs")


@dataclass
class LabelConfig:
    """RL-CAI: two policy samples per harm prompt, labelled by a base feedback model."""

    # Comparison questions come from this constitution; None means generate.constitution.
    constitution: Optional[str] = None
    # The policy sampled (on-policy for DPO): None means the DPO reference, i.e.
    # dpo.sft_adapter if set, else the sft stage's output; or a PEFT / model folder.
    policy: Optional[str] = None
    # The feedback model: None is the base model (model.path), "sft" the SL-CAI policy
    # (base + SFT adapter), anything else a model folder used with feedback_role.
    feedback: Optional[str] = None
    feedback_role: str = "base"  # Role of a feedback model folder; only base is allowed.
    # Worked comparisons before each question (k).
    few_shot: int = 2
    # [lo, hi] bounds for the soft label, e.g. [0.4, 0.6]; None keeps the probability.
    clamp: Optional[list[float]] = None
    # Pairs whose averaged probability lies within this of 0.5 are dropped.
    margin: float = 0.0
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    actors: int = 1  # Engine actors labelling in parallel.
    num_cpus_per_actor: float = 1.0  # CPUs each actor requests.
    num_gpus_per_actor: float = 0.0  # GPUs each actor requests.
    batch_size: int = 16  # Rows per batch sent to an actor.
    max_error_rate: float = 0.05  # The job fails only when more rows than this fraction end as errors.
    # Score the check pairs first (a child run), so every set of labels comes with the
    # feedback model's measured accuracy; `label --check` runs only that.
    check: bool = True
    # Extra (prompt, chosen, rejected) jsonl files for the check, beside the shipped set.
    check_data: list[str] = field(default_factory=list)
    # Placement per actor on top of CPUs/GPUs, as in generate.resources / generate.labels.
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # Ray node label selector for the actors.

    def validate(self, key: str = "label") -> None:
        _choice(f"{key}.feedback_role", self.feedback_role, ("base", "instruct"))
        if self.feedback_role == "instruct":
            raise ConfigError(f"{key}.feedback_role=instruct is refused: no instruct model enters the "
                              f"training data; use a base model or {key}.feedback=sft")
        if self.feedback == "":
            raise ConfigError(f"{key}.feedback is empty; leave it unset (base model), or set sft or a folder")
        _positive(f"{key}.few_shot", self.few_shot, zero_ok=True)
        if self.clamp is not None:
            if len(self.clamp) != 2 or not 0 <= self.clamp[0] <= 0.5 <= self.clamp[1] <= 1 \
                    or self.clamp[0] == self.clamp[1]:
                raise ConfigError(f"{key}.clamp={list(self.clamp)} must be [lo, hi] with "
                                  f"0 <= lo <= 0.5 <= hi <= 1 and lo < hi, e.g. [0.4, 0.6]")
        if not 0 <= self.margin < 0.5:
            raise ConfigError(f"{key}.margin={self.margin} must lie in [0, 0.5)")
        for name in ("actors", "batch_size"):
            _positive(f"{key}.{name}", getattr(self, name))
        _positive(f"{key}.num_gpus_per_actor", self.num_gpus_per_actor, zero_ok=True)
        _fraction(f"{key}.max_error_rate", self.max_error_rate)
        self.sampling.validate(f"{key}.sampling")
        _placement(key, self.resources, self.labels, f"{key}.num_cpus_per_actor", f"{key}.num_gpus_per_actor")
