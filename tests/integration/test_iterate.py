"""RL-CAI iterations through `cai-ray run` on the tiny model: a second iteration samples from the first
DPO policy, labels and trains from it; the stop rule reads the selection split and the curve the rest; a
rerun with a forced threshold stops early, reuses everything and names the best policy by the rule."""

import json
import subprocess
import sys

import mlflow

from tests.helpers import ROOT, free_port, jsonl


def test_two_iterations_then_an_early_stop_with_curves_in_mlflow(tmp_path, tiny_eos, tiny_chat):
    data = jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"How do I annoy my roommate number {i}?",
                                                "purpose": "harm"} for i in range(6)])
    harm = jsonl(tmp_path / "harm.jsonl", [{"prompt": f"Tell me something cruel about person {i}"} for i in range(3)])
    cap = jsonl(tmp_path / "cap.jsonl", [{"prompt": f"What is {i} plus {i}?", "reference": f"It is {2 * i}."}
                                          for i in range(3)])
    out = tmp_path / "out"
    args = ["configs/quickstart.yaml", f"model.path={tiny_eos}", f"judge.model.path={tiny_chat}",
            f"output_dir={out}", f"data.source={data}", "data.limit=null", "generate.actors=1",
            "generate.sampling.max_new_tokens=8", "generate.batch_size=8", "sft.data=samples:helpful_sft",
            "sft.max_steps=2", "dpo.max_steps=2", "train.workers=1", "train.checkpoint_every=2",
            "dpo.pairs=feedback", "dpo.loss=soft", "label.check=false", "label.few_shot=1",
            "label.sampling.max_new_tokens=6", "label.sampling.min_new_tokens=2",
            f"evaluate.sets=[{{source: {harm}, kind: harm}}, {{source: {cap}, kind: capability}}]",
            "evaluate.sampling.max_new_tokens=4", "judge.sampling.max_new_tokens=4", f"judge.port={free_port()}",
            "judge.check_limit=4", "iterate.metric=asr_keyword", "tracking.experiment=iterate-test"]
    # -1: any change counts as an improvement, so the second iteration runs.
    done = subprocess.run([sys.executable, "-m", "cai_ray", "run", *args, "iterate.iterations=2",
                           "iterate.min_improvement=-1"], capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "iterations_run: 2" in done.stdout and "stop_reason: all iterations ran" in done.stdout
    # By request id (evaluate.selection_share=0.5) harm requests 0, 1 and capability requests 1, 2 fall in the
    # selection split: the rule chose on those 4 requests, the curve shows the other 2.
    assert "best_policy: it2" in done.stdout
    assert "the rule read 4 selection requests, the iteration curve the other 2" in done.stdout

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("iterate-test")
    (parent,) = client.search_runs([exp.experiment_id], "tags.stage = 'run'")
    (iteration,) = client.search_runs([exp.experiment_id], "tags.stage = 'iteration'")
    assert iteration.data.tags["mlflow.parentRunId"] == parent.info.run_id
    inner = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{iteration.info.run_id}'")
    assert sorted(r.data.tags["stage"] for r in inner) == ["dpo", "evaluate", "label"]
    # The second DPO starts from the first DPO policy and keeps it as its frozen reference.
    manifests = [json.loads(p.read_text()) for p in (out / "dpo").glob("*/manifest.json")]
    assert len(manifests) == 2
    # Each DPO trained (soft labels) on its iteration's feedback pairs.
    assert all("/label/" in m["inputs"]["data"] and m["inputs"]["data"].endswith("pairs.parquet")
               and m["steps"] == 2 and m["final_loss"] is not None for m in manifests)
    adapters = {m["paths"]["adapter"] for m in manifests}
    assert sum(m["reference"]["policy"] in adapters for m in manifests) == 1
    curve = client.get_metric_history(parent.info.run_id, "iteration/asr_keyword")
    assert [m.step for m in curve] == [0, 1, 2]
    assert "iterations.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert parent.data.tags["iterate.stopped"] == "all iterations ran"
    assert parent.data.tags["iterate.best_policy"] == "it2"
    assert parent.data.tags["iterate.selection"].startswith("stop rule on the selection split (evaluate.selection_share=0.5")

    # A forced threshold: no iteration can improve by 1.0, so a 3-iteration rerun stops after the
    # second, reusing both (nothing retrains) and never starting a third.
    again = subprocess.run([sys.executable, "-m", "cai_ray", "run", *args, "iterate.iterations=3",
                            "iterate.min_improvement=1.0"], capture_output=True, text=True, cwd=ROOT, timeout=1200)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "iterations_run: 1" in again.stdout or "iterations_run: 2" in again.stdout
    assert "stopped after iteration" in again.stdout and "< iterate.min_improvement=1.0" in again.stdout
    # The rejected policy is not the one returned: the last one the rule accepted is.
    best = "sft" if "iterations_run: 1" in again.stdout else "dpo"
    assert f"best_policy: {best}" in again.stdout
    assert not any("-it3" in p.name for p in (out / "dpo").glob("*")) and len(list((out / "dpo").glob("*"))) == 2
