"""The per-worker training loop that Ray Train runs on every rank (SFT and DPO).

Each rank builds the same model (same seed), wraps it in DeepSpeed and walks
the shared ``Schedule``.  Only rank 0 logs to MLflow, every ``log_every`` steps
after one all-reduce of the window's sums, and the loop reports to Ray Train
only with a checkpoint: ``ray.train.report`` is a barrier of about 2 s.

The loop talks to its launcher only through a ``WorkerContext`` (context.py),
so it runs without Ray too.  Devices: batches go to the engine's device (where
DeepSpeed put the weights), the all-reduced sums to the process group's device
(``ctx.device``: NCCL takes CUDA tensors only); the model trains in train mode,
which gradient checkpointing needs to engage.

DPO reference log-probs are computed once, before the first step and before
any checkpoint is loaded, with the adapter disabled (LoRA) or from the
untouched starting weights (full fine-tuning): the reference is the frozen SFT
policy and cannot drift, and each step then needs one forward pass, not two.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from cai_ray.config import Config
from cai_ray.train.context import WorkerContext
from cai_ray.train.data import Schedule, TrainSet, collate
from cai_ray.train.losses import dpo_loss, dpo_metrics, sequence_logps, sft_loss

STATE = "state.json"
DS_TAG = "ds"


@dataclass
class Job:
    """Everything a worker needs; pickled into ``train_loop_config``."""

    kind: str                 # "sft" | "dpo"
    cfg: Config
    model_path: str
    data: Any                 # ObjectRef of a TrainSet
    total_steps: int
    pad_id: int
    lr: float
    start: Optional[str]      # SFT policy DPO starts from (adapter or model folder)
    store: Any                # MlflowStore or NullStore; used on rank 0 only
    fail_once: Optional[str]  # "RANK:STEP:MARKER" test hook (CAI_RAY_FAIL_ONCE)
    progress: Any = None      # console.remote_counter(): rank 0 sets the step, the driver's bar polls it


def _logits(engine, batch: dict) -> torch.Tensor:
    # No KV cache: training never decodes, and the cache would hold every layer's keys and values.
    return engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def _forward_logps(engine, batch: dict) -> torch.Tensor:
    return sequence_logps(_logits(engine, batch), batch["labels"])


def micro_batch(engine, data: TrainSet, schedule: Schedule, step: int, micro: int, rank: int,
                job: Job) -> dict:
    """This rank's micro-batch, on the engine's device (collate builds it on the CPU)."""
    batch = collate(data, schedule.micro_batch(step, micro, rank), job.pad_id)
    return {k: v.to(engine.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def reference_logps(engine, data: TrainSet, schedule: Schedule, steps: range, rank: int, job: Job) -> dict:
    """(step, micro) -> reference log-probs of [chosen..., rejected...] for this rank's batches."""
    module = engine.module
    no_adapter = module.disable_adapter() if job.cfg.train.lora.enabled else nullcontext()
    out = {}
    module.eval()
    with torch.no_grad(), no_adapter:
        for step in steps:
            for micro in range(job.cfg.train.grad_accum):
                out[step, micro] = _forward_logps(engine, micro_batch(engine, data, schedule, step, micro,
                                                                      rank, job))
    module.train()
    return out


