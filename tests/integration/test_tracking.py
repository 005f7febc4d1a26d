import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pytest
import ray

from cai_ray.tracking import MlflowStore, NullStore, Store, open_store, stage_run
from tests.conftest import make_config

ROOT = Path(__file__).resolve().parents[2]


def test_null_store_satisfies_protocol():
    assert isinstance(NullStore(), Store)
    assert isinstance(NullStore().child("x"), NullStore)


def test_parent_and_children_from_driver_and_ray_task(tmp_path, tiny_base, ray_cluster):
    cfg = make_config(tmp_path, tiny_base, "tracking.experiment=tracking-test")
    parent = open_store(cfg, "pipeline", {"stage": "run"})
    assert isinstance(parent, MlflowStore) and cfg.tracking_uri.startswith("sqlite:///")
    parent.log_config(cfg)
    with stage_run(parent, "driver-child", {"stage": "generate"}) as child:
        child.log_metrics({"rows": 3.0}, step=1)

    @ray.remote
    def from_worker(store):
        # The store travels as (uri, run id); the worker opens its own client.
        with stage_run(store, "worker-child", {"stage": "sft"}) as c:
            c.log_metrics({"loss": 0.5}, step=2)
        return c.run_id

    worker_run = ray.get(from_worker.remote(parent))
    parent.end()

    client = mlflow.MlflowClient(cfg.tracking_uri)
    exp = client.get_experiment_by_name("tracking-test")
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert {r.info.run_name for r in runs} == {"driver-child", "worker-child"}
    assert worker_run in {r.info.run_id for r in runs}
    assert all(r.info.status == "FINISHED" for r in runs)
    top = client.get_run(parent.run_id)
    assert top.data.params["generate.rounds"] == str(cfg.generate.rounds)
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.run_id)}


def test_failed_block_marks_child_failed(tmp_path, tiny_base):
    cfg = make_config(tmp_path, tiny_base)
    parent = open_store(cfg, "p")
    with pytest.raises(RuntimeError):
        with stage_run(parent, "boom") as child:
            raise RuntimeError("x")
    assert mlflow.MlflowClient(cfg.tracking_uri).get_run(child.run_id).info.status == "FAILED"
    assert pickle.loads(pickle.dumps(parent)).run_id == parent.run_id


def test_tracking_disabled_gives_null_store(tmp_path, tiny_base):
    cfg = make_config(tmp_path, tiny_base, "tracking.enabled=false")
    assert isinstance(open_store(cfg, "x"), NullStore)
    assert not (cfg.output_root / "mlflow.db").exists()


