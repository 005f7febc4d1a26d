"""DeepSpeed: the config dict, and starting an engine inside a Ray Train worker.

Choices, and why (measured on CPU, see PROBE.md):
- the optimizer is DeepSpeed's AdamW with ``torch_adam: true``: FusedAdam and
  CPUAdam JIT-compile on first use (~50 s each) for no gain at these sizes;
- the learning rate decays linearly to 0 over the run with no warmup (TRL's
  default), through a client ``LambdaLR`` DeepSpeed steps at each optimizer step;
- gradients are clipped at 1.0 (TRL's default max_grad_norm);
- DeepSpeed joins the process group Ray Train already made (gloo on CPU,
  nccl on GPU) instead of starting its own;
- DeepSpeed's shared-memory allreduce is not built: it is only used when its own
  launcher sets ``LOCAL_SIZE`` (Ray Train does not) and only for inference
  all-reduce, yet building it costs 20-30 s on a fresh machine.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

from cai_ray.config import TrainConfig


def ds_config(train: TrainConfig, lr: float) -> dict:
    """The DeepSpeed config for one run (batch sizes are per worker; DeepSpeed derives the total)."""
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage == 3:
        # Full weights are gathered only when asked for (adapter export), never on every save.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": train.precision == "bf16"},
        "fp16": {"enabled": train.precision == "fp16"},
        "optimizer": {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.0, "torch_adam": True}},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


def start_engine(model: torch.nn.Module, train: TrainConfig, lr: float, total_steps: int):
    """A DeepSpeed engine over the trainable parameters, in the current (Ray Train) process group."""
    import deepspeed
    import deepspeed.ops

    # No shm allreduce build (see the module notes).  The probe fills this dict once per
    # process and every later lookup reads the same dict, so the edit holds.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if train.use_gpu else "gloo")

    def schedule(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=ds_config(train, lr), lr_scheduler=schedule,
                                           dist_init_required=False)
    return engine


@contextmanager
def gathered(engine, params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full values of ``params`` on every rank for the block: a collective under ZeRO-3, a no-op otherwise."""
    if engine.zero_optimization_stage() != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield
