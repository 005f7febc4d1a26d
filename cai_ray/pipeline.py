"""Stages composed: ``run`` (the whole pipeline) and ``sweep`` (DPO data size x seeds).

Like the CLI, and unlike every component, this module may import stages: it
is the one place that chains them.  Stages never import each other.  Every
stage returns its saved manifest when its output for the config already
exists, so rerunning an interrupted pipeline or sweep skips finished work and
resumes the first unfinished stage.

Orchestration only: the sweep's analysis, answer and plot live in cai_ray/evaluation/sweep.py and
sweep_plot.py, the iteration stop rule and its selection split in cai_ray/evaluation/iterate.py.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from cai_ray import console
from cai_ray.config import STAGE_SECTIONS, ArmConfig, Config, EvalSetConfig, stage_folder, stage_hash, to_dict
from cai_ray.evaluation import sweep as sweep_analysis
from cai_ray.evaluation.iterate import judge_step, log_iterations, metrics_of, policy_rows
from cai_ray.evaluation.rating import judge_starts
from cai_ray.evaluation.sets import load_eval_sets
from cai_ray.files import write_atomic
from cai_ray.tracking import Store, flatten, stage_run

PIPELINE = ("generate", "sft", "dpo", "evaluate")
CAPABILITY_SET = "samples:capability_eval"


def check(cfg: Config) -> None:
    """Cheap input checks run by the CLI before any run or output exists: an eval set with no
    declared kind stops here, not after hours of generation and training."""
    load_eval_sets(cfg)


def _stage(name: str):
    return importlib.import_module(f"cai_ray.stages.{name}")


def stage_tags(cfg: Config, stage: str, **extra) -> dict:
    tags = {"stage": stage, **extra}
    if stage in STAGE_SECTIONS:
        tags["config_hash"] = stage_hash(cfg, stage)
    return tags


def _inputs(cfg: Config, stage: str) -> list[tuple[Path, str]]:
    """The files a training stage reads, to show as MLflow run inputs."""
    from cai_ray.train.sources import dpo_source, sft_sources

    if stage not in ("sft", "dpo"):
        return []
    sources = sft_sources(cfg) if stage == "sft" else {"dpo.data": dpo_source(cfg)}
    named = [(Path(__file__).parent / "data" / "samples" / f"{name[len('samples:'):]}.jsonl"
              if name.startswith("samples:") else Path(name), key.replace(".", "-"))
             for key, name in sources.items()]
    return [(path, dataset) for path, dataset in named if path.is_file()]


def stage_params(cfg: Config, stage: str, **point) -> dict:
    """A child run's params: the config sections that decide its stage, plus a sweep point's coordinates,
    so MLflow's runs table and charts compare runs by column."""
    full = to_dict(cfg)
    params = flatten({name: full[name] for name in STAGE_SECTIONS.get(stage, ())})
    if "size" in point:
        # dpo.pairs (revisions | feedback | both) where the config has it; revision pairs before that.
        source = getattr(cfg.dpo, "pairs", "revisions") if point["size"] else "none (SFT baseline)"
        params.update(size=point["size"], seed=point["seed"], pair_source=source)
    return params


def _child(parent: Store, cfg: Config, stage: str, name: str, run_kwargs: dict | None = None, **tags) -> dict:
    with console.stage(stage, name) as shown, stage_run(parent, name, stage_tags(cfg, stage, **tags)) as child:
        child.log_params(stage_params(cfg, stage, **tags))
        for path, dataset in _inputs(cfg, stage):
            child.log_dataset(path, dataset, "training")
        shown["result"] = _stage(stage).run(cfg, child, **(run_kwargs or {}))
        return shown["result"]


def _resumable(cfg: Config) -> Config:
    """A pipeline rerun continues its own unfinished training from the last checkpoint.

    Output folders are keyed by the config hash, so the run picked up is always this
    config's own; a single ``cai-ray sft`` still starts fresh unless train.resume=true.
    """
    cfg = copy.deepcopy(cfg)
    cfg.train.resume = True
    return cfg


