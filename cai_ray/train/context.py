"""What a training worker needs from whatever launched it: rank, world size, device,
reporting and checkpoints.

Ray Train provides all of it in production (``ray_context``).  ``LocalContext``
is the same thing over a plain ``torch.distributed`` process group, so the
per-worker loop also runs where Ray is not installed (``bench/gpu_check.py`` on
a bare GPU machine) and in unit tests.  The loop never imports Ray itself.

A checkpoint is a local folder: the loop writes every rank's files into its own
folder and hands it to ``report``; ``restore`` yields the folder of the newest
checkpoint to resume from (or None) for the duration of a ``with`` block.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional

import torch


@dataclass
class WorkerContext:
    rank: int
    world: int
    device: torch.device
    # (metrics, checkpoint folder or None); with a folder every rank must call it (Ray's barrier).
    report: Callable[[dict, Optional[str]], None]
    restore: Callable[[], ContextManager[Optional[str]]]


def ray_context() -> WorkerContext:
    """The context of the current Ray Train worker."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()

    def report(metrics: dict, folder: Optional[str]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(folder) if folder else None
        ray.train.report(metrics, checkpoint=checkpoint)

    @contextmanager
    def restore() -> Iterator[Optional[str]]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield folder

    return WorkerContext(context.get_world_rank(), context.get_world_size(), ray.train.torch.get_device(),
                         report, restore)


@dataclass
class LocalContext:
    """A ``WorkerContext`` over an initialised ``torch.distributed`` group (or none: one process).

    Checkpoints land in ``root/checkpoint_<step>``: every rank copies its folder there
    (DeepSpeed names its shards by rank, so they do not collide); reports are kept
    in ``reports``, in order, on every rank.
    """

    root: Path
    device: torch.device
    reports: list = field(default_factory=list)

    def as_worker(self) -> WorkerContext:
        import torch.distributed as dist

        ready = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        return WorkerContext(rank, world, self.device, self._report, self._restore)

    def _checkpoints(self) -> list[Path]:
        return sorted(self.root.glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))

    def _report(self, metrics: dict, folder: Optional[str]) -> None:
        dest = self.root / f"checkpoint_{int(metrics['step']):06d}" if folder else None
        if dest:
            shutil.copytree(folder, dest, dirs_exist_ok=True)
        self.reports.append({**metrics, "checkpoint": dest and str(dest)})

    @contextmanager
    def _restore(self) -> Iterator[Optional[str]]:
        found = self._checkpoints()
        yield str(found[-1]) if found else None
