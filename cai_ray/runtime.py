"""What a run needs from its environment: Ray (local or a cluster), placement, hub access.

Local Ray 2.60 binds every interface and advertises the machine's external
address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set in the driver and
in the workers' environment; with it, every port stays on 127.0.0.1 (which also
keeps torch.distributed's MASTER_ADDR on loopback).  Workers do not inherit the
driver's MLflow URI or hub settings, so we pass them in ``runtime_env``.

Placement: each stage's units (actors, train workers, judge replicas) request
CPUs/GPUs plus the custom resources and node labels its config section names.
Before a stage starts them, ``placement`` checks that the cluster can hold them
all, waiting up to ``runtime.placement_timeout_s`` for an autoscaler, so a
resource no node offers ends in one line instead of a stage waiting forever.

Preemption: ``ray job stop`` and a node being reclaimed send the driver SIGTERM.
``stop_on_sigterm`` turns it into ``Stopped`` in the driver's main thread, wherever the
stage is: every part, checkpoint and manifest is written to a temp name and renamed, so any
point is a safe one (a temp file a stop cuts short is deleted).  A watchdog ends the process
after ``runtime.stop_timeout_s`` if cleanup (Ray shutdown, MLflow) hangs.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cai_ray import console
from cai_ray.plan import NodeType, Request, check, request

# Settings from PROBE.md that every Ray process of ours should see.
BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "PYTHONWARNINGS": "ignore::DeprecationWarning",
}
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VLLM_HOST_IP": "127.0.0.1"}
OFFLINE_KEYS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
OFFLINE_ENV = {key: "1" for key in OFFLINE_KEYS}
# Hub credentials and cache location, forwarded to workers when the driver has them.
# HF_TOKEN then travels in the runtime_env, which the Ray dashboard shows to its users.
HUB_FORWARD = ("HF_TOKEN", "HF_HOME", "HF_HUB_CACHE", "HF_ENDPOINT")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

# Set by init_ray: whether this process attached to a cluster, and how long placement waits.
_session = {"attached": False, "timeout_s": 0.0}


def cluster_address(cfg: Any) -> str | None:
    """The cluster to attach to: config, then RAY_ADDRESS (set inside Ray Jobs), else None."""
    return cfg.runtime.address or os.environ.get("RAY_ADDRESS") or None


# ---------------------------------------------------------------- hub access


def hub_offline(cfg: Any) -> bool:
    if cfg.runtime.offline is not None:
        return cfg.runtime.offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_env(cfg: Any) -> dict[str, str]:
    """Offline flags set both ways (explicit), plus the driver's hub credentials and cache."""
    flag = "1" if hub_offline(cfg) else "0"
    env = {key: flag for key in OFFLINE_KEYS}
    env.update({key: os.environ[key] for key in HUB_FORWARD if os.environ.get(key)})
    return env


def apply_hub_env(cfg: Any) -> None:
    """The driver follows the same hub setting as its workers."""
    os.environ.update(hub_env(cfg))
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # read once at import; a later change needs the module updated too
        constants.HF_HUB_OFFLINE = hub_offline(cfg)


def _models(cfg: Any, command: str) -> list[tuple[str, Any]]:
    """(config key, ModelConfig) of every model the command loads."""
    from cai_ray.config import ModelConfig

    every = command in ("run", "sweep")
    out = [("model.path", cfg.model)] if command not in ("serve-judge", "judge") else []
    if every or command == "evaluate":
        out += [(f"evaluate.arms[{i}].model", ModelConfig(path=arm.model, role=arm.role))
                for i, arm in enumerate(cfg.evaluate.arms) if arm.model]
    if (every or command in ("evaluate", "serve-judge", "judge")) and cfg.judge.model.path:
        out.append(("judge.model.path", cfg.judge.model))
    label = getattr(cfg, "label", None)
    feedback = getattr(label, "feedback", None)
    if (every or command == "label") and feedback and feedback != "sft":
        out.append(("label.feedback", ModelConfig(path=feedback, role=getattr(label, "feedback_role", "base"))))
    return out


