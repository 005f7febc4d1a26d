"""Start a private local Ray, or attach to a cluster, with safe defaults.

Local Ray 2.60 binds every interface and advertises the machine's external
address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set in the driver and
in the workers' environment; with it, every port stays on 127.0.0.1 (which also
keeps torch.distributed's MASTER_ADDR on loopback).  Workers do not inherit the
driver's MLflow URI or offline flags, so we pass them in ``runtime_env``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from cai_ray import console

# Settings from PROBE.md that every Ray process of ours should see.
BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_HOST_IP": "127.0.0.1"}


def cluster_address(cfg: Any) -> str | None:
    """The cluster to attach to: config, then RAY_ADDRESS (set inside Ray Jobs), else None."""
    return cfg.runtime.address or os.environ.get("RAY_ADDRESS") or None


def worker_env(cfg: Any, local: bool) -> dict[str, str]:
    """Environment for every Ray worker of a run.

    Online hub access is kept only when the user's shell explicitly allows it
    (HF_HUB_OFFLINE=0), so tests and the quickstart can never download.
    """
    env = dict(BASE_ENV)
    if os.environ.get("HF_HUB_OFFLINE") == "0":
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env[key] = "0"
    if local and cfg.runtime.loopback:
        env.update(LOOPBACK_ENV)
    if cfg.tracking.enabled:
        env["MLFLOW_TRACKING_URI"] = cfg.tracking_uri
    return env


def _temp_dir(cfg: Any) -> str:
    # Ray's socket paths must stay under ~107 bytes, so the default lives in
    # /tmp with a short name derived from the output folder.
    if cfg.runtime.temp_dir:
        return str(Path(cfg.runtime.temp_dir).expanduser().resolve())
    tag = hashlib.sha1(str(cfg.output_root).encode()).hexdigest()[:8]
    return os.path.join(tempfile.gettempdir(), f"cairay-{tag}")


def init_ray(cfg: Any, **overrides: Any) -> dict[str, str]:
    """Connect this process to Ray; returns the worker environment it installed.

    Idempotent: if Ray is already initialised, nothing changes.
    """
    address = cluster_address(cfg)
    env = worker_env(cfg, local=address is None)
    # The driver needs the same settings as the workers, before ray starts.
    for key, value in env.items():
        os.environ.setdefault(key, value)
    import ray
    from ray._private import ray_constants

    if env.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
        # Ray reads this flag once, at import; when something imported ray
        # before us, the driver's copy must be corrected by hand or the local
        # node binds every interface.
        ray_constants.ENABLE_RAY_CLUSTER = False
    if ray.is_initialized():
        return env
    runtime_env = {"env_vars": env}
    if address is not None:
        # Inside a Ray Job the job's runtime_env is merged with ours; the job's
        # keeps its working_dir and pip, ours adds the workers' environment.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, **overrides)
        console.route_worker_output()
        return env
    kwargs: dict[str, Any] = dict(address="local", num_cpus=cfg.runtime.num_cpus,
                                  num_gpus=cfg.runtime.num_gpus, _temp_dir=_temp_dir(cfg),
                                  runtime_env=runtime_env, include_dashboard=False)
    if cfg.runtime.loopback:
        kwargs["_node_ip_address"] = "127.0.0.1"
    kwargs.update(overrides)
    ray.init(**kwargs)
    # Worker output still reaches this process (log_to_driver), but into the command's log file.
    console.route_worker_output()
    return env
