"""The generate stage end to end on the tiny model, through the real CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, cai


def _prompts(path: Path, n: int, long_rows: int = 0, helpful: int = 0) -> Path:
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question number {i}: how should I treat my neighbour {i}?"}) + "\n")
        for i in range(helpful):
            f.write(json.dumps({"prompt": f"How do I water plant number {i}?", "purpose": "helpful"}) + "\n")
        for i in range(long_rows):
            f.write(json.dumps({"prompt": "please explain " * 1500 + str(i)}) + "\n")
    return path


def _args(tmp_path, model, data, *extra):
    return [f"model.path={model}", f"output_dir={tmp_path / 'out'}", f"data.source={data}",
            "runtime.num_cpus=2", "generate.rounds=1", "generate.few_shot=1", "generate.batch_size=4",
            "generate.sampling.max_new_tokens=6", "generate.sampling.min_new_tokens=2",
            "evaluate.sets=[{source: samples:red_team_eval}]", *extra]


def _out(tmp_path) -> Path:
    (folder,) = (tmp_path / "out" / "generate").iterdir()
    return folder


def test_generate_writes_chains_sft_pairs_helpful_and_error_rows(tmp_path, tiny_eos):
    # EOS held back for 2 tokens, then it wins: every step ends with "stop", so rows get through.
    data = _prompts(tmp_path / "p.jsonl", 10, long_rows=1, helpful=3)
    args = ("generate.max_error_rate=0.2", "generate.helpful_few_shot=1")
    done = cai("generate", "configs/quickstart.yaml", *_args(tmp_path, tiny_eos, data, "generate.actors=2", *args))
    assert done.returncode == 0, done.stderr[-3000:]
    out = _out(tmp_path)
    chains = pq.read_table(out / "chains").to_pylist()
    assert len(chains) == 14 and len({r["id"] for r in chains}) == 14
    # One part per batch of at most generate.batch_size (4) rows: what a kill can lose per actor.
    assert sorted(pq.read_metadata(p).num_rows for p in (out / "chains").glob("part-*.parquet")) == [3, 3, 4, 4]
    long_row = [r for r in chains if r["prompt"].startswith("please explain")][0]
    assert "context" in long_row["error"] and long_row["final"] is None
    ok = [r for r in chains if not r["error"] and r["purpose"] == "harm"]
    assert all(len(r["rounds"]) == 1 and r["rounds"][0]["principle_id"] for r in ok)
    helpful = [r for r in chains if r["purpose"] == "helpful"]
    assert len(helpful) == 3 and all(r["rounds"] == [] and r["initial_finish"] == "stop" for r in helpful)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["errors"] == 1 and manifest["chains"] == 14
    assert manifest["redone_rows"] == 0 and manifest["duplicate_rows"] == 0   # no actor lost, no id twice
    assert manifest["prompts"] == {"harm": 11, "helpful": 3} and manifest["data"]["purpose"] == manifest["prompts"]
    assert manifest["finish"]["initial"]["length"] == 0 and manifest["finish"]["initial"]["error"] == 1
    assert manifest["sft_rows"] + manifest["helpful_rows"] + manifest["rejects"] == 14
    assert set(manifest["filters"]) >= {"repeated_ngrams", "role_leak", "symbol_run", "empty", "truncated"}
    pairs = pq.read_table(out / "pairs.parquet")
    assert pairs.column_names[:5] == ["prompt", "chosen", "rejected", "source", "label"]
    assert pq.read_table(out / "sft.parquet").column_names[:2] == ["prompt", "completion"]
    assert pq.read_table(out / "helpful.parquet").column_names == ["prompt", "completion", "id"]
    assert pq.read_table(out / "helpful.parquet").num_rows == manifest["helpful_rows"] > 0
    assert any(r.startswith("error: ") for r in pq.read_table(out / "rejects.parquet").column("reason").to_pylist())
    assert (out / "config.yaml").exists()
    _pairs_train_with_trl(out / "pairs.parquet", tiny_eos, tmp_path)
    # Same config again: the finished stage is not redone.
    again = cai("generate", "configs/quickstart.yaml", *_args(tmp_path, tiny_eos, data, "generate.actors=1", *args))
    assert again.returncode == 0 and "resumed_rows" in again.stdout
    assert _out(tmp_path) == out


def test_cut_or_empty_text_never_becomes_a_target(tmp_path, tiny_base):
    """On the plain tiny model about a quarter of 96-token replies end on their own: the others
    are cut, and none of those may become an SFT target, a chosen or rejected side or a helpful row."""
    data = _prompts(tmp_path / "p.jsonl", 16, helpful=8)
    done = cai("generate", "configs/quickstart.yaml", *_args(
        tmp_path, tiny_base, data, "generate.sampling.max_new_tokens=96", "generate.batch_size=12"))
    assert done.returncode == 0, done.stderr[-3000:]
    out = _out(tmp_path)
    chains = {r["id"]: r for r in pq.read_table(out / "chains").to_pylist()}
    ids = {name: set(pq.read_table(out / f"{name}.parquet").column("id").to_pylist())
           for name in ("sft", "pairs", "helpful", "rejects")}
    final = {i: (r["rounds"][-1]["revision_finish"] if r["rounds"] else r["initial_finish"]) for i, r in chains.items()}
    assert all(final[i] == "stop" for i in ids["sft"] | ids["helpful"])
    assert all(chains[i]["initial_finish"] == "stop" for i in ids["pairs"]) and ids["pairs"] <= ids["sft"]
    cut = {i for i in chains if final[i] == "length"}
    assert cut and cut <= ids["rejects"] and not cut & (ids["sft"] | ids["helpful"])
    rejects = {r["id"]: r for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    cut_initial = {i for i in ids["sft"] if chains[i]["initial_finish"] == "length"}
    assert all(rejects[i]["reason"] == "truncated_initial" and rejects[i]["lost"] == "pair" for i in cut_initial)
    assert all("truncated" in rejects[i]["reason"].split(", ") and rejects[i]["lost"] != "pair" for i in cut)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["filters"]["truncated"] == len(cut)
    steps = manifest["finish"]
    assert steps["helpful"]["stop"] + steps["helpful"]["length"] == 8
    went_on = steps["initial"]["stop"] + steps["initial"]["length"]
    assert sum(steps["initial"].values()) == 16 and sum(steps["critique"].values()) == went_on


def test_a_model_that_only_says_eos_finishes_with_every_row_rejected_as_empty(tmp_path, tiny_eos):
    import mlflow

    data = _prompts(tmp_path / "p.jsonl", 6, helpful=4)
    done = cai("generate", "configs/quickstart.yaml",
               *_args(tmp_path, tiny_eos, data, "generate.sampling.min_new_tokens=0"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    out = _out(tmp_path)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert len(rejects) == 10 and {r["reason"] for r in rejects} == {"empty"}
    assert {(r["purpose"], r["step"], r["lost"]) for r in rejects} == {
        ("harm", "initial", "sft+pair"), ("helpful", "helpful", "helpful")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["sft_rows"], manifest["pairs"], manifest["helpful_rows"], manifest["errors"]) == (0, 0, 0, 0)
    assert manifest["filters"]["empty"] == 10
    assert manifest["finish"]["initial"]["empty"] == 6 and manifest["finish"]["helpful"]["empty"] == 4
    assert sum(manifest["finish"]["critique"].values()) == 0  # an empty reply is not critiqued
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}").get_run(manifest["mlflow_run_id"])
    assert run.data.metrics["filter/empty"] == 10 and run.data.metrics["finish/helpful/empty"] == 4
    # The SFT stage then says what is wrong in one line rather than training on nothing.
    sft = cai("sft", "configs/quickstart.yaml", *_args(tmp_path, tiny_eos, data, "generate.sampling.min_new_tokens=0",
                                                       "sft.data=null"))
    assert sft.returncode == 2 and len(sft.stderr.strip().splitlines()) == 1, sft.stderr[-2000:]
    assert "sft.parquet has no rows" in sft.stderr


def test_chains_of_another_schema_are_not_mixed_in(tmp_path, tiny_base):
    from cai_ray.config import load_config, stage_folder

    data = _prompts(tmp_path / "p.jsonl", 3)
    args = _args(tmp_path, tiny_base, data)
    chains = stage_folder(load_config(ROOT / "configs/quickstart.yaml", args), "generate") / "chains"
    chains.mkdir(parents=True)
    old = pa.table({"id": ["x"], "prompt": ["p"], "initial": ["a"], "final": ["b"]})
    pq.write_table(old, chains / "part-1-1.parquet")
    done = cai("generate", "configs/quickstart.yaml", *args)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    assert "part-1-1.parquet: chains written with another schema" in done.stderr
    assert sorted(p.name for p in chains.iterdir()) == ["part-1-1.parquet"]


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
    (["generate.helpful_few_shot=9"], "generate.helpful_few_shot=9"),
    (["data.purpose=both"], "data.purpose"),
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


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_stage_with_batches_in_flight_writes_the_chains_of_the_hf_stage(tmp_path, tiny_base):
    pytest.importorskip("vllm")
    # Rows of three batches share one async vLLM engine and move through their steps on their own;
    # greedy tokens match hf's, so every field of every chain must come out as the hf stage writes it.
    data = _prompts(tmp_path / "p.jsonl", 22, helpful=5)
    common = ("generate.actors=1", "generate.sampling.temperature=0", "generate.helpful_few_shot=1")
    chains = {}
    for backend, extra in (("hf", ()), ("vllm", ("generate.batches_in_flight=3",))):
        done = cai("generate", "configs/quickstart.yaml", *_args(
            tmp_path / backend, tiny_base, data, f"engine.backend={backend}", *common, *extra), timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
        chains[backend] = sorted(pq.read_table(_out(tmp_path / backend) / "chains").to_pylist(),
                                 key=lambda r: r["id"])
    assert len(chains["vllm"]) == 27 and chains["vllm"] == chains["hf"]