def check_model(key: str, model: Any, offline: bool) -> str:
    """A local folder with weights config and tokenizer, or a hub id that resolves; else one line."""
    path = str(model.path or "")
    local = Path(path).expanduser()
    if path.endswith(".gguf") and local.is_file():  # converted to a folder when loaded (engines/gguf.py)
        return str(local.resolve())
    if local.is_file():
        raise ValueError(f"{key}={path}: is a file; expected a model folder (config.json and a tokenizer)")
    if local.is_dir():
        if not (local / "config.json").is_file() or not any((local / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"{key}={path}: folder has no config.json or no tokenizer file; "
                             f"is it a model saved with save_pretrained?")
        return str(local.resolve())
    if path.startswith(("/", ".", "~")) or path.count("/") > 1 or not path:
        raise ValueError(f"{key}={path}: no such folder (and not a hub id like org/name)")
    return _check_hub(key, path, model.revision, offline)


def _check_hub(key: str, repo: str, revision: str | None, offline: bool) -> str:
    from huggingface_hub import HfApi, try_to_load_from_cache

    if offline:
        cached = {name for name in ("config.json", *TOKENIZER_FILES)
                  if isinstance(try_to_load_from_cache(repo, name, revision=revision), str)}
        if "config.json" not in cached or not cached & set(TOKENIZER_FILES):
            where = os.environ.get("HF_HOME", "~/.cache/huggingface")
            raise ValueError(f"{key}={repo}: hub access is off (runtime.offline / HF_HUB_OFFLINE) and its config "
                             f"or tokenizer is not in the local hub cache ({where}); download it first or set "
                             f"runtime.offline=false")
        return repo
    api = HfApi()
    try:
        api.auth_check(repo)  # gated repos: refused unless HF_TOKEN has access
        files = {s.rfilename for s in api.model_info(repo, revision=revision).siblings or []}
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes the one line below
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ValueError(f"{key}={repo}: not resolvable on the hub ({type(exc).__name__}: {reason}); check "
                         f"the id, HF_TOKEN access, the network, or set runtime.offline=true") from None
    if "config.json" not in files or not files & set(TOKENIZER_FILES):
        raise ValueError(f"{key}={repo}: the hub repo has no config.json or no tokenizer file")
    return repo


def check_folders(cfg: Any) -> None:
    """Folders a command writes in must not be files (else a traceback from deep inside Ray or MLflow)."""
    for key, given in (("output_dir", cfg.output_dir), ("runtime.storage_path", cfg.runtime.storage_path),
                       ("runtime.temp_dir", cfg.runtime.temp_dir)):
        if given and "://" not in given and Path(given).expanduser().is_file():
            raise ValueError(f"{key}={given}: is a file; expected a folder (or a path to create one at)")


def preflight(cfg: Any, command: str) -> list[str]:
    """Before any actor starts: hub setting applied, every model the command loads resolvable."""
    apply_hub_env(cfg)
    if cluster_address(cfg) is None:
        check_local_gpus(cfg, command)
    offline = hub_offline(cfg)
    return [check_model(key, model, offline) for key, model in _models(cfg, command)]


# ---------------------------------------------------------------- SIGTERM


class Stopped(KeyboardInterrupt):
    """SIGTERM arrived; a KeyboardInterrupt so libraries clean up as they do on Ctrl-C."""


_stop: dict[str, Any] = {"timeout_s": None, "at": None, "previous": None, "done": threading.Event()}
STOPPED_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended


def stop_on_sigterm(timeout_s: float) -> None:
    """Until ``restore_sigterm``, SIGTERM raises ``Stopped`` and the process exits within ``timeout_s``."""
    _stop.update(timeout_s=timeout_s, at=None, previous=signal.getsignal(signal.SIGTERM), done=threading.Event())
    _install_sigterm()


def restore_sigterm() -> None:
    """The command is over (e.g. ``main()`` called in a test process): the previous handler, no watchdog."""
    _stop["done"].set()
    if _stop["timeout_s"] is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stop["previous"] or signal.SIG_DFL)
    _stop["timeout_s"] = None


def _install_sigterm() -> None:
    # ray.init installs its own SIGTERM handler (sys.exit); init_ray calls this again after it.
    if _stop["timeout_s"] is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def _on_sigterm(signum, frame) -> None:
    if _stop["at"] is not None:
        return  # already stopping; the watchdog bounds it
    _stop["at"] = time.monotonic()
    threading.Thread(target=_watchdog, args=(_stop["timeout_s"], _stop["done"]), daemon=True,
                     name="stop-watchdog").start()
    raise Stopped("stopped by SIGTERM; rerun the same command to resume")


def _watchdog(timeout_s: float, done: threading.Event) -> None:
    if done.wait(timeout_s):
        return
    console.error(f"cai-ray: stopped by SIGTERM; cleanup took longer than runtime.stop_timeout_s={timeout_s:g}, "
                  f"exiting now; every written part is whole: rerun the same command to resume")
    os._exit(STOPPED_EXIT)


def stopping_for() -> float | None:
    """Seconds since SIGTERM arrived, or None."""
    return None if _stop["at"] is None else time.monotonic() - _stop["at"]


# ---------------------------------------------------------------- Ray


