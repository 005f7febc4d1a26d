"""Inference engines behind one protocol, chosen by ``engine.backend``.

Backends are named as "module:Class" and imported only when asked for, so the
hf path never imports vLLM (``cai_ray.engines.vllm`` is the only module that does).
"""

from __future__ import annotations

import dataclasses
import importlib

from cai_ray.config import EngineConfig, ModelConfig
from cai_ray.engines.base import FINISH_REASONS, Completion, Engine

BACKENDS = {
    "hf": "cai_ray.engines.hf:HFEngine",
    "vllm": "cai_ray.engines.vllm:VLLMEngine",
}


def make_engine(model: ModelConfig, engine: EngineConfig, *, lora: bool = True, share: float | None = None,
                engines: int = 1) -> Engine:
    """An engine of ``engine.backend`` for ``model``, sized for the actor or replica holding it.

    ``lora=False``: this engine never serves an adapter, so vLLM starts without LoRA (no LoRA
    bookkeeping per step, and scoring needs no care about adapter slots).  ``share``: the GPUs
    the actor/replica requests (``num_gpus``), ``engines``: how many engines it starts on them.
    A fraction of a GPU, or several engines on one, each get that share of
    ``gpu_memory_utilization``: vLLM sizes its KV cache from the fraction given, and refuses to
    start when less than that is free, so two engines at 0.85 of one GPU never both start.
    """
    target = BACKENDS.get(engine.backend)
    if target is None:
        raise ValueError(f"engine.backend={engine.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    engine = dataclasses.replace(engine, max_lora_rank=engine.max_lora_rank if lora else 0,
                                 gpu_memory_utilization=gpu_share(engine, share, engines))
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(model, engine)


def gpu_share(engine: EngineConfig, gpus: float | None, engines: int = 1) -> float:
    """``engine.gpu_memory_utilization`` for one of ``engines`` engines on ``gpus`` GPUs (None:
    one whole GPU per tensor-parallel rank)."""
    per_rank = 1.0 if not gpus else min(1.0, gpus / engine.tensor_parallel_size)
    return engine.gpu_memory_utilization * per_rank / max(1, engines)


__all__ = ["BACKENDS", "FINISH_REASONS", "Completion", "Engine", "gpu_share", "make_engine"]