def _with_capability_set(cfg: Config) -> Config:
    """Every run measures the alignment tax: the shipped capability set joins the eval sets if none is there."""
    _, sets = load_eval_sets(cfg)
    if any(s["kind"] == "capability" for s in sets.values()):
        return cfg
    print(f"run: adding {CAPABILITY_SET} to evaluate.sets (alignment tax: helpfulness and reference "
          f"log-likelihood per arm)", flush=True)
    cfg = copy.deepcopy(cfg)
    cfg.evaluate.sets.append(EvalSetConfig(source=CAPABILITY_SET))
    return cfg


def run(cfg: Config, store: Store) -> dict:
    """generate -> SFT -> DPO -> evaluate (base, SFT and DPO arms), one child run each."""
    cfg = _with_capability_set(_resumable(cfg))
    results = {"generate": _child(store, cfg, "generate", f"{cfg.name}-generate")}
    link = {"generate_run": results["generate"].get("mlflow_run_id") or ""}
    stages = ("sft", "dpo") if cfg.dpo.pairs == "revisions" else ("sft", "label", "dpo")
    for stage in stages:
        results[stage] = _child(store, cfg, stage, f"{cfg.name}-{stage}", **link)
    cfg = copy.deepcopy(cfg)
    if not any(a.adapter for a in cfg.evaluate.arms):
        # The default arms: the base model, then each adapter this run trained.
        cfg.evaluate.arms = [ArmConfig(name="base"), ArmConfig(name="sft", adapter=results["sft"]["adapter"]),
                             ArmConfig(name="dpo", adapter=results["dpo"]["adapter"])]
    results["evaluate"] = _child(store, cfg, "evaluate", f"{cfg.name}-evaluate")
    store.set_tags({"outputs": json.dumps({k: v.get("output") for k, v in results.items()})})
    summary = {stage: r.get("output") for stage, r in results.items()}
    if cfg.iterate.iterations > 1:
        summary.update(_iterate(store, cfg, results))
    return summary


def _iterate(store: Store, cfg: Config, results: dict) -> dict:
    """Iterations 2..N, each a child run: label samples from the last policy, DPO starts from it and
    keeps it as the reference, evaluate scores the new policy.  The stop rule reads the selection
    split (cai_ray/evaluation/iterate.py); the curve reported is the other split's."""
    share = cfg.evaluate.selection_share
    first = results["evaluate"]["output"]
    rows = [policy_rows(first, "sft", share), policy_rows(first, "dpo", share)]
    names, policies = ["sft", "dpo"], [results["sft"]["adapter"], results["dpo"]["adapter"]]
    loaded = _stage("evaluate").load_sets(cfg)
    stop = judge_step(cfg, rows[0], rows[1])
    while stop is None and len(rows) <= cfg.iterate.iterations:
        k = len(rows)
        step = copy.deepcopy(cfg)
        step.name, step.label.policy, step.dpo.sft_adapter = f"{cfg.name}-it{k}", policies[-1], policies[-1]
        with stage_run(store, step.name, {"stage": "iteration", "iteration": k}) as it_store:
            _child(it_store, step, "label", f"{step.name}-label")
            dpo = _child(it_store, step, "dpo", f"{step.name}-dpo")
            done = _evaluate(it_store, step, f"{step.name}-evaluate", ArmConfig(name=f"it{k}", adapter=dpo["adapter"]),
                             loaded)
        rows.append(policy_rows(done["output"], f"it{k}", share))
        names.append(f"it{k}")
        policies.append(dpo["adapter"])
        stop = judge_step(cfg, rows[-2], rows[-1])
    # The last policy the rule accepted: the one before a rejected step, else the last one.
    best = len(rows) - 2 if stop else len(rows) - 1
    curve = [metrics_of(cfg, r["report"], n) for r, n in zip(rows, names)]
    requests = {part: len({x["request_id"] for x in rows[0][part]}) for part in ("selection", "report")}
    log_iterations(store, cfg, curve, stop, names[best], requests)
    if stop:
        console.say(f"run: stopped after iteration {len(rows) - 1} of {cfg.iterate.iterations}: {stop}")
    console.say(f"run: best policy by the stop rule: {names[best]} ({policies[best]}); the rule read "
                f"{requests['selection']} selection requests, the iteration curve the other {requests['report']}")
    return {"iterations_run": len(rows) - 1, "stop_reason": stop or "all iterations ran",
            "best_policy": names[best], "policy": policies[best]}


