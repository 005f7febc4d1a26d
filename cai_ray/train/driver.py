"""The driver side of a training stage: check inputs, run Ray Train, publish the outputs.

Order matters: every input is read, checked and tokenised before Ray Train
starts a worker, so bad input is one line from the driver, not a worker
traceback.  A stage folder is complete when its ``manifest.json`` exists: the
manifest is written last, and adapters and models are moved into place whole.

Run names: Ray Train resumes silently when a run name and storage path are
reused, so every fresh run gets a new name (stage hash + time + random
suffix), recorded in ``ray_run.json`` in the stage folder; ``train.resume=true``
reuses the recorded name, and Ray Train restores that run's latest checkpoint.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from cai_ray import console
from cai_ray.config import Config, to_yaml
from cai_ray.files import write_atomic
from cai_ray.locks import hold
from cai_ray.tracking import Store

MANIFEST = "manifest.json"
RUN_STATE = "ray_run.json"
# Test hook: "RANK:STEP:MARKER" makes that rank die after that step, once.
FAIL_ONCE_ENV = "CAI_RAY_FAIL_ONCE"


def finished(out: Path, inputs: dict) -> Optional[dict]:
    """The manifest of a complete earlier run with the same config and input files, else None."""
    path = out / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    outputs = [p for p in manifest["paths"].values() if p]
    if manifest.get("config_hash") != out.name or manifest.get("inputs") != inputs:
        return None
    return manifest if all(Path(p).exists() for p in outputs) else None


def summary(manifest: dict, skipped: bool) -> dict:
    """The few lines the CLI prints; ``output`` is the stage folder, as every stage returns it."""
    return {"output": manifest["paths"]["stage_dir"], "adapter": manifest["paths"]["adapter"],
            "merged": manifest["paths"]["merged"], "steps": manifest["steps"],
            "final_loss": manifest["final_loss"], "tokens_per_s": manifest["tokens_per_s"],
            "skipped": skipped}


def _run_name(cfg: Config, kind: str, out: Path) -> tuple[str, str]:
    """(Ray Train run name, storage path): the recorded pair when resuming, else a new name."""
    state = out / RUN_STATE
    recorded = json.loads(state.read_text()) if state.is_file() else {}
    # A run stopped by SIGTERM (preemption, `ray job stop`) is continued without asking.
    if recorded and (cfg.train.resume or recorded.get("stopped")):
        from cai_ray.train.loops import latest_state, world_size_mismatch

        # Checked before any worker starts: the folder fixes the global batch, not its split.
        latest = latest_state(recorded["storage_path"], recorded["name"])
        error = latest and world_size_mismatch(latest, cfg.train.workers)
        if error:
            raise ValueError(f"{kind}: {error}, or remove {state} to start over")
        return recorded["name"], recorded["storage_path"]
    name = f"{kind}-{out.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    write_atomic(state, json.dumps({"name": name, "storage_path": str(cfg.storage_path)}) + "\n")
    return name, str(cfg.storage_path)


def fit(cfg: Config, job: Any, out: Path):
    """Run the job on Ray Train; returns (Result, run name, start-up timings)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cai_ray.runtime import placement
    from cai_ray.train.loops import train_loop

    train = cfg.train
    name, storage = _run_name(cfg, job.kind, out)
    unit = placement("train", train)  # CPU/GPU + train.resources, train.labels; fails if no node has them
    trainer = TorchTrainer(
        train_loop, train_loop_config={"job": job},
        scaling_config=ScalingConfig(num_workers=train.workers, use_gpu=train.use_gpu,
                                     resources_per_worker={"CPU": train.cpus_per_worker, **unit.bundle()},
                                     label_selector=unit.labels or None),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)))
    started = time.time()
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # SIGTERM (runtime.Stopped) or Ctrl-C: the last checkpoint is the safe point
        write_atomic(out / RUN_STATE, json.dumps({"name": name, "storage_path": storage, "stopped": True}) + "\n")
        raise
    except Exception as exc:
        raise RuntimeError(f"{job.kind}: Ray Train run {name} failed after {train.max_failures} "
                           f"retries; {_failure_line(exc)} (worker logs: CAI_RAY_DEBUG=1 or the Ray "
                           f"session logs)") from exc
    # Seconds from fit() to: the loop starting on rank 0 (workers up, imports done), the
    # engine ready (model + DeepSpeed + DPO reference pass), the first step done.
    startup = {key[:-3]: round(result.metrics[key] - started, 2)
               for key in ("loop_entered_at", "engine_ready_at", "first_step_at") if key in result.metrics}
    return result, name, startup


def _check_merge_room(cfg: Config) -> None:
    """On the private local Ray, fail before training when no node can hold the merge task
    (``plan.merge_request``); an attached cluster may still add such a node, so there the task waits."""
    from cai_ray.plan import check, merge_request
    from cai_ray.runtime import live_nodes

    if cfg.runtime.address or os.environ.get("RAY_ADDRESS"):
        return
    problem = check(merge_request(cfg), live_nodes())
    if problem:
        raise RuntimeError(problem)


def _failure_line(exc: BaseException) -> str:
    """Each failing rank's last error line (the exception itself, not Ray's preamble); a rank that
    died shows up next to the ranks whose collectives then broke."""
    failures = sorted((getattr(exc, "worker_failures", None) or {}).items()) or [(None, exc)]
    parts = []
    for rank, cause in failures:
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
        last = (lines[-1] if lines else type(cause).__name__)[:200]
        parts.append(f"rank {rank}: {last}" if rank is not None else last)
    return "; ".join(parts)


