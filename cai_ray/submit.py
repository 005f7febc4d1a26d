"""Ray Jobs: submit a cai_ray command to a cluster and manage the jobs.

The job runs ``python -m cai_ray STAGE CONFIG key=value ...`` on the cluster
with this repository as its working directory, so the cluster runs exactly the
code and configs you have here.  Inside a job Ray sets ``RAY_ADDRESS`` and
``runtime.init_ray`` attaches to the cluster instead of starting one.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Never upload these: environments, outputs and caches can be gigabytes.
EXCLUDES = [".venv", "outputs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info"]
# Environment forwarded from the submitting shell when set there.
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def extra_requirements(extras: list[str]) -> list[str]:
    """The pip requirements of this project's optional extras, read from pyproject.toml."""
    import tomllib

    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise ValueError(f"--extras {','.join(unknown)}: unknown extra; choose from {', '.join(optional)}")
    return [req for e in extras for req in optional[e]]


def build_job(command: str, config: str, overrides: list[str], extras: list[str]) -> dict:
    """Entry point and runtime environment for one job (no network; testable)."""
    config_path = Path(config).resolve()
    if not config_path.is_file():
        raise FileNotFoundError(f"config file {config} does not exist")
    try:
        rel = config_path.relative_to(ROOT)
    except ValueError:
        raise ValueError(f"config {config} is outside {ROOT}; the job can only see files in the "
                         f"repository it uploads") from None
    entry = " ".join(shlex.quote(p) for p in ["python", "-m", "cai_ray", command, str(rel), *overrides])
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_TRAIN_ENABLE_PRINT_PATCH="0", TOKENIZERS_PARALLELISM="false")
    runtime_env: dict = {"working_dir": str(ROOT), "excludes": EXCLUDES, "env_vars": env}
    requirements = extra_requirements(extras)
    if requirements:
        runtime_env["pip"] = requirements
    return {"entrypoint": entry, "runtime_env": runtime_env}


def _auth_headers() -> dict[str, str]:
    """Ray 2.60 clusters want a token by default; send the one this machine holds, if any.

    Passed as a header rather than by setting RAY_AUTH_MODE, which would leak into every Ray
    this process starts later.
    """
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")).expanduser()
    if not token and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or "http://127.0.0.1:8265"
    try:
        return JobSubmissionClient(address, headers=_auth_headers())
    except ConnectionError:
        raise RuntimeError(f"no Ray Jobs API at {address}; start the cluster or forward its "
                           f"dashboard (ray dashboard cluster.yaml) and pass --address") from None


def submit(address: str | None, command: str, config: str, overrides: list[str], extras: list[str],
           wait: bool) -> int:
    import importlib.util

    from cai_ray.config import load_config

    stage = f"cai_ray.stages.{command.replace('-', '_')}"
    if command not in ("run", "sweep") and importlib.util.find_spec(stage) is None:
        raise ValueError(f"--command {command}: no such cai-ray command (see cai-ray --help)")
    load_config(config, overrides).require(command)  # fail here, not minutes later on the cluster
    job = build_job(command, config, overrides, extras)
    jobs = client(address)
    job_id = _submit_when_ready(jobs, job, {"cai_ray_command": command, "config": config})
    print(f"submitted {job_id}: {job['entrypoint']}", flush=True)
    if not wait:
        return 0
    return follow(jobs, job_id)


def _submit_when_ready(jobs, job: dict, metadata: dict, wait_s: float = 120.0) -> str:
    """Submit, waiting while a just-started head has no job agent yet (Ray answers 500 then)."""
    deadline = time.time() + wait_s
    while True:
        try:
            return jobs.submit_job(**job, metadata=metadata)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)


def follow(jobs, job_id: str, poll_s: float = 2.0) -> int:
    """Stream the job's logs until it ends; the exit code says how it ended.

    Ray's log tail (a websocket) sends each new chunk once; only if it breaks before the job
    ends do we fall back to polling, which downloads the whole log each time."""
    import asyncio

    shown = 0

    async def tail():
        nonlocal shown
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            shown += len(chunk)

    try:
        asyncio.run(tail())
        broken = False
    except RuntimeError:  # closed unexpectedly (a dashboard restart, a dropped tunnel)
        broken = True
    while True:
        status = str(jobs.get_job_status(job_id)).split(".")[-1]
        if broken:
            logs = jobs.get_job_logs(job_id)
            sys.stdout.write(logs[shown:])
            sys.stdout.flush()
            shown = len(logs)
        if status in TERMINAL:
            print(f"job {job_id}: {status}")
            return 0 if status == "SUCCEEDED" else 1
        time.sleep(poll_s)


def manage(action: str, job_id: str | None, address: str | None) -> int:
    if action != "list" and not job_id:
        raise ValueError(f"jobs {action} needs a JOB_ID (see: cai-ray jobs list)")
    jobs = client(address)
    if action == "list":
        for info in jobs.list_jobs():
            print(f"{info.submission_id}\t{info.status}\t{info.entrypoint}")
        return 0
    if action == "status":
        print(jobs.get_job_status(job_id))
    elif action == "logs":
        print(jobs.get_job_logs(job_id), end="")
    elif action == "stop":
        print(f"stop requested: {jobs.stop_job(job_id)}")
    return 0


def submit_main(argv: list[str]) -> int:
    """``cai-ray submit CONFIG [key=value ...] --address URL``."""
    import argparse

    parser = argparse.ArgumentParser(prog="cai-ray submit",
                                     description="Submit a cai_ray command to a Ray cluster as a Ray Job.")
    parser.add_argument("config", metavar="CONFIG")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--address", help="Jobs API, e.g. http://127.0.0.1:8265 (default: "
                        "$RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    parser.add_argument("--command", default="run",
                        help="the cai-ray command the job runs (default: run, the whole pipeline)")
    parser.add_argument("--extras", default="", help="comma-separated extras of this project to "
                        "pip-install in the job's environment, e.g. vllm")
    parser.add_argument("--no-wait", action="store_true", help="return after submitting")
    args = parser.parse_args(argv)
    extras = [e for e in args.extras.split(",") if e]
    return submit(args.address, args.command, args.config, args.overrides, extras, not args.no_wait)


def jobs_main(argv: list[str]) -> int:
    """``cai-ray jobs list|status|logs|stop [JOB_ID] --address URL``."""
    import argparse

    parser = argparse.ArgumentParser(prog="cai-ray jobs", description="Manage Ray Jobs on a cluster.")
    parser.add_argument("action", choices=["list", "status", "logs", "stop"])
    parser.add_argument("job_id", nargs="?")
    parser.add_argument("--address", help="Jobs API address (as for submit)")
    args = parser.parse_args(argv)
    return manage(args.action, args.job_id, args.address)