def nested_subsets(pairs: Path, sizes: list[int], seed: int, out: Path) -> dict[int, Path]:
    """Files of the first n pairs in a seed-fixed order, so each size contains the smaller ones."""
    table = pq.read_table(pairs)
    ids = table.column("id").to_pylist()
    order = sorted(range(len(ids)), key=lambda i: hashlib.sha256(f"{seed}\x00{ids[i]}".encode()).digest())
    files = {}
    for n in sizes:
        path = out / f"seed{seed}" / f"pairs-{n}.parquet"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            pq.write_table(table.take(order[:n]), tmp)
            os.replace(tmp, path)
        files[n] = path
    return files


def _point_config(cfg: Config, sft_adapter: str, subset: Path, size: int, seed: int) -> Config:
    point = copy.deepcopy(cfg)
    point.name = f"{cfg.name}-n{size}-s{seed}"
    point.seed = seed
    point.dpo.data = str(subset)
    # One SFT checkpoint serves every point: pin it rather than re-deriving it per seed.
    point.dpo.sft_adapter = sft_adapter
    return point


def _evaluate(parent: Store, cfg: Config, name: str, arms: ArmConfig | list[ArmConfig], loaded: tuple,
              **tags) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.evaluate.arms = arms if isinstance(arms, list) else [arms]
    return _child(parent, cfg, "evaluate", name, {"loaded": loaded}, **tags)


def _dpo_point(parent: Store, cfg: Config, sft_adapter: str, subset: Path, size: int, seed: int,
               generate_run: str) -> tuple[Config, dict, dict]:
    point = _point_config(cfg, sft_adapter, subset, size, seed)
    tags = {"size": size, "seed": seed, "generate_run": generate_run, "pairs": cfg.dpo.pairs}
    return point, tags, _child(parent, point, "dpo", f"{point.name}-dpo", **tags)


def sweep_sizes(requested: list[int], available: int) -> tuple[list[int], dict[int, int]]:
    """The sizes to train, and each requested size larger than the pairs available -> what it became.
    A clipped size is trained once at ``available``, never as a silent duplicate of another point."""
    sizes = sorted({min(s, available) for s in requested}) if available else []
    return sizes, {s: available for s in requested if s > available}


def _sfts(store: Store, cfg: Config) -> list[dict]:
    """One SFT per sweep.sft_seeds entry (the seed its training draws from)."""
    out = []
    for seed in cfg.sweep.sft_seeds:
        step = copy.deepcopy(cfg)
        step.seed = seed
        name = f"{cfg.name}-sft" if len(cfg.sweep.sft_seeds) == 1 else f"{cfg.name}-sft-s{seed}"
        out.append({"seed": seed, "arm": f"sft-s{seed}", **_child(store, step, "sft", name, size=0, seed=seed)})
    return out


def _cost(cfg: Config, trained: dict, evaluate_share: dict) -> dict:
    """A point's measured cost: its DPO fit (from the manifest, so a reused point keeps it) plus its share
    of the one evaluate."""
    manifest = json.loads((Path(trained["output"]) / "manifest.json").read_text())
    # The fit's wall time: start-up to the engine ready (workers, model, DPO reference pass), then the steps.
    wall = float(manifest.get("train_seconds") or 0) + float((manifest.get("startup_s") or {}).get("engine_ready", 0))
    dpo = sweep_analysis.stage_cost(wall, sweep_analysis.train_devices(cfg), cfg.estimate.device_hour_cost)
    return {k: dpo[k] + evaluate_share[k] for k in dpo} | {"dpo": dpo, "evaluate_share": evaluate_share}