def _halves(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rows.  Slices, not chunk(): on the lazy-tensor device the tests use,
    chunk's outputs and gradients come back on the CPU."""
    return rows[:len(rows) // 2], rows[len(rows) // 2:]


def _dpo_micro(engine, batch: dict, ref: torch.Tensor, job: Job) -> tuple[torch.Tensor, dict]:
    policy_c, policy_r = _halves(_forward_logps(engine, batch))
    ref_c, ref_r = _halves(ref)
    kwargs: dict = {}
    if job.cfg.dpo.loss == "soft":
        kwargs["labels"] = batch["pref"]
    if job.cfg.dpo.loss == "ipo":
        # TRL's IPO averages each side's log-ratio over its completion tokens.
        counts = (batch["labels"][:, 1:] != -100).sum(-1).float()
        kwargs["chosen_lengths"], kwargs["rejected_lengths"] = _halves(counts)
    rows, chosen_r, rejected_r = dpo_loss(policy_c, policy_r, ref_c, ref_r, beta=job.cfg.dpo.beta,
                                          loss_type=job.cfg.dpo.loss, **kwargs)
    return rows.mean(), dpo_metrics(rows, chosen_r, rejected_r, policy_c, policy_r)


def train_step(engine, data: TrainSet, schedule: Schedule, step: int, rank: int, job: Job,
               ref: Optional[dict]) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns this rank's sums."""
    sums: dict[str, float] = {}
    if job.kind == "sft":
        # Each micro-batch's share of the step's label tokens (DeepSpeed averages over micro-batches
        # and ranks): the gradient is the token mean of the global batch, whatever its split.
        share = data.label_tokens(schedule.global_batch(step)) / (schedule.grad_accum * schedule.world)
    for micro in range(job.cfg.train.grad_accum):
        batch = micro_batch(engine, data, schedule, step, micro, rank, job)
        if job.kind == "sft":
            loss = sft_loss(_logits(engine, batch), batch["labels"], n_tokens=share)
            metrics = {"loss": loss.item()}
        else:
            loss, metrics = _dpo_micro(engine, batch, ref[step, micro], job)
        engine.backward(loss)
        engine.step()
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
        sums["tokens"] = sums.get("tokens", 0.0) + float(batch["attention_mask"].sum())
    sums["micro_batches"] = float(job.cfg.train.grad_accum)
    return sums


def window_means(window: list[dict[str, float]], seconds: float,
                 device: torch.device) -> tuple[dict[str, float], float]:
    """Means over the steps of a logging window and over all ranks (one all-reduce on ``device``,
    the process group's), and its tokens."""
    import torch.distributed as dist

    keys = sorted(window[0])
    totals = torch.tensor([sum(w[k] for w in window) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(totals)
    summed = dict(zip(keys, totals.tolist()))
    n = summed.pop("micro_batches")
    tokens = summed.pop("tokens")
    means = {k: v / n for k, v in summed.items()}
    means["tokens_per_s"] = tokens / max(seconds, 1e-9)
    return means, tokens


def save_checkpoint(engine, state: dict, metrics: dict, job: Job, ctx: WorkerContext) -> None:
    """Every rank writes its DeepSpeed shard into its own temp dir; the launcher merges them."""
    with tempfile.TemporaryDirectory() as tmp:
        # With LoRA the frozen base is the same on every start: keep it out of the checkpoint.
        engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=job.cfg.train.lora.enabled)
        if ctx.rank == 0:
            (Path(tmp) / STATE).write_text(json.dumps(state))
        ctx.report({**metrics, **state}, tmp)


def restored_state(ctx: WorkerContext) -> dict:
    """The restored checkpoint's state (``step``, ``final``, ``tokens_seen``, ``world_size``), or a
    fresh start's.  The driver checks the world size before starting workers (driver._run_name);
    this catches a checkpoint it could not see."""
    with ctx.restore() as folder:
        if folder is None:
            return {"step": 0, "final": False, "tokens_seen": 0.0, "world_size": ctx.world}
        state = json.loads((Path(folder) / STATE).read_text())
    error = world_size_mismatch(state, ctx.world)
    if error:
        raise ValueError(error)
    return {**state, "world_size": ctx.world}


def world_size_mismatch(state: dict, world: int) -> Optional[str]:
    """One line when ``state``'s checkpoint cannot resume on ``world`` workers, else None.

    ZeRO saves optimizer state (and under ZeRO-3 the weights) as one shard per
    rank, and DeepSpeed here cannot reshard them (see README); a final
    checkpoint is never loaded, so it resumes anywhere.
    """
    saved = state.get("world_size", world)  # checkpoints from before world_size was recorded
    if state["final"] or saved == world:
        return None
    return (f"train.workers={world}: the checkpoint to resume (step {state['step']}) was written by "
            f"{saved} workers, and its ZeRO shards cannot be loaded on another world size; resume with "
            f"train.workers={saved} (same global batch)")


def latest_state(storage: str, run: str) -> Optional[dict]:
    """``state.json`` of the newest checkpoint (highest step) Ray Train holds for ``run``, if any."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage)  # a local absolute path or a cloud URI
    states = []
    for info in fs.get_file_info(pafs.FileSelector(f"{root}/{run}", allow_not_found=True)):
        if info.type == pafs.FileType.Directory and info.base_name.startswith("checkpoint_"):
            try:
                with fs.open_input_stream(f"{info.path}/{STATE}") as fh:
                    states.append(json.loads(fh.read()))
            except FileNotFoundError:
                continue  # a checkpoint still being written
    return max(states, key=lambda state: state["step"], default=None)


def load_checkpoint(engine, job: Job, ctx: WorkerContext) -> None:
    with ctx.restore() as folder:
        engine.load_checkpoint(folder, tag=DS_TAG, load_module_strict=not job.cfg.train.lora.enabled)


def export(engine, job: Job, state: dict, metrics: dict, ctx: WorkerContext) -> None:
    """The final report: the adapter (LoRA) or the whole model, gathered under ZeRO-3, saved by rank 0."""
    from cai_ray.train.deepspeed import gathered

    module = engine.module
    lora = job.cfg.train.lora.enabled
    params = [p for p in module.parameters() if p.requires_grad] if lora else list(module.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        with gathered(engine, params):
            if ctx.rank == 0 and lora:
                # The adapter's tensors through host memory: safetensors writes from the CPU only.
                adapter = {k: v.detach().cpu() for k, v in module.state_dict().items() if "lora_" in k}
                module.save_pretrained(Path(tmp) / "adapter", safe_serialization=True, state_dict=adapter)
            elif ctx.rank == 0:
                module.save_pretrained(Path(tmp) / "model", safe_serialization=True)
        if ctx.rank == 0:
            (Path(tmp) / STATE).write_text(json.dumps(state))
        ctx.report({**metrics, **state}, tmp)


def _maybe_fail(job: Job, rank: int, step: int) -> None:
    """Test hook: rank R dies right after step S, once (the marker file remembers it fired)."""
    if not job.fail_once:
        return
    want_rank, want_step, marker = job.fail_once.split(":", 2)
    if rank == int(want_rank) and step == int(want_step) and not os.path.exists(marker):
        Path(marker).write_text(f"rank {rank} failed after step {step}\n")
        # Ray Train's controller collects reports at its health-check interval; a worker
        # dying sooner after a report loses that checkpoint, and tests check the exact step.
        time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0)
        os._exit(1)


def train_loop(config: dict) -> None:
    """Ray Train entry point, one call per worker."""
    import ray

    from cai_ray.train.context import ray_context

    entered_at = time.time()
    job: Job = config["job"]
    run_worker(ray_context(), job, ray.get(job.data), entered_at=entered_at)


def run_worker(ctx: WorkerContext, job: Job, data: TrainSet, make_engine: Optional[Callable] = None,
               entered_at: Optional[float] = None) -> None:
    """One worker's whole run under any launcher; ``make_engine(model, train, lr, total_steps)``
    defaults to DeepSpeed (``bench/gpu_check.py`` passes the plain torch engine where it is absent)."""
    from cai_ray.tracking import NullStore
    from cai_ray.train.lora import load_policy, train_dtype

    if make_engine is None:
        from cai_ray.train.deepspeed import start_engine as make_engine
    entered_at = entered_at or time.time()
    train = job.cfg.train
    store = job.store if ctx.rank == 0 else NullStore()
    state = restored_state(ctx)
    if state["final"]:
        return
    torch.manual_seed(job.cfg.seed)  # the same fresh adapter on every rank
    model = load_policy(job.cfg.model, job.model_path, train.lora, job.start, train.gradient_checkpointing,
                        dtype=train_dtype(train))
    engine = make_engine(model, train, job.lr, job.total_steps)
    engine.module.train()  # from_pretrained returns an eval-mode model; checkpointing needs training mode
    schedule = Schedule(len(data), train.batch_size, train.grad_accum, ctx.world, job.cfg.seed)
    steps = range(state["step"], job.total_steps)
    ref = reference_logps(engine, data, schedule, steps, ctx.rank, job) if job.kind == "dpo" else None
    if state["step"]:
        load_checkpoint(engine, job, ctx)
    marks = {"loop_entered_at": entered_at, "engine_ready_at": time.time()}
    _run_steps(engine, data, schedule, steps, ctx, job, ref, store, state, marks)


def _run_steps(engine, data, schedule, steps: range, ctx: WorkerContext, job: Job, ref, store, state: dict,
               marks: dict) -> None:
    train, rank = job.cfg.train, ctx.rank
    window, metrics = [], {}
    tick = started = time.time()
    first_step_at, tokens_at_start = None, state["tokens_seen"]
    for step in steps:
        window.append(train_step(engine, data, schedule, step, rank, job, ref))
        first_step_at = first_step_at or time.time()
        state = {**state, "step": step + 1}
        checkpoint = state["step"] % train.checkpoint_every == 0 and state["step"] < job.total_steps
        # A checkpoint closes the window too, so its token count is exact on restore.
        if checkpoint or state["step"] % train.log_every == 0 or state["step"] == job.total_steps:
            metrics, tokens = window_means(window, time.time() - tick, ctx.device)
            state["tokens_seen"] += tokens
            metrics.update(lr=engine.get_lr()[0], tokens_seen=state["tokens_seen"])
            store.log_metrics(metrics, step=state["step"])
            window, tick = [], time.time()
        if checkpoint:
            save_checkpoint(engine, state, metrics, job, ctx)
        if rank == 0 and job.progress is not None:
            job.progress.set.remote(state["step"])
        _maybe_fail(job, rank, state["step"])
    seconds = time.time() - started
    timing = {**marks, "train_seconds": seconds, "first_step_at": first_step_at or time.time(),
              "resumed_from": steps.start,
              "attempt_tokens_per_s": (state["tokens_seen"] - tokens_at_start) / max(seconds, 1e-9)}
    export(engine, job, {**state, "final": True}, {**metrics, **timing}, ctx)
