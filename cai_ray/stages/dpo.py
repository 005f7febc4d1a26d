"""DPO (sigmoid, IPO or soft labels) with the frozen SFT policy as reference, on Ray Train + DeepSpeed."""

from __future__ import annotations

from pathlib import Path

from cai_ray.config import Config, stage_folder
from cai_ray.tracking import Store
from cai_ray.train.sources import dpo_source, fingerprint, read_dpo
from cai_ray.train.driver import finished, run_training, summary
from cai_ray.train.lora import is_adapter, weights_sha256


def sft_policy(cfg: Config) -> str:
    """The SFT policy DPO starts from and keeps as its reference; never the raw base by default."""
    if cfg.dpo.sft_adapter:
        path = Path(cfg.dpo.sft_adapter).expanduser()
        if not (is_adapter(path) or (path / "config.json").is_file()):
            raise ValueError(f"dpo.sft_adapter={cfg.dpo.sft_adapter}: not a PEFT adapter folder "
                             f"(adapter_config.json) nor a model folder (config.json)")
        return str(path.resolve())
    sft = stage_folder(cfg, "sft")
    for name in ("adapter", "merged"):
        if (sft / name / "adapter_config.json").is_file() or (sft / name / "config.json").is_file():
            return str(sft / name)
    raise ValueError(f"dpo.sft_adapter is unset and the sft stage has no output at {sft}; run "
                     f"`cai-ray sft` with this config first, or set dpo.sft_adapter=FOLDER")


def run(cfg: Config, store: Store) -> dict:
    out = stage_folder(cfg, "dpo")
    start = sft_policy(cfg)
    source = dpo_source(cfg)
    reference = {"policy": start, "weights_sha256": weights_sha256(start),
                 "how": "SFT policy merged into the base; reference log-probs computed once, before "
                        "training, with the DPO adapter disabled" if cfg.train.lora.enabled else
                        "SFT policy; reference log-probs computed once from the starting weights"}
    inputs = {"data": source, "data_sha256": fingerprint(source),
              "reference": start, "reference_sha256": reference["weights_sha256"]}
    done = finished(out, inputs)
    if done is not None:
        store.set_tags({"skipped": "complete output for this config", "stage_dir": out})
        return summary(done, skipped=True)
    manifest = run_training(cfg, store, "dpo", read_dpo(cfg), out, inputs, start=start,
                            extra={"reference": reference})
    return summary(manifest, skipped=False)