def _point_runs(store: Store, cfg: Config, report: dict, points: list[dict], sfts: list[dict]) -> None:
    """One run per evaluated arm, as users browse them: the point's coordinates as params, its levels
    and its paired difference from SFT-only (same seed's SFT) as metrics.  Tagged stage=evaluate (with
    its arm and the evaluate run it views) so `cai-ray ui`'s evaluate filter shows the points side by side."""
    diffs = {(c["a"], c["b"]): c["differences"] for c in report["comparisons"]}
    for p in [{**s, "size": 0} for s in sfts] + points:
        sft_arm = sfts[p["seed_index"] % len(sfts)]["arm"] if p["size"] else None
        tags = {"stage": "evaluate", "size": p["size"], "seed": p["seed"], "arm": p["arm"],
                "view": "one arm of the sweep's evaluate", "evaluate_run": report.get("mlflow_run_id") or ""}
        with stage_run(store, f"{cfg.name}-{p['arm']}", tags) as run:
            run.log_params(stage_params(cfg, "dpo", size=p["size"], seed=p["seed"]))
            metrics = report["arms"][p["arm"]]["metrics"]
            values = {k: e.get("rate", e.get("mean")) for k, e in metrics.items()}
            for k, d in (diffs.get((sft_arm, p["arm"])) or {}).items():
                values.update({f"diff_{k}": d["diff"], f"diff_{k}_lo": d["lo"], f"diff_{k}_hi": d["hi"]})
            values.update({f"cost_{k}": v for k, v in (p.get("cost") or {}).items() if isinstance(v, float)})
            run.log_metrics({k: v for k, v in values.items() if v is not None})


def _log_answer(store: Store, cfg: Config, analysis: dict) -> None:
    """The parent run: the table, the curve at step = pairs, the answer as a tag and metrics, the plot."""
    from cai_ray.evaluation.sweep_plot import log_sweep_figure

    rows = sweep_analysis.flat(analysis)
    store.log_table({k: [r.get(k) for r in rows] for k in rows[0]}, "sweep_summary.json")
    for row in rows:  # MLflow's chart view shows the parent run: step = pairs
        store.log_metrics({f"sweep/{k}": v for k, v in row.items() if isinstance(v, (int, float))
                           and k not in ("pairs", "seeds") and not isinstance(v, bool)}, step=row["pairs"])
    answer, power = analysis["answer"], analysis["power"]
    store.set_tags({"sweep.answer": answer["line"][:5000], "sweep.scheme": analysis["scheme"][:5000],
                    "sweep.variance_sampled": "; ".join(analysis["variance"]["sampled"]),
                    "sweep.variance_fixed": "; ".join(analysis["variance"]["fixed"])})
    store.log_metrics({k: v for k, v in {"answer/beats_from_pairs": answer["beats_from"],
                                         "answer/underpowered": float(answer["underpowered"]),
                                         "answer/mde": power.get("mde")}.items() if v is not None})
    log_sweep_figure(store, analysis, cfg.sweep)


