"""People check the judge in MLflow: a real evaluate run's judge traces, HUMAN feedback through MLflow's
assessments API, and `cai-ray judge --agreement` against the sqlite store and a tracking server."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
from mlflow.entities import AssessmentSource
from mlflow.tracking import MlflowClient

from tests.helpers import cai, free_port


def _feedback(trace_id: str, name: str, value, who: str) -> None:
    mlflow.log_feedback(trace_id=trace_id, name=name, value=value,
                        source=AssessmentSource(source_type="HUMAN", source_id=who))


def _server(db: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            assert time.time() < deadline and proc.poll() is None, "mlflow server did not start"
            time.sleep(0.5)


def test_judge_traces_human_feedback_and_agreement(tmp_path, tiny_base, tiny_chat):
    out = tmp_path / "out"
    args = ["configs/quickstart.yaml", f"model.path={tiny_base}", f"judge.model.path={tiny_chat}",
            "judge.model.role=instruct", f"output_dir={out}", "runtime.num_cpus=2", "generate.actors=1",
            "evaluate.sets=[{source: samples:red_team_eval}, {source: samples:benign_eval}]",
            "evaluate.sampling.max_new_tokens=8", "evaluate.sampling.min_new_tokens=2",
            "judge.sampling.max_new_tokens=8", f"judge.port={free_port()}", "evaluate.review_sample=12", "judge.check_limit=4"]
    done = cai("evaluate", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "traces: 12 judge calls (12 for review)" in done.stdout
    (folder,) = (out / "evaluate").iterdir()
    run_id = json.loads((folder / "report.json").read_text())["mlflow_run_id"]

    uri = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_run(run_id).info.experiment_id
    traces = client.search_traces(locations=[exp], run_id=run_id, max_results=100)
    assert len(traces) == 12
    for t in traces:  # linked to its run, filterable, and what the judge saw and said
        assert t.info.request_metadata["mlflow.sourceRun"] == run_id
        assert {"arm", "set", "rubric", "metric", "verdict", "keyword", "disagree"} <= set(t.info.tags)
        assert t.info.tags["review"] == "yes" and t.info.tags["arm"] == "base"
        assert {"rubric", "request", "response", "request_id"} <= set(t.data.spans[0].inputs)
        assert {"raw", "verdict", "parse_ok", "keyword_verdict"} <= set(t.data.spans[0].outputs)
    assert {t.info.tags["metric"] for t in traces} == {"asr", "over_refusal", "helpfulness"}

    none_yet = cai("judge", "--agreement", *args)
    assert none_yet.returncode == 0, none_yet.stderr[-2000:]
    assert "no usable human feedback on the 12 judge traces" in none_yet.stdout and "add feedback named" in none_yet.stdout

    # People review: alice marks every binary trace the opposite of the keyword rater, bob agrees with
    # it on one trace and carol sides with alice there; one value is off the scale.
    mlflow.set_tracking_uri(uri)
    binary = [t for t in traces if t.info.tags["metric"] in ("asr", "over_refusal")]
    flip = {"yes": "no", "no": "yes"}
    for t in binary:
        _feedback(t.info.trace_id, t.info.tags["metric"], flip[t.info.tags["keyword"]], "alice")
    first = binary[0]
    _feedback(first.info.trace_id, first.info.tags["metric"], first.info.tags["keyword"], "bob")
    _feedback(first.info.trace_id, first.info.tags["metric"], flip[first.info.tags["keyword"]], "carol")
    helpful = [t for t in traces if t.info.tags["metric"] == "helpfulness"]
    _feedback(helpful[0].info.trace_id, "helpfulness", 9, "alice")

    done = cai("judge", "--agreement", *args)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((folder / "agreement.json").read_text())
    blocks = {(b["rubric"], b["arm"]): b for b in result["blocks"]}
    for rubric in {t.info.tags["rubric"] for t in binary}:
        mine = [t for t in binary if t.info.tags["rubric"] == rubric]
        block = blocks[rubric, "base"]
        reference = [flip[t.info.tags["keyword"]] for t in mine]
        assert block["reviewed"] == len(mine) and block["keyword_correct"] == 0  # alice (and the majority) flipped it
        assert block["judge_correct"] == sum(t.info.tags["verdict"] == ref for t, ref in zip(mine, reference))
        assert block["judge_parse_failures"] == sum(t.info.tags["verdict"] == "parse_fail" for t in mine)
    assert result["between_people"] == {"traces": 1, "pairs": 3, "agreement": 1 / 3}
    assert result["skipped"] == {"value off the helpfulness scale (1 to 5)": 1}
    assert "judge vs people (3 reviewer(s))" in done.stdout
    run = client.get_run(run_id)
    assert any(k.startswith("agreement/") and k.endswith("/reviewed") for k in run.data.metrics)
    assert "evaluate/agreement.json" in {a.path for a in client.list_artifacts(run_id, "evaluate")}

    again = cai("evaluate", *args)  # the finished evaluate's report now shows the agreement
    assert again.returncode == 0 and "finished earlier" in again.stdout and "judge vs people" in again.stdout

    port = free_port()
    server = _server(out / "mlflow.db", port)
    try:  # the same numbers through a tracking server
        served = cai("judge", "--agreement", *args, f"tracking.uri=http://127.0.0.1:{port}", "--run", run_id)
        assert served.returncode == 0, served.stderr[-2000:]
        assert json.loads((folder / "agreement.json").read_text())["blocks"] == result["blocks"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    down = cai("judge", "--agreement", *args, f"tracking.uri=http://127.0.0.1:{port}")
    lines = down.stderr.strip().splitlines()
    assert down.returncode == 2 and len(lines) == 1 and "no MLflow server answers" in lines[0], down.stderr
