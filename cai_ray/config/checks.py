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