def sweep(cfg: Config, store: Store) -> dict:
    """DPO on nested pair subsets x seeds over one generation pass and sweep.sft_seeds SFT runs; every
    point and SFT-only evaluated as arms of one evaluate; each size compared with SFT-only."""
    cfg = _resumable(cfg)
    generate = _child(store, cfg, "generate", f"{cfg.name}-generate")
    sfts = _sfts(store, cfg)
    # The first SFT is the reference everything else derives from (label's policy, pair source).
    cfg = copy.deepcopy(cfg)
    cfg.dpo.sft_adapter = sfts[0]["adapter"]
    if cfg.dpo.pairs != "revisions":
        _child(store, cfg, "label", f"{cfg.name}-label")
    from cai_ray.train.sources import dpo_source, fingerprint

    # The points' DPO reads the subsets; the full set is the one dpo.pairs names.
    pairs = Path(dpo_source(dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, data=None))))
    available = pq.read_metadata(pairs).num_rows
    sizes, clipped = sweep_sizes(cfg.sweep.sizes, available)
    if not sizes:
        raise RuntimeError(f"sweep: the generate stage produced no pairs ({pairs})")
    # Subsets are cut from one pair file: their folder is named by it (revision pairs by the generate hash).
    root = stage_folder(cfg, "sweep", pairs_sha256=None if cfg.dpo.pairs == "revisions" else fingerprint(str(pairs)))
    # DPO seed i starts from SFT seed i mod len(sft_seeds).
    jobs = [(n, path, seed, i) for i, seed in enumerate(cfg.sweep.seeds)
            for n, path in nested_subsets(pairs, sizes, seed, root).items()]
    generate_run = generate.get("mlflow_run_id") or ""
    with ThreadPoolExecutor(max_workers=cfg.sweep.concurrency) as pool:
        trained = list(pool.map(lambda j: _dpo_point(store, cfg, sfts[j[3] % len(sfts)]["adapter"], j[1], j[0],
                                                     j[2], generate_run), jobs))
    points = [{"size": t[1]["size"], "seed": t[1]["seed"], "seed_index": j[3], "arm": f"n{t[1]['size']}-s{t[1]['seed']}",
               "adapter": t[2]["adapter"], "dpo_output": t[2]["output"]} for j, t in zip(jobs, trained)]
    # One evaluate after all training, every point and SFT-only as its arms: the same requests,
    # sampling seeds and judge for all, so each size pairs with SFT-only request by request.
    arms = [ArmConfig(name=s["arm"], adapter=s["adapter"]) for s in sfts] + \
        [ArmConfig(name=p["arm"], adapter=p["adapter"]) for p in points]
    starts = judge_starts()
    done = _evaluate(store, cfg, f"{cfg.name}-evaluate", arms, _stage("evaluate").load_sets(cfg))
    report = json.loads((Path(done["output"]) / "report.json").read_text())
    rows = pq.read_table(Path(done["output"]) / "ratings.parquet").to_pylist()
    wall = float(report.get("wall_seconds") or 0.0)
    share = sweep_analysis.stage_cost(wall / len(arms), sweep_analysis.evaluate_devices(cfg),
                                      cfg.estimate.device_hour_cost)
    for p, t in zip(points, trained):
        p["cost"] = _cost(cfg, t[2], share)
        p["metrics"] = report["arms"][p["arm"]]["metrics"]
    e = cfg.evaluate
    analysis = sweep_analysis.summarize(rows, report, [s["arm"] for s in sfts], points, cfg.sweep,
                                        e.sampling.temperature, e.samples_per_prompt, e.bootstrap, cfg.seed)
    _point_runs(store, cfg, report, points, sfts)
    _log_answer(store, cfg, analysis)
    if clipped:
        print(f"sweep: sizes {sorted(clipped)} clipped to the {available} pairs available", flush=True)
    shared = {s["arm"]: _cost(cfg, s, sweep_analysis.stage_cost(0.0, 0.0, 0.0)) for s in sfts}
    write_atomic(root / "sweep.json", json.dumps({
        "answer": analysis["answer"]["line"], "sizes": sizes, "seeds": cfg.sweep.seeds,
        "sft_seeds": cfg.sweep.sft_seeds, "points": points, "analysis": analysis, "sft_cost": shared,
        "baseline": {s["arm"]: report["arms"][s["arm"]]["metrics"] for s in sfts}, "evaluate": done["output"],
        "clipped": clipped, "available_pairs": available, "judge_startups": judge_starts() - starts},
        indent=2, default=str))
    console.say(sweep_analysis.table_text(analysis))
    console.say(f"sweep: {analysis['answer']['line']}")
    console.say(f"sweep: variance sampled: {'; '.join(analysis['variance']['sampled'])}; held fixed: "
                f"{'; '.join(analysis['variance']['fixed'])}")
    return {"output": str(root), "sizes": sizes, "seeds": list(cfg.sweep.seeds), "points": len(points),
            "available_pairs": available, "answer": analysis["answer"]["line"]}
