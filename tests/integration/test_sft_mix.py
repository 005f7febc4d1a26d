"""SL-CAI: the sft stage on a mix of revisions and helpful rows, through the real CLI, Ray Train and MLflow."""

import json
import subprocess
import sys

import mlflow

from tests.helpers import ROOT, jsonl

PROMPT = "\n\nHuman: {}\n\nAssistant:"


def _cli(tmp_path, model, *overrides):
    revisions = jsonl(tmp_path / "revisions.jsonl", [
        {"prompt": PROMPT.format(f"be rude to person {i}"), "completion": f" I'd rather be kind to person {i}."}
        for i in range(6)])
    args = [f"model.path={model}", f"output_dir={tmp_path / 'out'}", "runtime.num_cpus=2", "train.workers=1",
            "train.batch_size=2", "train.checkpoint_every=2", "train.log_every=1", "sft.max_steps=2",
            f"sft.revisions={revisions}", "sft.helpful=samples:helpful_sft", "tracking.experiment=sft-mix",
            *overrides]
    return subprocess.run([sys.executable, "-m", "cai_ray", "sft", "configs/quickstart.yaml", *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=900)


def test_mix_ratio_outside_the_unit_interval_is_one_line_and_writes_nothing(tmp_path, tiny_base):
    done = _cli(tmp_path, tiny_base, "sft.helpful_ratio=1.5")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "cai-ray: error: sft.helpful_ratio=1.5 must lie in [0, 1]"]
    assert not (tmp_path / "out").exists()


def test_sft_trains_on_the_mix_and_records_its_composition(tmp_path, tiny_base):
    done = _cli(tmp_path, tiny_base, "sft.helpful_ratio=0.25")
    assert done.returncode == 0, done.stderr[-3000:]
    (folder,) = (tmp_path / "out" / "sft").iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    mix = manifest["mix"]
    # 6 revisions at a 0.25 helpful share: 2 of the 40 shipped helpful rows, drawn with the seed.
    assert (mix["rows"], mix["helpful_share"]) == (8, 0.25)
    assert {k: (v["available"], v["used"]) for k, v in mix["sources"].items()} == {
        "sft.revisions": (6, 6), "sft.helpful": (40, 2)}
    assert manifest["data"]["rows"] == 8 and manifest["inputs"]["helpful_ratio"] == 0.25
    assert set(manifest["inputs"]["data_sha256"]) == {"sft.revisions", "sft.helpful"}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}")
    run = client.get_run(manifest["mlflow_run_id"])
    assert run.data.params["sft.mix.helpful_ratio"] == "0.25"
    assert run.data.params["sft.mix.helpful"] == "samples:helpful_sft"
    assert run.data.metrics["mix/helpful_used"] == 2 and run.data.metrics["mix/revisions_used"] == 6
    # The same config again is the finished stage; another ratio is another stage folder.
    again = _cli(tmp_path, tiny_base, "sft.helpful_ratio=0.25")
    assert again.returncode == 0 and "skipped: True" in again.stdout
    from cai_ray.config import load_config, stage_folder

    other = load_config(ROOT / "configs/quickstart.yaml", [f"model.path={tiny_base}", f"output_dir={tmp_path / 'out'}",
                                                           "sft.helpful_ratio=0.5", "sft.helpful=samples:helpful_sft",
                                                           f"sft.revisions={tmp_path / 'revisions.jsonl'}"])
    assert stage_folder(other, "sft") != folder
