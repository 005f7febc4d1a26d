"""The label stage on the tiny model through the real CLI: SFT -> label (with its check child run)
-> label --check -> DPO on the feedback pairs with soft labels, a resume, and bad input."""

import json
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, cai, jsonl

PROMPTS = [f"Question {i}: how can I get back at my neighbour {i} for the noise?" for i in range(10)]


def _args(root: Path, model: str, *extra) -> list[str]:
    # Two error rows: a prompt too long to sample from, and one whose comparison is too long to score.
    data = jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS]
                  + [{"prompt": "explain " * 3000}, {"prompt": "explain " * 1500}])
    return ["configs/quickstart.yaml", f"model.path={model}", f"output_dir={root / 'out'}", f"data.source={data}",
            "data.limit=null", "evaluate.sets=[{source: samples:red_team_eval}]", "tracking.experiment=label-test",
            "sft.data=samples:helpful_sft", "sft.max_steps=2", "dpo.max_steps=2", "train.workers=1",
            "train.checkpoint_every=2", "label.batch_size=4", "label.few_shot=2", "label.max_error_rate=0.2",
            "label.sampling.max_new_tokens=8", "label.sampling.min_new_tokens=2", *extra]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, tiny_eos, tiny_base):
    # The terse tiny model: its replies end (EOS) before max_new_tokens, and cut replies never become pairs.
    # It does not judge them: its EOS coordinate swamps the comparison, so P(A) depends on the principle
    # alone, both orders tie at exactly 0.5 and a pair came only from rounding noise.  The random base
    # model is the feedback model.
    root = tmp_path_factory.mktemp("label")
    args = _args(root, tiny_eos, f"label.feedback={tiny_base}")
    sft = cai("sft", *args)
    assert sft.returncode == 0, sft.stderr[-3000:]
    done = cai("label", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    (out,) = (root / "out" / "label").iterdir()
    return {"root": root, "args": args, "out": out, "stdout": done.stdout,
            "client": mlflow.MlflowClient(f"sqlite:///{root / 'out' / 'mlflow.db'}")}


def _runs(client, query: str):
    exp = client.get_experiment_by_name("label-test")
    return client.search_runs([exp.experiment_id], query)


def test_label_writes_trl_pairs_with_both_orders_and_counts_every_drop(labelled):
    out = labelled["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    pairs = pq.read_table(out / "pairs.parquet")
    assert pairs.column_names[:3] == ["prompt", "chosen", "rejected"]
    assert {"label", "principle_id", "p_chosen_as_a", "p_chosen_as_b", "id"} <= set(pairs.column_names)
    rows = pairs.to_pylist()
    assert all(0.5 < r["label"] <= 1 and r["chosen"] != r["rejected"] for r in rows)
    # The label is the average of both orders' P(chosen is better).
    assert all(r["label"] == pytest.approx((r["p_chosen_as_a"] + r["p_chosen_as_b"]) / 2) for r in rows)
    assert all(r["prompt"].startswith("\n\nHuman: Question") and r["source"] == "feedback" for r in rows)
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert manifest["rows"] == 12 and manifest["pairs"] + manifest["rejects"] == 12
    assert manifest["dropped"]["errors"] == 2 and sum(manifest["dropped"].values()) == len(rejects)
    reasons = sorted(r["reason"] for r in rejects if r["reason"].startswith("error"))
    assert "could not be scored" in reasons[0] and "sample 1: prompt has 30" in reasons[1]
    assert "tokens; context is 2048" in reasons[1]
    assert manifest["position"]["rows"] == 10 and manifest["position"]["position_bias"] is not None
    assert manifest["policy"].endswith("/adapter") and manifest["check"]["pairs"] == 32


def test_label_run_has_the_check_as_a_child_run(labelled):
    client = labelled["client"]
    (parent,) = _runs(client, "tags.stage = 'label'")
    assert parent.info.status == "FINISHED" and parent.data.metrics["pairs"] >= 1
    assert "position/position_bias" in parent.data.metrics and "check_verdict" in parent.data.tags
    (child,) = _runs(client, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert child.data.tags["stage"] == "label-check"
    assert {"check/accuracy", "check/accuracy_lo", "check/ece", "check/above_chance"} <= set(child.data.metrics)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "label")} >= {
        "label/pairs.parquet", "label/rejects.parquet"}


def test_check_not_above_chance_says_so_in_summary_and_mlflow(labelled):
    # Every shipped pair again with the answer swapped: no model can be above chance on both.
    shipped = [json.loads(line) for line in (ROOT / "cai_ray/data/samples/feedback_check.jsonl").open()]
    swapped = jsonl(labelled["root"] / "swapped.jsonl",
                     [{"prompt": r["prompt"], "chosen": r["rejected"], "rejected": r["chosen"]} for r in shipped])
    done = cai("label", "--check", *labelled["args"], f"label.check_data=[{swapped}]")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pairs: 64" in done.stdout and "NOT above chance" in done.stdout
    report = json.loads((labelled["out"] / "check" / "report.json").read_text())
    assert report["scored"] + report["errors"] == 64 and report["above_chance"] is False
    # Not above chance: the interval's low end is at or under 0.5 (a model that is right on the shipped
    # pairs is often below chance on the swapped ones).
    assert report["accuracy_lo"] <= 0.5 and report["accuracy_lo"] <= report["accuracy_hi"] and 0 <= report["ece"] <= 1
    (run,) = [r for r in _runs(labelled["client"], "tags.stage = 'label-check'")
              if "mlflow.parentRunId" not in r.data.tags]
    assert run.data.tags["above_chance"] == "false" and "NOT above chance" in run.data.tags["verdict"]
    assert run.data.metrics["check/above_chance"] == 0.0


def test_rerun_resumes_from_the_parts_already_written(labelled):
    out = labelled["out"]
    before = pq.read_table(out / "pairs.parquet").to_pylist()
    parts = sorted((out / "rows").glob("part-*.parquet"))
    lost = pq.read_metadata(parts[-1]).num_rows
    parts[-1].unlink()
    (out / "manifest.json").unlink()
    done = cai("label", *labelled["args"], "label.check=false")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["resumed_rows"], manifest["labelled_rows"]) == (12 - lost, lost)
    # Same samples (per-row seeds) and the same scores up to float rounding; the random tiny
    # model puts some labels within rounding of 0.5, where the orientation may flip.
    after = {r["id"]: r for r in pq.read_table(out / "pairs.parquet").to_pylist()}
    assert set(after) == {r["id"] for r in before}
    for row in before:
        again = after[row["id"]]
        assert again["label"] == pytest.approx(row["label"], abs=1e-5)
        if row["label"] > 0.5 + 1e-4:
            assert (again["chosen"], again["rejected"]) == (row["chosen"], row["rejected"])


@pytest.mark.parametrize("extra, fragment", [
    (["label.check_data=[{one}]"], "missing column(s) rejected"),
    (["generate.constitution=grouped"], "generate.constitution=grouped: the constitution has no comparisons"),
    (["label.few_shot=9"], "label.few_shot=9 but only 4 few-shot comparisons exist"),
    (["label.feedback_role=instruct", "label.feedback=/x"], "label.feedback_role=instruct is refused"),
    (["model.role=instruct"], "the feedback model must be a base model"),
    ([], "the sft stage has no output"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_base, extra, fragment):
    one = jsonl(tmp_path / "one.jsonl", [{"prompt": "hi", "chosen": "Hello!"}])
    # A policy folder that passes the checks: every case fails before any model loads.
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    policy = [f"label.policy={tmp_path / 'adapter'}"] if extra else []
    done = cai("label", *_args(tmp_path, tiny_base, *policy, *[e.format(one=one) for e in extra]))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], done.stderr[-2000:]
    assert not (tmp_path / "out" / "label").exists()
