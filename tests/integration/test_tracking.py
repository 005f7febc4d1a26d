import pickle

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
