"""Sections for the model, the engine, sampling, the prompts and the generate stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import MISSING

from cai_ray.config.checks import ConfigError, _choice, _fraction, _placement, _positive


@dataclass
class ModelConfig:
    # Hub id or local folder in Hugging Face layout.
    path: str = MISSING
    # "base" models get the few-shot Human/Assistant format, "instruct" models
    # their own chat template: the format follows the role, never a guess.
    role: str = "base"
    dtype: str = "float32"  # Weights dtype when loading: float32, bfloat16, float16 or auto.
    revision: Optional[str] = None  # Hub revision (branch, tag or commit); None: the default branch.
    trust_remote_code: bool = False  # Run the model repo's own Python code; off unless the model needs it.

    def validate(self, key: str = "model") -> None:
        if not self.path:
            raise ConfigError(f"{key}.path is empty; set it to a hub id or a local model folder")
        _choice(f"{key}.role", self.role, ("base", "instruct"))
        _choice(f"{key}.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))


@dataclass
class EngineConfig:
    backend: str = "hf"  # Inference engine: hf (transformers, CPU or GPU) or vllm.
    device: str = "auto"  # auto, cpu or cuda.
    batch_size: int = 16  # Rows per engine call.
    # Reuse computed prompt KV: vLLM's automatic prefix caching; in the hf backend the
    # few-shot prefix a batch shares, and prompts extending the previous call's.
    enable_prefix_caching: bool = True
    # vLLM only; ignored by the hf backend.
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85  # vLLM only: share of GPU memory vLLM may take, in (0, 1].
    enforce_eager: bool = False  # vLLM only: no CUDA graphs (always eager on CPU).
    max_model_len: Optional[int] = None  # vLLM only: context length; None: the model's.
    # vLLM only: the largest LoRA rank it loads; the DPO adapter needs (1 + iterate.iterations) x train.lora.r.
    max_lora_rank: int = 16
    # vLLM only: hand the callers' per-row seeds (chains, feedback samples, evaluate arms) to
    # its sampler, so a row samples the same text whichever rows share its batch, as far as
    # vLLM goes: exactly on CPU; on GPUs batch composition still changes the numerics unless
    # vLLM's batch-invariant mode is on, while seeded requests leave its batched (FlashInfer)
    # sampler.  false: rows draw from the engine's one generator.  The hf backend always seeds rows.
    per_row_seeds: bool = True
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
    temperature: float = 0.7  # Sampling temperature; 0 is greedy.
    top_p: float = 1.0  # Nucleus sampling share, in (0, 1].
    max_new_tokens: int = 128  # Most tokens generated per reply; longer replies are cut (truncated).
    min_new_tokens: int = 0  # Fewest tokens generated before a stop may end a reply.
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
    split: str = "train"  # Dataset split to read (folders and hub ids).
    # Column holding the prompt; "chosen" with layout=hh-rlhf.
    field: str = "prompt"
    layout: str = "plain"  # plain (one prompt column) or hh-rlhf (a dialogue; the prompt is cut from it).
    # hh-rlhf only: the first Human turn, or every turn up to the last Assistant.
    hh_mode: str = "first_turn"
    limit: Optional[int] = None  # Keep the first N prompts (after dedupe); None: all.
    dedupe: bool = True  # Drop prompts whose id repeats, keeping the first.
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
    constitution: str = "default"  # Principles for critiques and revisions: default (shipped) or a YAML file.
    # Number of few-shot examples before each prompt (k).
    few_shot: int = 2
    # Benign demonstrations before each helpful-purpose prompt.
    helpful_few_shot: int = 2
    rounds: int = 1  # Critique/revision rounds per harm prompt.
    actors: int = 1  # Engine actors generating in parallel.
    num_cpus_per_actor: float = 1.0  # CPUs each actor requests.
    num_gpus_per_actor: float = 0.0  # GPUs each actor requests.
    # Placement on a cluster, on top of CPUs/GPUs: custom resources each actor requests
    # (e.g. {generate: 1}) and a Ray node label selector (e.g. {node-group: gen}).
    # evaluate's arm generation runs with these settings too.
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)  # Ray node label selector for the actors (see resources).
    batch_size: int = 16  # Rows per batch sent to an actor.
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