def test_store_logs_through_a_real_mlflow_server_on_loopback(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(0.5)
        uri = f"http://127.0.0.1:{port}"
        parent = MlflowStore.start(uri, "server-test", "parent")
        with stage_run(parent, "child") as child:
            child.log_metrics({"loss": 1.5}, step=3)
        parent.end()
        client = mlflow.MlflowClient(uri)
        history = client.get_metric_history(child.run_id, "loss")
        assert [(m.step, m.value) for m in history] == [(3, 1.5)]
        assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


USER, PASSWORD = "cai", "s3cret=with spaces"


@pytest.fixture
def auth_env(monkeypatch, tmp_path):
    """The credentials MLflow's client reads, in this process and the commands it starts; no
    ~/.mlflow/credentials of the machine's own."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)


def _mlflow_server(port: int, root) -> subprocess.Popen:
    """The cluster's MLflow server script (jobs/mlflow_server.sh, basic auth on) on loopback, in its own
    process group; its admin user from a credentials file, as a Secret mounted on the head gives it."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs mlflow[auth] (Flask-WTF): make env")
    creds = Path(root) / "server-credentials"
    creds.write_text(f"[mlflow]\nmlflow_tracking_username = {USER}\nmlflow_tracking_password = {PASSWORD}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update({"MLFLOW_HOST": "127.0.0.1", "MLFLOW_PORT": str(port), "MLFLOW_ROOT": str(root),
                "MLFLOW_AUTH_FILE": str(creds),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    server = subprocess.Popen(["bash", str(ROOT / "jobs" / "mlflow_server.sh"), "--foreground"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return server
        except OSError:
            assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
            time.sleep(0.5)


def _kill(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGKILL)
    server.wait(30)


def test_artifacts_go_under_output_dir_never_the_cwd(tmp_path, tiny_base, monkeypatch, capsys):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = make_config(tmp_path, tiny_base, "tracking.experiment=artifacts-here")
    store = open_store(cfg, "p")
    store.log_text("hello", "notes/hello.txt")
    run = mlflow.MlflowClient(cfg.tracking_uri).get_run(store.run_id)
    assert run.info.artifact_uri.startswith((cfg.output_root / "mlartifacts").as_uri())
    assert (cfg.output_root / "mlartifacts").rglob("hello.txt").__next__().read_text() == "hello"
    assert list(cwd.iterdir()) == []
    # An experiment made elsewhere keeps its location, and says so.
    moved = make_config(tmp_path, tiny_base, "tracking.experiment=artifacts-here",
                        f"tracking.artifact_root={tmp_path / 'elsewhere'}")
    open_store(moved, "q")
    assert "keeps the artifact location it was created with" in capsys.readouterr().err


def test_unreachable_tracking_server_at_start_is_one_line_and_exit_2(tmp_path, tiny_base):
    done = subprocess.run(
        [sys.executable, "-m", "cai_ray", "generate", "configs/quickstart.yaml", f"model.path={tiny_base}",
         f"output_dir={tmp_path / 'out'}", f"tracking.uri=http://127.0.0.1:{_port()}"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cai-ray: error: tracking.uri=http://127.0.0.1:")
    assert "no MLflow server answers" in lines[0]
    assert not (tmp_path / "out" / "generate").exists()


def test_server_refuses_requests_without_credentials_and_logs_a_run_with_them(tmp_path, tiny_base, auth_env,
                                                                              monkeypatch, capsys):
    """jobs/mlflow_server.sh with MLflow's basic auth: a request without the user and password is refused,
    cai_ray says so in one line, and with them (env or ~/.mlflow/credentials) a run is logged.  Then the
    same server is killed: calls to it are dropped, counted and reported."""
    from cai_ray.runtime import worker_env

    port = _port()
    server = _mlflow_server(port, tmp_path)
    try:
        uri = f"http://127.0.0.1:{port}"
        search = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=30)
        assert refused.value.code == 401
        cfg = make_config(tmp_path, tiny_base, f"tracking.uri={uri}", "tracking.experiment=auth")
        # The password never travels in the workers' runtime_env (the Ray dashboard shows it).
        assert not any(k.startswith("MLFLOW_TRACKING_") and k != "MLFLOW_TRACKING_URI" for k in worker_env(cfg, True))
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(RuntimeError, match=r"^tracking.uri=http://127.0.0.1:\d+: the MLflow server asks for a user "
                                               r"and password and no credentials were given; set MLFLOW_TRACKING_USERNAME"):
            open_store(cfg, "no-credentials")
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
        with pytest.raises(RuntimeError, match="user 'cai' was refused"):
            open_store(cfg, "wrong-password")
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
        home = Path(os.environ["HOME"]) / ".mlflow"
        home.mkdir(parents=True)
        (home / "credentials").write_text(f"[mlflow]\nmlflow_tracking_username = {USER}\n"
                                          f"mlflow_tracking_password = {PASSWORD}\n")
        store = open_store(cfg, "with-credentials")   # read from ~/.mlflow/credentials by MLflow's client
        store.log_metrics({"loss": 0.25}, step=1)
        store.end()
        run = mlflow.MlflowClient(uri).get_run(store.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["loss"] == 0.25

        parent = MlflowStore.start(uri, "dead", "parent")
        parent.ledger, parent.retry, parent.reports_losses = str(tmp_path / "ledger"), (1, 60.0), True
        child = parent.child("child")
        _kill(server)
        started = time.time()
        child.log_metrics({"a": 1.0, "b": 2.0}, step=1)     # tried (one retry), then dropped
        child.log_metrics({"a": 3.0}, step=2)               # within the pause: dropped at once
        child.set_tags({"x": "y"})
        assert time.time() - started < 30
        parent.end()
        err = capsys.readouterr().err
        assert err.count("not logged to") == 1
        assert "5 points could not be logged" in err and "metrics 3" in err and "tags 1" in err and "runs 1" in err
    finally:
        _kill(server)


def test_sft_survives_a_tracking_server_restart_and_later_points_land(tmp_path, tiny_base, auth_env):
    port, steps = _port(), 200
    server = _mlflow_server(port, tmp_path)
    uri = f"http://127.0.0.1:{port}"
    sft = subprocess.Popen(
        [sys.executable, "-m", "cai_ray", "sft", "configs/quickstart.yaml", f"model.path={tiny_base}",
         f"output_dir={tmp_path / 'out'}", "sft.data=samples:helpful_sft", f"tracking.uri={uri}", f"sft.max_steps={steps}", "train.log_every=1",
         "train.checkpoint_every=1000", "train.max_length=64", "tracking.retries=2", "tracking.pause_s=2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        client = mlflow.MlflowClient(uri)
        deadline = time.time() + 600
        while True:  # kill the server once SFT has logged a few steps
            assert time.time() < deadline and sft.poll() is None, sft.communicate()[1][-3000:]
            exp = client.get_experiment_by_name("cai_ray")
            runs = client.search_runs([exp.experiment_id], "tags.stage = 'sft'") if exp else []
            history = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
            if len(history) >= 3:
                break
            time.sleep(0.5)
        run_id = runs[0].info.run_id
        _kill(server)
        time.sleep(8)
        assert sft.poll() is None, "SFT ended while the server was down; raise sft.max_steps"
        server = _mlflow_server(port, tmp_path)
        out, err = sft.communicate(timeout=900)
        assert sft.returncode == 0, err[-3000:]
        assert (tmp_path / "out" / "sft").glob("*/manifest.json").__next__().is_file()
        logged = sorted(m.step for m in client.get_metric_history(run_id, "loss"))
        assert logged[:3] == [1, 2, 3] and logged[-1] == steps       # before the kill, and after the restart
        assert len(logged) < steps                                   # the outage's points are missing ...
        assert "points could not be logged" in err                  # ... counted, and said so at the end
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        if sft.poll() is None:
            os.killpg(sft.pid, signal.SIGKILL)
        _kill(server)
