"""The generate stage end to end on the tiny model, through the real CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _prompts(path: Path, n: int, long_rows: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question number {i}: how should I treat my neighbour {i}?"}) + "\n")
        for i in range(long_rows):
            f.write(json.dumps({"prompt": "please explain " * 1500 + str(i)}) + "\n")
    return path


def _args(tmp_path, model, data, *extra):
    return [f"model.path={model}", f"output_dir={tmp_path / 'out'}", f"data.source={data}",
            "runtime.num_cpus=2", "generate.rounds=1", "generate.few_shot=1", "generate.batch_size=4",
            "generate.sampling.max_new_tokens=6", "generate.sampling.min_new_tokens=2",
            "evaluate.sets=[{source: samples:red_team_eval}]", *extra]


def cai(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "cai_ray", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, **kw)


def _out(tmp_path) -> Path:
    (folder,) = (tmp_path / "out" / "generate").iterdir()
    return folder


def test_generate_writes_chains_sft_pairs_and_error_rows(tmp_path, tiny_base):
    data = _prompts(tmp_path / "p.jsonl", 10, long_rows=1)
    done = cai("generate", "configs/quickstart.yaml",
               *_args(tmp_path, tiny_base, data, "generate.actors=2", "generate.max_error_rate=0.2"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = _out(tmp_path)
    chains = pq.read_table(out / "chains").to_pylist()
    assert len(chains) == 11 and len({r["id"] for r in chains}) == 11
    long_row = [r for r in chains if r["prompt"].startswith("please explain")][0]
    assert "context" in long_row["error"] and long_row["final"] is None
    ok = [r for r in chains if not r["error"]]
    assert all(len(r["rounds"]) == 1 and r["rounds"][0]["principle_id"] for r in ok)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["errors"] == 1 and manifest["chains"] == 11
    assert manifest["sft_rows"] + manifest["rejects"] == 11
    assert set(manifest["filters"]) >= {"repeated_ngrams", "role_leak", "symbol_run"}
    pairs = pq.read_table(out / "pairs.parquet")
    assert pairs.column_names[:5] == ["prompt", "chosen", "rejected", "source", "label"]
    assert pq.read_table(out / "sft.parquet").column_names[:2] == ["prompt", "completion"]
    assert "error" in pq.read_table(out / "rejects.parquet").column("reason").to_pylist()[0] or \
        any("error" in r for r in pq.read_table(out / "rejects.parquet").column("reason").to_pylist())
    assert (out / "config.yaml").exists()
    _pairs_train_with_trl(out / "pairs.parquet", tiny_base, tmp_path)
    # Same config again: the finished stage is not redone.
    again = cai("generate", "configs/quickstart.yaml",
                *_args(tmp_path, tiny_base, data, "generate.actors=1", "generate.max_error_rate=0.2"))
    assert again.returncode == 0 and "resumed_rows" in again.stdout
    assert _out(tmp_path) == out and len(list((out / "chains").glob("part-*"))) == len(
        list((out / "chains").glob("part-*")))


def _pairs_train_with_trl(pairs: Path, model_path: str, tmp_path: Path) -> None:
    """pairs.parquet goes into TRL's DPOTrainer as it is: no renaming, no conversion."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    dataset = Dataset.from_parquet(str(pairs))
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_steps=1, per_device_train_batch_size=2,
                     report_to="none", bf16=False, save_strategy="no", logging_steps=1)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path), args=args,
                         train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_path))
    result = trainer.train()
    assert result.global_step == 1 and result.training_loss > 0


def test_killed_driver_then_rerun_gives_every_id_once(tmp_path, tiny_base):
    data = _prompts(tmp_path / "p.jsonl", 40)
    args = ["generate", "configs/quickstart.yaml", *_args(tmp_path, tiny_base, data, "generate.actors=1")]
    proc = subprocess.Popen([sys.executable, "-m", "cai_ray", *args], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    parts = []
    while time.time() < deadline and proc.poll() is None:
        chains = tmp_path / "out" / "generate"
        parts = list(chains.glob("*/chains/part-*.parquet"))
        if len(parts) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)   # the driver and the Ray it started
    proc.wait()
    out = _out(tmp_path)
    assert not (out / "manifest.json").exists()
    before = Counter(pq.read_table(out / "chains", columns=["id"]).column("id").to_pylist())
    assert 0 < sum(before.values()) < 40
    done = cai(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    ids = Counter(pq.read_table(out / "chains", columns=["id"]).column("id").to_pylist())
    assert len(ids) == 40 and set(ids.values()) == {1}
    assert json.loads((out / "manifest.json").read_text())["resumed_rows"] == sum(before.values())


@pytest.mark.parametrize("override, fragment", [
    (["data.source=/nonexistent/prompts.jsonl"], "/nonexistent/prompts.jsonl"),
    (["data.field=question"], "question"),
    (["generate.constitution=nope"], "nope"),
    (["generate.few_shot=99"], "generate.few_shot=99"),
    (["model.path=/no/such/model"], "/no/such/model"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_base, override, fragment):
    data = _prompts(tmp_path / "p.jsonl", 3)
    done = cai("generate", "configs/quickstart.yaml", *_args(tmp_path, tiny_base, data), *override)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "out" / "generate").exists()


def test_empty_dataset_and_eval_overlap_are_refused(tmp_path, tiny_base):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    done = cai("generate", "configs/quickstart.yaml", *_args(tmp_path, tiny_base, empty))
    assert done.returncode != 0 and "no rows" in done.stderr
    leaked = tmp_path / "leak.jsonl"
    from cai_ray.config import DataConfig
    from cai_ray.data.prompts import load_prompts

    eval_prompt = load_prompts(DataConfig(source="samples:red_team_eval"))[0]["prompt"]
    leaked.write_text(json.dumps({"prompt": eval_prompt}) + "\n" + json.dumps({"prompt": "fine"}) + "\n")
    done = cai("generate", "configs/quickstart.yaml", *_args(tmp_path, tiny_base, leaked))
    assert done.returncode != 0 and "overlap" in done.stderr and "samples:red_team_eval" in done.stderr
    assert not (tmp_path / "out" / "generate").exists()