def worker_env(cfg: Any, local: bool) -> dict[str, str]:
    """Environment for every Ray worker of a run."""
    env = {**BASE_ENV, **hub_env(cfg)}
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
    apply_hub_env(cfg)
    _session.update(attached=address is not None, timeout_s=cfg.runtime.placement_timeout_s)
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
        _install_sigterm()
        console.route_worker_output()
        return env
    kwargs: dict[str, Any] = dict(address="local", num_cpus=cfg.runtime.num_cpus,
                                  num_gpus=cfg.runtime.num_gpus, _temp_dir=_temp_dir(cfg),
                                  runtime_env=runtime_env, include_dashboard=False)
    if cfg.runtime.loopback:
        kwargs["_node_ip_address"] = "127.0.0.1"
    kwargs.update(overrides)
    ray.init(**kwargs)
    _install_sigterm()
    # Worker output still reaches this process (log_to_driver), but into the command's log file.
    console.route_worker_output()
    return env


# The GPU-only settings each command uses (None: every one).
GPU_SETTINGS = {"generate": ("engine",), "label": ("engine",), "estimate": ("engine",), "sft": ("train",),
                "dpo": ("train",), "evaluate": ("engine", "judge"), "serve-judge": ("judge",)}


def check_local_gpus(cfg: Any, command: str | None = None) -> None:
    """On the private local Ray, before any actor starts: a GPU-only setting on a machine whose
    Ray has no GPU is one line naming the key (on a cluster, GPU nodes may still be added)."""
    used = GPU_SETTINGS.get(command or "", ("engine", "train", "judge"))
    if command == "estimate" and not cfg.estimate.calibrate:
        return  # estimates a GPU config on a laptop without running a model
    keys = [("train.use_gpu=true", "train" in used and cfg.train.use_gpu),
            ("engine.device=cuda", "engine" in used and cfg.engine.device == "cuda"),
            ("judge.engine.device=cuda", "judge" in used and bool(cfg.judge.model.path)
             and cfg.judge.engine.device == "cuda")]
    bad = [key for key, on in keys if on]
    if not bad:
        return
    import ray

    if ray.is_initialized():
        gpus = ray.cluster_resources().get("GPU", 0)
    elif cfg.runtime.num_gpus is not None:
        gpus = cfg.runtime.num_gpus
    else:  # what ray.init will find: Ray's own detection (CUDA_VISIBLE_DEVICES, NVML)
        from ray._private.accelerators import get_accelerator_manager_for_resource

        gpus = get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators()
    if gpus <= 0:
        raise ValueError(f"{bad[0]}: the local Ray has no GPU (runtime.num_gpus={cfg.runtime.num_gpus}); "
                         f"run on a GPU machine or cluster (runtime.address) or turn the setting off")


def live_nodes() -> list[NodeType]:
    """The alive nodes of the connected Ray, one NodeType each."""
    import ray

    return [NodeType(n["NodeID"][:8], 1, dict(n["Resources"]), dict(n.get("Labels") or {}))
            for n in ray.nodes() if n["Alive"]]


def placement(stage: str, section: Any, count: int | None = None) -> Request:
    """What one unit of ``stage`` requests (``.ray_options()``, ``.bundle()``, ``.labels``), once the
    connected Ray can hold all ``section``'s units (or ``count`` of them); else one line after
    runtime.placement_timeout_s.

    ``stage`` is generate, label, train or judge, ``section`` its config section (evaluate's arm
    generation uses ``placement("generate", cfg.generate)``).  On the private local Ray, custom
    resources and labels are dropped: they only choose between nodes, and there is one.
    """
    req = request(stage, section)
    req.count = count or req.count
    if not _session["attached"]:
        req.resources, req.labels = {}, {}
    problem = check(req, live_nodes())
    if problem is None:
        return req
    timeout = _session["timeout_s"] if _session["attached"] else 0.0
    if timeout > 0 and req.bundle():
        if _wait_for_room(req, timeout):
            return req
        problem = check(req, live_nodes()) or problem
    raise RuntimeError(f"{problem}; waited {timeout:.0f}s (runtime.placement_timeout_s)")


def _wait_for_room(req: Request, timeout: float) -> bool:
    """Ask for the units as a placement group (an autoscaler sees the demand and adds nodes),
    until the group is ready or the nodes' totals fit; the group is removed either way."""
    from ray.util.placement_group import placement_group, remove_placement_group

    selector = [dict(req.labels)] * req.count if req.labels else None
    group = placement_group([req.bundle()] * req.count, strategy="PACK", bundle_label_selector=selector)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if group.wait(max(0.1, min(5.0, deadline - time.monotonic()))):
                return True
            if check(req, live_nodes()) is None:  # room exists, held by other work for now
                return True
        return False
    finally:
        remove_placement_group(group)
