"""Supervised fine-tuning with Ray Train + DeepSpeed (LoRA or full): SL-CAI by default, i.e.
the generate stage's revisions mixed with helpful rows at ``sft.helpful_ratio``; or one
(prompt, completion) file in ``sft.data``."""

from __future__ import annotations

from cai_ray.config import Config, stage_folder
from cai_ray.tracking import Store
from cai_ray.train.sources import fingerprint, read_sft, sft_sources
from cai_ray.train.driver import finished, run_training, summary


def run(cfg: Config, store: Store) -> dict:
    out = stage_folder(cfg, "sft")
    sources = sft_sources(cfg)
    inputs = {"data": sources, "data_sha256": {key: fingerprint(source) for key, source in sources.items()},
              "helpful_ratio": cfg.sft.helpful_ratio}
    done = finished(out, inputs)
    if done is not None:
        store.set_tags({"skipped": "complete output for this config", "stage_dir": out})
        return {**summary(done, skipped=True), "mix": done.get("mix")}
    mix: dict = {}
    rows = read_sft(cfg, mix)
    _log_mix(store, mix)
    manifest = run_training(cfg, store, "sft", rows, out, inputs, extra={"mix": mix})
    return {**summary(manifest, skipped=False), "mix": mix}


def _log_mix(store: Store, mix: dict) -> None:
    """The mix's composition as MLflow params (what was asked) and metrics (what it gave)."""
    store.log_params({"sft.mix.helpful_ratio": mix["helpful_ratio"],
                      **{f"sft.mix.{key.split('.')[1]}": s["source"] for key, s in mix["sources"].items()}})
    store.log_metrics({"mix/rows": mix["rows"], "mix/helpful_share": mix["helpful_share"],
                       **{f"mix/{key.split('.')[1]}_{k}": s[k] for key, s in mix["sources"].items()
                          for k in ("available", "used")}})
