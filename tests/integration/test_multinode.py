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
         "generate.sampling.min_new_tokens=2", "generate.batch_size=2", "sft.max_steps=2",
         "dpo.max_steps=2", "train.checkpoint_every=100", "evaluate.sets=[{source: samples:red_team_eval}]",
         "evaluate.sampling.max_new_tokens=6", "evaluate.bootstrap=50", "judge.check_limit=4",
         "judge.sampling.max_new_tokens=8"]
NODES = ("gen-1", "gen-2", "trn-1", "trn-2")
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


class Cluster:
    """A head with no CPUs and worker nodes, each its own ``ray start`` process group, so a test can
    lose a node (SIGKILL of that group: the raylet, its workers and actors) and add it back."""

    def __init__(self, logs: Path):
        self.logs, self.temp = logs, tempfile.mkdtemp(prefix="cairay-mn-", dir="/tmp")  # short socket paths
        self.nodes: dict[str, subprocess.Popen] = {}
        self.ports = free_ports(3)
        self.address, self.dashboard = f"127.0.0.1:{self.ports[0]}", f"http://127.0.0.1:{self.ports[1]}"

    def head(self) -> None:
        gcs, dash, client = self.ports
        self._start("head", ["--head", f"--port={gcs}", "--num-cpus=0", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
                             f"--temp-dir={self.temp}", "--include-dashboard=true"])

    @property
    def procs(self) -> list[subprocess.Popen]:
        return list(self.nodes.values())

    def join(self, name: str) -> None:
        """Start worker node ``name`` ("gen-1"): 2 CPUs, 2 units of its kind ("gen") and 1 of its own name."""
        resources = json.dumps({name.split("-")[0]: 2, name: 1})
        self._start(name, [f"--address={self.address}", "--num-cpus=2", f"--resources={resources}"])

    def _start(self, name: str, args: list[str]) -> None:
        # Three tries: a node that cannot start or register within Ray's fixed 30 s (a loaded
        # machine) exits, and is started again.
        for _ in range(3):
            self.nodes[name] = _ray_start(args, self.logs / f"{name}.log")
            if _wait_for_nodes(self.address, len(self.nodes), self.procs, self.logs, fail=False):
                return
            _stop(self.nodes.pop(name))
        _wait_for_nodes(self.address, len(self.nodes) + 1, self.procs, self.logs)

    def lose(self, name: str) -> None:
        """The node goes away at once, as a reclaimed spot instance does: no drain, no goodbye."""
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes.pop(name).wait()
        _wait_for_nodes(self.address, len(self.nodes), self.procs, self.logs)  # until the GCS has seen it go

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        subprocess.run(["rm", "-rf", self.temp])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The cluster with two nodes offering each custom resource: ``gen`` (generate actors, judge
    replicas) on gen-1 and gen-2, ``trn`` (train workers) on trn-1 and trn-2."""
    logs = tmp_path_factory.mktemp("cluster-logs")
    cluster = Cluster(logs)
    try:
        cluster.head()
        for name in NODES:
            cluster.join(name)
        yield cluster
    finally:
        cluster.stop()


def _wait_for_nodes(address: str, n: int, procs, logs: Path, timeout: float = 240, fail: bool = True) -> bool:
    code = (f"import ray; ray.init(address={address!r}, logging_level='ERROR'); "
            "print(sum(1 for x in ray.nodes() if x['Alive']))")
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:  # ray.init waits without end for a head that died while it connected
            done = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            continue
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


def _node_names(dashboard: str) -> dict[str, str]:
    """Node id -> its name in NODES ("head" for the head), dead nodes included."""
    from ray.util.state import list_nodes

    nodes = list_nodes(address=dashboard, detail=True)
    return {n.node_id: next((k for k in NODES if k in n.resources_total), "head") for n in nodes}


KINDS = {"RevisionActor": "generate", "RayTrainWorker": "train", "JudgeDeployment": "judge"}


def _placed(dashboard: str, alive: bool = False) -> dict[str, set[str]]:
    """Kind of work -> the nodes (names) its actors ran on: dead actors included unless ``alive``."""
    from ray.util.state import list_actors

    where = _node_names(dashboard)
    out: dict[str, set[str]] = {kind: set() for kind in KINDS.values()}
    for actor in list_actors(address=dashboard, detail=True, limit=10000, raise_on_missing_output=False):
        for marker, kind in KINDS.items():
            named = marker in actor.class_name or marker in (actor.repr_name or "") or marker in (actor.name or "")
            if named and (actor.state == "ALIVE" or not alive):
                out[kind].add(where.get(actor.node_id, "?"))
    return out


def test_run_places_every_stage_on_its_nodes_matches_one_node_and_survives_a_lost_node(cluster, tmp_path, tiny_eos, tiny_chat):
    address, dashboard = cluster.address, cluster.dashboard
    models = [f"model.path={tiny_eos}", f"judge.model.path={tiny_chat}"]
    multi = _cli("run", "configs/quickstart.yaml", *models, *SMALL, *PLACED, f"output_dir={tmp_path / 'multi'}",
                 f"runtime.address={address}")
    assert multi.returncode == 0, multi.stdout[-3000:] + multi.stderr[-3000:]

    placed = {kind: {name.split("-")[0] for name in names} for kind, names in _placed(dashboard).items()}
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
    _generate_survives_a_lost_node(cluster, [*models, *SMALL, *PLACED], tmp_path / "lost", rows[1])

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
    address = cluster.address
    started = time.time()
    done = _cli("generate", "configs/quickstart.yaml", f"model.path={tiny_base}", "data.limit=2",
                "generate.resources={tpu: 1}", "runtime.placement_timeout_s=5", f"runtime.address={address}",
                f"output_dir={tmp_path}", timeout=300)
    assert done.returncode == 2
    err = done.stderr.strip().splitlines()
    assert err[-1].startswith("cai-ray: error: generate") and "'tpu'" in err[-1] and "waited 5s" in err[-1]
    assert time.time() - started < 120
    assert not list((tmp_path / "generate").glob("*/chains/part-*"))



def _generate_survives_a_lost_node(cluster: Cluster, args: list[str], out: Path, clean: list[dict]) -> None:
    """A gen node is lost while both actors hold a batch: generate finishes on the other node, every
    id once with the chains of the clean run, and the rows Ray redid are reported."""
    proc = subprocess.Popen([sys.executable, "-m", "cai_ray", "generate", "configs/quickstart.yaml", *args,
                             f"output_dir={out}", f"runtime.address={cluster.address}"],
                            cwd=ROOT, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline, where, seen = time.time() + 600, set(), None
    # Both actors up (Ray has put them on both gen nodes so far; if on one, that one goes).
    while time.time() < deadline and proc.poll() is None and len(where) < 2 and time.time() - (seen or 1e12) < 5:
        where = _placed(cluster.dashboard, alive=True)["generate"]
        seen = seen or (time.time() if where else None)
        time.sleep(0.5)
    assert proc.poll() is None and not list(out.glob("generate/*/manifest.json")), "generate ended before the loss"
    victim = sorted(where)[0]
    cluster.lose(victim)
    try:
        _, err = proc.communicate(timeout=900)
    finally:
        cluster.join(victim)
    assert proc.returncode == 0, err[-3000:]
    (folder,) = (out / "generate").iterdir()
    table = pq.read_table(folder / "chains").sort_by("id").select(["id", "initial", "rounds", "final"])
    assert table.to_pylist() == clean                      # every id once, as the run without a loss wrote it
    manifest = json.loads((folder / "manifest.json").read_text())
    assert 0 <= manifest["redone_rows"] <= 2 and manifest["duplicate_rows"] == 0  # at most the victim's batch
    print(f"lost {victim}: generate finished on the other gen node, {manifest['redone_rows']} rows redone")
