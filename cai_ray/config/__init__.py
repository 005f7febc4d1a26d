"""Typed configuration: dataclass defaults <- YAML <- ``key=value`` overrides.

Defaults live only in these dataclasses.  A YAML file and command-line
overrides are merged onto them with OmegaConf structured configs, so unknown
keys and wrong types fail at load time, and ``validate()`` then checks values
and cross-field rules.  Every failure is a ``ConfigError`` whose message is one
line naming the key and the fix.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cai_ray.config.checks import ConfigError, _positive, check_engine_units
from cai_ray.config.evaluation import (EVAL_FORMATS, EVAL_KINDS, ArmConfig, EstimateConfig, EvalSetConfig,
                                      EvaluateConfig, FailureLimits, IterateConfig, JudgeConfig, SweepConfig,
                                      evaluate_defaults, expand_shorthand)
from cai_ray.config.inference import (HH_TRAIN_SUBSETS, PURPOSES, DataConfig, EngineConfig, GenerateConfig,
                                     ModelConfig, QualityConfig, SamplingConfig, subset_purpose)
from cai_ray.config.training import DPOConfig, LabelConfig, LoraConfig, SFTConfig, TrainConfig

# The sections live in submodules; everything is imported from here.
__all__ = ["STAGES", "ConfigError", "ModelConfig", "EngineConfig", "SamplingConfig", "PURPOSES", "HH_TRAIN_SUBSETS",
           "subset_purpose", "DataConfig", "QualityConfig", "GenerateConfig", "LoraConfig", "TrainConfig",
           "SFTConfig", "DPOConfig", "LabelConfig", "JudgeConfig", "EVAL_KINDS", "EVAL_FORMATS", "EvalSetConfig",
           "ArmConfig", "FailureLimits", "EvaluateConfig", "IterateConfig", "SweepConfig", "EstimateConfig",
           "TrackingConfig", "RuntimeConfig", "Config", "load_config", "to_dict", "to_yaml", "STAGE_SECTIONS",
           "RESOURCE_KEYS", "stage_hash", "stage_folder"]

STAGES = ("generate", "sft", "dpo", "evaluate")


@dataclass
class TrackingConfig:
    enabled: bool = True  # Record runs in MLflow (false: nothing is recorded).
    # None means sqlite:///{output_dir}/mlflow.db; on a cluster, the MLflow server on the
    # head (jobs/mlflow_server.sh), e.g. http://HEAD_IP:5000.
    uri: Optional[str] = None
    experiment: str = "cai_ray"  # MLflow experiment name.
    # Where a new experiment keeps its artifacts.  None: {output_dir}/mlartifacts for a local
    # store, the server's own artifact destination for an http(s) tracking server.
    artifact_root: Optional[str] = None
    # A failed tracking call is retried this many times with backoff (0.5 s, 1 s, 2 s, ...);
    # if it still fails, its points are dropped and counted, never failing the work, and
    # calls in the next pause_s seconds are dropped at once before the store is tried again.
    retries: int = 4
    pause_s: float = 30.0  # Seconds calls are dropped after a failed call (see retries).

    def validate(self, key: str = "tracking") -> None:
        if not self.experiment:
            raise ConfigError(f"{key}.experiment is empty; name the MLflow experiment")
        _positive(f"{key}.retries", self.retries, zero_ok=True)
        _positive(f"{key}.pause_s", self.pause_s, zero_ok=True)


@dataclass
class RuntimeConfig:
    # None: RAY_ADDRESS if set (also inside a Ray Job), else a private local Ray.
    address: Optional[str] = None
    num_cpus: Optional[int] = None  # Local Ray only: CPUs it may use (None: all).
    num_gpus: Optional[int] = None  # Local Ray only: GPUs it may use (None: all).
    # Local Ray only: keep every Ray port on 127.0.0.1.
    loopback: bool = True
    # Local Ray only: its session folder (None: a short path under the system temp dir).
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
    # SIGTERM (`ray job stop`, a preempted node): each stage stops at its next safe point and the
    # command exits within this many seconds, killed hard if cleanup takes longer.
    stop_timeout_s: float = 60.0
    # A stage folder's lock (cai_ray/locks.py) is refreshed every lock_lease_s / 4; a holder on
    # another host that has not refreshed it for lock_lease_s is taken to be gone.
    lock_lease_s: float = 120.0

    def validate(self, key: str = "runtime") -> None:
        if self.num_cpus is not None:
            _positive(f"{key}.num_cpus", self.num_cpus)
        _positive(f"{key}.placement_timeout_s", self.placement_timeout_s, zero_ok=True)
        _positive(f"{key}.stop_timeout_s", self.stop_timeout_s)
        _positive(f"{key}.lock_lease_s", self.lock_lease_s)


@dataclass
class Config:
    name: str = "cai_ray"  # Run name: prefixes the MLflow run names (NAME-generate, NAME-sft, ...).
    output_dir: str = "outputs"  # Folder for every stage folder, logs and the local MLflow store.
    seed: int = 0  # Seed for the training data order and sampling; part of every stage hash.
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
        check_engine_units(self)
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
            raise ConfigError(f"config file {p} " + ("is a folder; give a YAML file" if p.is_dir() else "does not exist"))
        try:
            layers.append(OmegaConf.load(p))
        except Exception as exc:  # yaml syntax errors carry multi-line context
            raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not key=value (e.g. generate.rounds=3)")
    try:
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers[1:]:
            expand_shorthand(layer)
        merged = OmegaConf.merge(*layers)
        evaluate_defaults(merged, layers[1:])
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
    # Traces record the verdicts for people to review, and which requests choose (iterate's stop
    # rule) changes no rating: neither changes an evaluation's numbers.
    "evaluate": ("trace", "review_sample", "selection_share"),
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


def _upstream(cfg: Config, kind: str, arms: dict | None, items: list) -> tuple[str, ...]:
    """What a stage reads from outside its own sections: the stages before it (by hash or
    folder name) and what the config names by reference (content, paths, resolved arms)."""
    if kind in ("sft", "dpo"):
        upstream = []
        reads_generate = None in cfg.sft.inputs().values() if kind == "sft" else cfg.dpo.data is None
        if reads_generate:
            upstream.append(f"generate:{stage_hash(cfg, 'generate')}")
        if kind == "dpo" and cfg.dpo.sft_adapter is None:
            upstream.append(f"sft:{stage_folder(cfg, 'sft').name}")
        return tuple(upstream)
    if kind == "label":  # the constitution's content and the policy (a folder, or the sft output)
        from cai_ray.constitution import load_constitution

        constitution = load_constitution(cfg.label.constitution or cfg.generate.constitution)
        policy = cfg.label.policy or cfg.dpo.sft_adapter
        return (f"constitution:{constitution.hash}",
                f"policy:{Path(policy).expanduser().resolve()}" if policy else f"sft:{stage_folder(cfg, 'sft').name}")
    if kind == "evaluate":  # the quality screen, each resolved arm's adapter and its content, the request ids
        return (json.dumps(asdict(cfg.generate.quality), sort_keys=True),
                *(f"{n}:{a['adapter']}:{a['adapter_sha256']}" for n, a in (arms or {}).items()),
                hashlib.sha256("\n".join(sorted(f"{r['set']}:{r['id']}" for r in items)).encode()).hexdigest())
    return ()


def _check_key(cfg: Config, rows: list[dict]) -> str:
    """What decides a judge check's outcome: the judge's model, engine and sampling, and the rows."""
    j = cfg.judge
    decided = {"model": asdict(j.model), "engine": {k: v for k, v in asdict(j.engine).items() if k != "batch_size"},
               "sampling": asdict(j.sampling), "harm_rubric": j.harm_rubric, "min_accuracy": j.min_accuracy,
               "rows": [[r["id"], r["verdict"], r["label"], r["request"], r["response"]] for r in rows]}
    return hashlib.sha256(json.dumps(decided, sort_keys=True).encode()).hexdigest()[:12]


def stage_folder(cfg: Config, kind: str, *, arms: dict | None = None, items: list = (), rows: list = (),
                 pairs_sha256: str | None = None) -> Path:
    """The one place a stage's folder is named: ``{output_dir}/{kind}/{hash}``.

    generate, sft, dpo, label: the config alone.  evaluate: also its resolved ``arms`` and the
    ``items`` rated.  judge-check: the check ``rows``.  sweep: its pair file, by the generate
    hash for revision pairs, else by ``pairs_sha256`` (the file's sha256).
    """
    if kind == "judge-check":
        return cfg.output_root / kind / _check_key(cfg, list(rows))
    if kind == "sweep":
        name = stage_hash(cfg, "generate") if cfg.dpo.pairs == "revisions" else f"{cfg.dpo.pairs}-{pairs_sha256[:12]}"
        return cfg.output_root / kind / name
    return cfg.output_root / kind / stage_hash(cfg, kind, _upstream(cfg, kind, arms, list(items)))
