"""A real three-node Ray on loopback: stages land on the nodes their config names.

The head offers no CPUs; one worker node offers the custom resource ``gen`` and one ``trn``,
each started with ``ray start`` as a separate raylet (PROBE.md, "Multi-node Ray on one
machine").  ``cai-ray run`` on the quickstart config then places generate actors and judge
replicas on ``gen`` and DeepSpeed workers on ``trn``, which Ray's state API confirms; outputs
and MLflow runs match a one-node run.  Every process started here is stopped by its process
group, never with `ray stop` (which would stop other people's clusters on this machine).
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest

from tests.helpers import ROOT, free_ports

# Small but complete: every stage of the pipeline runs, each briefly.
# The EOS model's replies end after two tokens, so they are not screened out as cut and SFT has rows.
SMALL = ["data.limit=6", "generate.rounds=1", "generate.sampling.max_new_tokens=6",
         "generate.sampling.min_new_tokens=2", "sft.max_steps=2",
         "dpo.max_steps=2", "train.checkpoint_every=100", "evaluate.sets=[{source: samples:red_team_eval}]",
         "evaluate.sampling.max_new_tokens=6", "evaluate.bootstrap=50", "judge.check_limit=4",
         "judge.sampling.max_new_tokens=8"]
PLACED = ["generate.resources={gen: 1}", "train.resources={trn: 1}", "judge.resources={gen: 1}"]


def _env(**extra) -> dict:
    # Joining nodes need the multi-node flag; token auth off for every process of this cluster.
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "disabled",
            "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **extra}


def _ray_start(args: list[str], log: Path) -> subprocess.Popen:
    agent, agent_grpc, runtime_env, metrics = free_ports(4)
    ports = [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}"]
    return subprocess.Popen([sys.executable, "-m", "ray.scripts.scripts", "start", "--block",
                             "--node-ip-address=127.0.0.1", "--object-store-memory=300000000", *ports, *args],
                            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=log.open("w"))


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)  # a private cluster: what has not stopped by then is killed with its group
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(GCS address, dashboard URL): a head with no CPUs and two one-resource worker nodes."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    temp = tempfile.mkdtemp(prefix="cairay-mn-", dir="/tmp")  # socket paths must stay short
    gcs, dash, client = free_ports(3)
    procs = [_ray_start(["--head", f"--port={gcs}", "--num-cpus=0", "--dashboard-host=127.0.0.1",
                         f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                         f"--temp-dir={temp}", "--include-dashboard=true"], logs / "head.log")]
    try:
        _wait_for_nodes(f"127.0.0.1:{gcs}", 1, procs, logs)
        for n, name in enumerate(("gen", "trn"), start=2):
            # One at a time: a raylet that cannot register within Ray's fixed 30 s (a loaded
            # machine) exits, and is started again.
            for _ in range(3):
                proc = _ray_start([f"--address=127.0.0.1:{gcs}", "--num-cpus=2",
                                   f"--resources={json.dumps({name: 2})}"], logs / f"{name}.log")
                procs.append(proc)
                if _wait_for_nodes(f"127.0.0.1:{gcs}", n, procs, logs, fail=False):
                    break
                _stop(proc)
                procs.remove(proc)
        _wait_for_nodes(f"127.0.0.1:{gcs}", 3, procs, logs)
        yield f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
    finally:
        for proc in reversed(procs):
            _stop(proc)
        subprocess.run(["rm", "-rf", temp])


def _wait_for_nodes(address: str, n: int, procs, logs: Path, timeout: float = 240, fail: bool = True) -> bool:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True)
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(n)]:
            return True
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(2)
    if not fail:
        return False
    tails = {p.name: p.read_text()[-1500:] for p in logs.glob("*.log")}
    pytest.fail(f"the {n}-node cluster did not come up: {tails}")


def _cli(*args, timeout=1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai_ray", *args], capture_output=True, text=True,
                          cwd=ROOT, env=_env(), timeout=timeout)


def _nodes_by_resource(dashboard: str) -> dict[str, str]:
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard, detail=True)
    return {n.node_id: next((k for k in ("gen", "trn") if k in n.resources_total), "head") for n in nodes}


def _placed(dashboard: str) -> dict[str, set[str]]:
    """Kind of work -> the nodes (by their resource) its actors ran on, dead actors included; an
    actor that was never placed on a node is not counted."""
    from ray.util.state import list_actors

    where = _nodes_by_resource(dashboard)
    kinds = {"RevisionActor": "generate", "RayTrainWorker": "train", "JudgeDeployment": "judge"}
    out: dict[str, set[str]] = {kind: set() for kind in kinds.values()}
    for actor in list_actors(address=dashboard, detail=True, limit=10000, raise_on_missing_output=False):
        if not actor.node_id:  # removed while still pending (CI saw one once): it ran nowhere
            continue
        for marker, kind in kinds.items():
            if marker in actor.class_name or marker in (actor.repr_name or "") or marker in (actor.name or ""):
                out[kind].add(where.get(actor.node_id, "?"))
    return out


def test_run_places_every_stage_on_its_nodes_and_matches_one_node(cluster, tmp_path, tiny_eos, tiny_chat):
    address, dashboard = cluster
    models = [f"model.path={tiny_eos}", f"judge.model.path={tiny_chat}"]
    multi = _cli("run", "configs/quickstart.yaml", *models, *SMALL, *PLACED, f"output_dir={tmp_path / 'multi'}",
                 f"runtime.address={address}")
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]

    placed = _placed(dashboard)
    assert placed == {"generate": {"gen"}, "train": {"trn"}, "judge": {"gen"}}, placed

    # One node, same config (placement is not requested on a private local Ray): the generate
    # stage resolves to the same folder and writes the same chains.
    single = _cli("generate", "configs/quickstart.yaml", *models, *SMALL, *PLACED,
                  f"output_dir={tmp_path / 'single'}", "runtime.num_cpus=2")
    assert single.returncode == 0, single.stderr[-3000:]
    (multi_gen,) = (tmp_path / "multi" / "generate").iterdir()
    (single_gen,) = (tmp_path / "single" / "generate").iterdir()
    assert multi_gen.name == single_gen.name
    rows = [pq.read_table(d / "chains").sort_by("id").select(["id", "initial", "rounds", "final"]).to_pylist()
            for d in (multi_gen, single_gen)]
    assert len(rows[0]) == 6 and rows[0] == rows[1]

    # MLflow: one parent run with a child per stage, tagged with this config's stage hashes.
    from cai_ray.config import load_config, stage_hash

    cfg = load_config(ROOT / "configs/quickstart.yaml", [*models, *SMALL, f"output_dir={tmp_path / 'multi'}"])
    client = mlflow.MlflowClient(cfg.tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"generate", "sft", "dpo", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["generate"].data.tags["config_hash"] == stage_hash(cfg, "generate") == multi_gen.name
    assert all(r.info.artifact_uri.startswith((tmp_path / "multi").as_uri()) for r in runs)


def test_a_resource_no_node_offers_fails_within_the_timeout(cluster, tmp_path, tiny_base):
    address, _ = cluster
    started = time.time()
    done = _cli("generate", "configs/quickstart.yaml", f"model.path={tiny_base}", "data.limit=2",
                "generate.resources={tpu: 1}", "runtime.placement_timeout_s=5", f"runtime.address={address}",
                f"output_dir={tmp_path}", timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert err[-1].startswith("cai-ray: error: generate") and "'tpu'" in err[-1] and "waited 5s" in err[-1]
    assert time.time() - started < 120
    assert not list((tmp_path / "generate").glob("*/chains/part-*"))
