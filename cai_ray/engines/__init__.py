"""Inference engines behind one protocol, chosen by ``engine.backend``.

Backends are named as "module:Class" and imported only when asked for, so the
hf path never imports vLLM (``cai_ray.engines.vllm`` is the only module that does).
"""

from __future__ import annotations

import importlib

from cai_ray.config import EngineConfig, ModelConfig
from cai_ray.engines.base import FINISH_REASONS, Completion, Engine

BACKENDS = {
    "hf": "cai_ray.engines.hf:HFEngine",
    "vllm": "cai_ray.engines.vllm:VLLMEngine",
}


def make_engine(model: ModelConfig, engine: EngineConfig) -> Engine:
    target = BACKENDS.get(engine.backend)
    if target is None:
        raise ValueError(f"engine.backend={engine.backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)(model, engine)


__all__ = ["BACKENDS", "FINISH_REASONS", "Completion", "Engine", "make_engine"]