def _install(src: Path, dest: Path) -> None:
    """Copy a folder into place whole: a reader sees the old folder or the new one, never half."""
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    shutil.copytree(src, tmp)
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
        os.replace(dest, old)
        shutil.rmtree(old)
    os.replace(tmp, dest)


def publish(cfg: Config, kind: str, out: Path, checkpoint: Path, tokenizer, model_path: str,
            start: Optional[str]) -> dict[str, Optional[str]]:
    """Adapter (and merged model on request) from the final checkpoint into the stage folder."""
    from cai_ray.train.lora import combine_adapters, is_adapter, merge_task, train_dtype

    merge = cfg.sft.merge if kind == "sft" else cfg.dpo.merge
    paths: dict[str, Optional[str]] = {"stage_dir": str(out), "adapter": None, "merged": None}
    staging = out / f".staging-{secrets.token_hex(4)}"
    staging.mkdir(parents=True)
    try:
        if not cfg.train.lora.enabled:
            shutil.copytree(checkpoint / "model", staging / "merged")
            tokenizer.save_pretrained(staging / "merged")
        else:
            adapter = checkpoint / "adapter"
            if start and is_adapter(start):
                # DPO trained on base + SFT adapter: export both as one adapter on the base.
                combine_adapters(cfg.model, model_path, start, str(adapter), staging / "adapter",
                                 dtype=train_dtype(cfg.train))
            else:
                shutil.copytree(adapter, staging / "adapter")
            if merge:
                base = start if start and not is_adapter(start) else model_path
                merge_task(cfg.model, base, str(staging / "adapter"), staging / "merged", tokenizer)
        for name in ("adapter", "merged"):
            if (staging / name).exists():
                _install(staging / name, out / name)
                paths[name] = str(out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return paths


def write_outputs(cfg: Config, out: Path, manifest: dict, store: Store) -> None:
    """config.yaml and the manifest (last: it marks the folder complete), and both to MLflow."""
    write_atomic(out / "config.yaml", to_yaml(cfg))
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
    if manifest["paths"]["adapter"]:
        store.log_artifact(manifest["paths"]["adapter"], "adapter")
    store.log_artifact(out / MANIFEST)
    store.log_artifact(out / "config.yaml")


def run_training(cfg: Config, store: Store, kind: str, rows: list[dict], out: Path, inputs: dict,
                 start: Optional[str] = None, extra: Optional[dict] = None) -> dict:
    """Check the model, tokenise, train on Ray, publish; returns the manifest.

    ``start`` is the SFT policy DPO starts from and uses as its reference: a PEFT
    adapter folder (merged into the base) or a full model folder.
    """
    with hold(out, cfg.runtime.lock_lease_s):
        return _run_training(cfg, store, kind, rows, out, inputs, start, extra)


def _run_training(cfg: Config, store: Store, kind: str, rows: list[dict], out: Path, inputs: dict,
                  start: Optional[str], extra: Optional[dict]) -> dict:
    import ray

    from cai_ray.engines.base import resolve_model_path
    from cai_ray.runtime import init_ray
    from cai_ray.train.data import tokenize, total_steps
    from cai_ray.train.lora import check_targets, is_adapter, load_tokenizer, read_adapter
    from cai_ray.train.loops import Job

    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(cfg.model, model_path)
    base = start if start and not is_adapter(start) else model_path
    if cfg.train.lora.enabled:
        check_targets(cfg.model, base, cfg.train.lora.target_modules)
    if start and is_adapter(start):
        read_adapter(start)  # the export combines it with the trained adapter: fail now, not after training
    data = tokenize(tokenizer, rows, kind, cfg.train.max_length)
    (out / MANIFEST).unlink(missing_ok=True)
    init_ray(cfg)
    section = cfg.sft if kind == "sft" else cfg.dpo
    if cfg.train.lora.enabled and section.merge:
        _check_merge_room(cfg)
    steps = total_steps(len(data), cfg.train, cfg.train.workers, section.epochs, section.max_steps)
    counter = console.remote_counter()
    job = Job(kind=kind, cfg=cfg, model_path=model_path, data=ray.put(data), total_steps=steps,
              pad_id=tokenizer.pad_token_id, lr=section.lr, start=start, store=store,
              fail_once=os.environ.get(FAIL_ONCE_ENV), progress=counter)
    with console.progress(kind, total=steps, unit="steps", poll=lambda: ray.get(counter.get.remote(), timeout=5)):
        result, name, startup = fit(cfg, job, out)
    ray.kill(counter)
    store.set_tags({"ray_run": name})
    with result.checkpoint.as_directory() as folder:
        paths = publish(cfg, kind, out, Path(folder), tokenizer, model_path, start)
    metrics = result.metrics
    manifest = {
        "stage": kind, "config_hash": out.name, "inputs": inputs, "data": data.stats,
        "steps": metrics["step"], "final_loss": metrics.get("loss"), "tokens": metrics["tokens_seen"],
        "tokens_per_s": metrics["attempt_tokens_per_s"],
        "train_seconds": metrics["train_seconds"], "startup_s": startup,
        "resumed_from_step": metrics["resumed_from"],
        "final_metrics": {k: v for k, v in metrics.items() if "/" in k or k in ("loss", "lr")},
        "base_model": base if paths["adapter"] else None, "mlflow_run_id": store.run_id,
        "ray_run": {"name": name, "checkpoint": result.checkpoint.path},
        "paths": paths, **(extra or {}),
    }
    write_outputs(cfg, out, manifest, store)
    return manifest
