"""ConfigError and the value checks every section's ``validate()`` uses."""

from __future__ import annotations

from typing import Any


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


def check_engine_units(cfg: Any) -> None:
    """Every engine against the actors or replicas that hold it: a CUDA engine needs a GPU
    there, and tensor parallelism needs a whole GPU per rank (one line naming both keys)."""
    units = [("engine", cfg.engine, "generate.num_gpus_per_actor", cfg.generate.num_gpus_per_actor,
              "generate actors (generate, evaluate arms)")]
    if cfg.dpo.pairs != "revisions":  # the label stage runs only for AI-feedback pairs
        units.append(("engine", cfg.engine, "label.num_gpus_per_actor", cfg.label.num_gpus_per_actor,
                      "label actors"))
    if cfg.judge.model.path:
        units.append(("judge.engine", cfg.judge.engine, "judge.num_gpus", cfg.judge.num_gpus, "judge replicas"))
    for key, engine, gpu_key, gpus, where in units:
        tp = engine.tensor_parallel_size
        if engine.device == "cuda" and not gpus:
            raise ConfigError(f"{key}.device=cuda but the {where} request no GPU ({gpu_key}=0); set "
                              f"{gpu_key}={tp} or {key}.device=auto")
        if tp > 1 and gpus < tp:
            raise ConfigError(f"{key}.tensor_parallel_size={tp} needs {tp} GPUs on each of the {where}, "
                              f"which request {gpus:g} ({gpu_key}); set {gpu_key}={tp} or lower "
                              f"{key}.tensor_parallel_size")
