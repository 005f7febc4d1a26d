"""SFT then DPO on GPUs: nccl, bf16, ZeRO-3, one worker per visible GPU (at most 2).

Skipped without CUDA.  The CPU suite (tests/integration/test_train.py) covers the
same code paths with gloo; this checks the GPU-only settings end to end.
"""

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sft_then_dpo_on_gpus_with_bf16_and_zero3(tmp_path, tiny_base):
    import mlflow

    from cai_ray.config import load_config
    from cai_ray.runtime import init_ray
    from cai_ray.stages import dpo, sft
    from cai_ray.tracking import open_store

    gpus = min(2, torch.cuda.device_count())
    pairs = [{"prompt": "\n\nHuman: say hello\n\nAssistant:", "chosen": " Hello, friend!", "rejected": " No."},
             {"prompt": "\n\nHuman: name a colour\n\nAssistant:", "chosen": " Blue.", "rejected": " Go away."}] * 4
    cfg = load_config(None, [
        f"model.path={tiny_base}", f"output_dir={tmp_path / 'out'}", f"runtime.num_gpus={gpus}",
        "runtime.num_cpus=4", "sft.data=samples:helpful_sft", "sft.max_steps=6",
        f"dpo.data={_write_jsonl(tmp_path / 'pairs.jsonl', pairs)}", "dpo.max_steps=4", "dpo.lr=0.01",
        f"train.workers={gpus}", "train.use_gpu=true", "train.precision=bf16", "train.zero_stage=3",
        "train.checkpoint_every=3", "train.log_every=1", "train.batch_size=2"])
    init_ray(cfg)
    sft_summary = sft.run(cfg, open_store(cfg, "gpu-sft"))
    assert sft_summary["steps"] == 6 and Path(sft_summary["adapter"], "adapter_model.safetensors").is_file()
    store = open_store(cfg, "gpu-dpo")
    dpo_summary = dpo.run(cfg, store)
    assert dpo_summary["steps"] == 4
    history = mlflow.MlflowClient(cfg.tracking_uri).get_metric_history(store.run_id, "loss")
    first = min(history, key=lambda m: m.step)
    assert first.step == 1 and first.value == pytest.approx(math.log(2), abs=1e-2)
