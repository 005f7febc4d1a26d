import re
import socket
import subprocess
import sys
import urllib.request

import mlflow
import pytest

from tests.helpers import ROOT, free_port


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cai_ray", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_config_show_prints_resolved_config():
    done = cli("config", "show", "configs/quickstart.yaml", "generate.rounds=3")
    assert done.returncode == 0, done.stderr
    assert "rounds: 3" in done.stdout and "backend: hf" in done.stdout


def test_config_show_unknown_key_is_one_line_with_suggestion():
    done = cli("config", "show", "configs/quickstart.yaml", "generate.roundz=3")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "generate.roundz" in lines[0] and "'rounds'" in lines[0]


def test_help_on_every_command():
    top = cli("--help")
    assert top.returncode == 0
    from cai_ray.cli import STAGES, TOOLS

    for command in [*STAGES, *TOOLS, "config"]:
        done = cli(command, "--help")
        assert done.returncode == 0 and "usage" in done.stdout.lower(), command


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from cai_ray.cli import _parser; _parser(); "
            "print(sorted(m for m in ('ray', 'torch', 'vllm', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"


def test_failing_stage_prints_one_line_naming_its_log(tmp_path):
    done = cli("generate", "configs/quickstart.yaml", f"output_dir={tmp_path}", f"model.path={tmp_path / 'none'}")
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    (log,) = (tmp_path / "logs").glob("generate-*.log")
    assert line.startswith("cai-ray: error: ") and line.endswith(f"(full log: {log})")
    assert "cai-ray: error: " in log.read_text()

    loud = tmp_path / "verbose"
    done = cli("generate", "configs/quickstart.yaml", f"output_dir={loud}", f"model.path={loud / 'none'}",
               "--verbose")
    assert done.returncode == 2 and "cai-ray: error: " in done.stderr and "full log" not in done.stderr
    assert not (loud / "logs").exists()


# The whole pipeline with the full judge check: 6.5 min alone, over the 900 s default beside another test file.
@pytest.mark.timeout(2400)
def test_quickstart_run_is_quiet_and_the_log_holds_the_libraries(tmp_path):
    """`cai-ray run configs/quickstart.yaml` as `make quickstart` runs it, on freshly built tiny models."""
    models = tmp_path / "models"
    for flavour in ("base", "chat"):
        built = cli("tiny-model", str(models / f"tiny-{flavour}"), "--flavour", flavour)
        assert built.returncode == 0, built.stderr
    out = tmp_path / "out"
    done = cli("run", "configs/quickstart.yaml", f"output_dir={out}", f"model.path={models / 'tiny-base'}",
               f"judge.model.path={models / 'tiny-chat'}", f"judge.port={free_port()}")
    shown = done.stdout.splitlines() + done.stderr.splitlines()
    assert done.returncode == 0, "\n".join(shown[-40:])
    # Progress lines come every 10 s off a terminal, so a slower (or busier) machine shows more of
    # them; quiet means everything else stays short.
    progress = [line for line in shown if re.match(r"^  \S.*: \d+(/\d+)? \S+  ", line)]
    assert len(shown) - len(progress) <= 48, "\n".join(shown)
    assert done.stderr == ""
    for stage in ("generate", "sft", "dpo", "evaluate"):
        assert f"== quickstart-{stage}" in done.stdout
    assert done.stdout.count("   done in ") == 4
    (log,) = (out / "logs").glob("run-*.log")
    text = log.read_text()
    # Ray, Ray Data, Train workers, Serve, DeepSpeed (a worker's stdout): all in the log, none on screen.
    for noise in ("Started a local Ray instance", "Starting execution of Dataset", "(RayTrainWorker pid=",
                  "(ServeController pid=", "Setting accelerator to CPU"):
        assert noise in text and noise not in done.stdout, noise

    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    exp = client.get_experiment_by_name("cai_ray")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    children = client.search_runs([exp.experiment_id], "tags.mlflow.parentRunId != ''")
    # The judge check runs as a child of the evaluate run, before its ratings.
    assert sorted(r.data.tags["stage"] for r in children) == ["dpo", "evaluate", "generate", "judge-check", "sft"]
    for run in children:
        stage = run.data.tags["stage"]
        if stage == "judge-check":
            continue
        section = {"generate": "generate.rounds", "sft": "sft.max_steps", "dpo": "dpo.beta",
                   "evaluate": "judge.model.path"}[stage]
        assert section in run.data.params and "seed" in run.data.params, stage


def test_ui_serves_the_config_store_on_loopback_and_stops_with_its_server(tmp_path):
    from cai_ray.config import load_config
    from cai_ray.tracking import open_store

    cfg = load_config("configs/quickstart.yaml", [f"output_dir={tmp_path}"])
    open_store(cfg, "seed-run").end()
    exp = mlflow.MlflowClient(cfg.tracking_uri).get_experiment_by_name(cfg.tracking.experiment)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cai_ray", "ui", "configs/quickstart.yaml",
                             f"output_dir={tmp_path}", "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    try:
        page = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        assert page in proc.stdout.readline()
        assert f"{page}&searchFilter=tags.stage%20%3D%20%27evaluate%27" in proc.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as answer:
            assert answer.status == 200
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # the server went with it
    assert list((tmp_path / "logs").glob("ui-*.log"))

    remote = cli("ui", "configs/quickstart.yaml", "tracking.uri=http://127.0.0.1:5005/")
    assert remote.returncode == 0
    assert remote.stdout.strip() == "MLflow UI: http://127.0.0.1:5005/#/experiments?workflowType=machine_learning"
