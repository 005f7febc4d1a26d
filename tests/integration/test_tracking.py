import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import mlflow
import pytest
import ray

from cai_ray.tracking import MlflowStore, NullStore, Store, open_store, stage_run
from tests.conftest import make_config


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
