"""A plain PyTorch training engine with the surface of DeepSpeed's that the loop uses.

For machines without DeepSpeed (``bench/gpu_check.py`` on a bare GPU box) and
for devices DeepSpeed does not know.  It does what ``deepspeed.ds_config`` asks
of DeepSpeed at ZeRO stage 0: AdamW, gradient clipping at 1.0, the loss divided
by ``grad_accum`` and the optimizer stepped every ``grad_accum`` micro-batches,
gradients averaged over the ranks of the default process group (one all-reduce
per trainable tensor), the linear learning-rate decay.  It trains the weights
in the dtype they were loaded in (a LoRA adapter stays float32 under peft;
full fine-tuning in bf16 would update bf16 weights: use DeepSpeed for that).
"""

from __future__ import annotations

from pathlib import Path

import torch

from cai_ray.config import TrainConfig


class TorchEngine:
    def __init__(self, model: torch.nn.Module, train: TrainConfig, lr: float, total_steps: int,
                 device: torch.device):
        self.module = model.to(device)
        self.device = torch.device(device)
        self.grad_accum = train.grad_accum
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: max(0.0, 1 - step / total_steps))
        self.micro = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> None:
        import torch.distributed as dist

        self.micro += 1
        if self.micro % self.grad_accum:
            return
        if dist.is_available() and dist.is_initialized():
            for p in self.params:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= dist.get_world_size()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "lazy":
            import torch._lazy as lazy

            lazy.mark_step()  # cut the traced graph once per step, as XLA-style devices need

    def get_lr(self) -> list[float]:
        return self.scheduler.get_last_lr()

    def zero_optimization_stage(self) -> int:
        return 0

    def _state_path(self, folder: str, tag: str) -> Path:
        import torch.distributed as dist

        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        return Path(folder) / tag / f"torch_engine_rank{rank}.pt"

    def save_checkpoint(self, folder: str, tag: str, exclude_frozen_parameters: bool = True) -> None:
        trained = {n: p.detach().cpu() for n, p in self.module.named_parameters()
                   if p.requires_grad or not exclude_frozen_parameters}
        path = self._state_path(folder, tag)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params": trained, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "micro": self.micro}, path)

    def load_checkpoint(self, folder: str, tag: str, load_module_strict: bool = True) -> None:
        state = torch.load(self._state_path(folder, tag), map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["params"], strict=load_module_strict)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.micro = state["micro"]


def start_torch_engine(device: torch.device):
    """A ``make_engine`` for ``loops.run_worker`` that places the model on ``device``."""
    def make(model, train: TrainConfig, lr: float, total_steps: int) -> TorchEngine:
        return TorchEngine(model, train, lr, total_steps, device)
    return make
