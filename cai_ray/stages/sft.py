"""Supervised fine-tuning on (prompt, completion) rows with Ray Train + DeepSpeed (LoRA or full)."""

from __future__ import annotations

from cai_ray.config import Config
from cai_ray.tracking import Store
from cai_ray.train.data import fingerprint, read_sft, sft_source
from cai_ray.train.driver import finished, output_dir, run_training, summary


def run(cfg: Config, store: Store) -> dict:
    out = output_dir(cfg, "sft")
    source = sft_source(cfg)
    inputs = {"data": source, "data_sha256": fingerprint(source)}
    done = finished(out, inputs)
    if done is not None:
        store.set_tags({"skipped": "complete output for this config", "stage_dir": out})
        return summary(done, skipped=True)
    manifest = run_training(cfg, store, "sft", read_sft(cfg), out, inputs)
    return summary(manifest, skipped=False)
