"""Stages composed: ``run`` (the whole pipeline) and ``sweep`` (DPO data size x seeds).

Like the CLI, and unlike every component, this module may import stages: it
is the one place that chains them.  Stages never import each other.  Every
stage returns its saved manifest when its output for the config already
exists, so rerunning an interrupted pipeline or sweep skips finished work and
resumes the first unfinished stage.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq

from cai_ray import console
from cai_ray.config import (STAGE_SECTIONS, ArmConfig, Config, EvalSetConfig, IterateConfig, stage_dir,
                            stage_hash, to_dict)
from cai_ray.evaluation.rating import judge_scope, judge_starts
from cai_ray.evaluation.sets import load_eval_sets
from cai_ray.tracking import Store, flatten, stage_run, write_atomic

PIPELINE = ("generate", "sft", "dpo", "evaluate")
SWEEP_METRICS = ("asr", "asr_keyword", "over_refusal", "helpfulness")
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


def stop_reason(it: IterateConfig, prev: dict, cur: dict) -> str | None:
    """Why no further iteration should run after the policy with metrics ``cur`` (None: go on).

    The harm metric must fall by at least iterate.min_improvement, or by less but with intervals
    that no longer overlap; an undefined metric stops (nothing to compare), as does a cost past its
    limit.  Both policies' numbers come from the same eval sets, so this is model selection on them:
    publish on a set the stop rule never saw.
    """
    before, now = _value(prev, it.metric), _value(cur, it.metric)
    if before is None or now is None:
        return f"{it.metric} is undefined (n/a), so iterations cannot be compared"
    a, b = prev[it.metric], cur[it.metric]
    overlap = None in (a["lo"], b["lo"]) or (b["lo"] <= a["hi"] and a["lo"] <= b["hi"])
    if before - now < it.min_improvement and overlap:
        return (f"{it.metric} fell by {before - now:+.3f} < iterate.min_improvement={it.min_improvement} "
                f"with overlapping intervals")
    refusal, helpful = _value(cur, it.over_refusal_metric), _value(cur, it.helpfulness_metric)
    if it.max_over_refusal is not None and refusal is not None and refusal > it.max_over_refusal:
        return f"{it.over_refusal_metric} {refusal:.3f} > iterate.max_over_refusal={it.max_over_refusal}"
    if it.min_helpfulness is not None and helpful is not None and helpful < it.min_helpfulness:
        return f"{it.helpfulness_metric} {helpful:.2f} < iterate.min_helpfulness={it.min_helpfulness}"
    return None


def _iterate(store: Store, cfg: Config, results: dict) -> dict:
    """Iterations 2..N, each a child run: label samples from the last policy, DPO starts from it and
    keeps it as the reference, evaluate scores the new policy; early stop after any iteration."""
    report = json.loads((Path(results["evaluate"]["output"]) / "report.json").read_text())
    curve = [report["arms"]["sft"]["metrics"], report["arms"]["dpo"]["metrics"]]
    policies = [results["sft"]["adapter"], results["dpo"]["adapter"]]
    loaded = _stage("evaluate").load_sets(cfg)
    stop = stop_reason(cfg.iterate, curve[0], curve[1])
    while stop is None and len(curve) <= cfg.iterate.iterations:
        k = len(curve)
        step = copy.deepcopy(cfg)
        step.name, step.label.policy, step.dpo.sft_adapter = f"{cfg.name}-it{k}", policies[-1], policies[-1]
        with stage_run(store, step.name, {"stage": "iteration", "iteration": k}) as it_store:
            _child(it_store, step, "label", f"{step.name}-label")
            dpo = _child(it_store, step, "dpo", f"{step.name}-dpo")
            curve.append(_evaluate(it_store, step, f"{step.name}-evaluate", ArmConfig(name=f"it{k}",
                                                                                     adapter=dpo["adapter"]), loaded))
        policies.append(dpo["adapter"])
        stop = stop_reason(cfg.iterate, curve[-2], curve[-1])
    _log_iterations(store, cfg.iterate, curve, stop)
    if stop:
        console.say(f"run: stopped after iteration {len(curve) - 1} of {cfg.iterate.iterations}: {stop}")
    return {"iterations_run": len(curve) - 1, "stop_reason": stop or "all iterations ran", "policy": policies[-1]}


def _log_iterations(store: Store, it: IterateConfig, curve: list[dict], stop: str | None) -> None:
    """The per-iteration curve on the parent run: metrics by step (0 = the SFT policy) and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = dict.fromkeys((it.metric, it.over_refusal_metric, it.helpfulness_metric))
    for k, metrics in enumerate(curve):
        values = {}
        for n in names:
            entry = metrics.get(n) or {}
            values.update({f"iteration/{n}": _value(metrics, n), f"iteration/{n}_lo": entry.get("lo"),
                           f"iteration/{n}_hi": entry.get("hi")})
        store.log_metrics(values, step=k)
    store.set_tags({"iterate.stopped": stop or "all iterations ran", "iterate.iterations_run": len(curve) - 1})
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4))
    for ax, name in zip(axes, names):
        shown = [(k, m[name]) for k, m in enumerate(curve) if _value(m, name) is not None]
        ys = [_value({name: e}, name) for _, e in shown]
        err = [[y - (e["lo"] if e["lo"] is not None else y) for (_, e), y in zip(shown, ys)],
               [(e["hi"] if e["hi"] is not None else y) - y for (_, e), y in zip(shown, ys)]]
        ax.errorbar([k for k, _ in shown], ys, yerr=err, marker="o", capsize=3)
        ax.set_xlabel("iteration (0 = SFT policy)")
        ax.set_title(name)
    fig.tight_layout()
    store.log_figure(fig, "iterations.png")
    plt.close(fig)


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


def _evaluate(parent: Store, cfg: Config, name: str, arm: ArmConfig, loaded: tuple, **tags) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.evaluate.arms = [arm]
    result = _child(parent, cfg, "evaluate", name, {"loaded": loaded}, **tags)
    report = json.loads((Path(result["output"]) / "report.json").read_text())
    return report["arms"][arm.name]["metrics"]


def _dpo_point(parent: Store, cfg: Config, sft_adapter: str, subset: Path, size: int, seed: int,
               generate_run: str) -> tuple[Config, dict, dict]:
    point = _point_config(cfg, sft_adapter, subset, size, seed)
    tags = {"size": size, "seed": seed, "generate_run": generate_run, "pairs": cfg.dpo.pairs}
    return point, tags, _child(parent, point, "dpo", f"{point.name}-dpo", **tags)


def _value(metrics: dict, name: str) -> float | None:
    entry = metrics.get(name) or {}
    return entry.get("rate", entry.get("mean"))


def log_sweep(store: Store, points: list[dict], baseline: dict, names=SWEEP_METRICS) -> list[dict]:
    """Mean and interval over seeds per size, as an MLflow table and a log-scale plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cai_ray.stats import summarize_over_seeds

    rows = []
    for size in sorted({p["size"] for p in points}):
        row = {"pairs": size, "seeds": sum(p["size"] == size for p in points)}
        for name in names:
            values = [v for p in points if p["size"] == size and (v := _value(p["metrics"], name)) is not None]
            # One seed has no spread: its interval is left empty rather than NaN.
            stats = summarize_over_seeds(values) if values else (None, None, None)
            mean, lo, hi = (None if x is None or math.isnan(x) else float(x) for x in stats)
            row.update({name: mean, f"{name}_lo": lo, f"{name}_hi": hi})
            row[f"sft_{name}"] = _value(baseline, name)
        rows.append(row)
    store.log_table({k: [r[k] for r in rows] for k in rows[0]}, "sweep_summary.json")
    # The same curve in MLflow's chart view, where the parent run is what shows: step = pairs.
    for row in rows:
        store.log_metrics({f"sweep/{name}": row[name] for name in names}, step=row["pairs"])
    # Two columns: MLflow's artifact view shrinks a wide figure to fit its pane.
    cols = min(2, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(6 * cols, 4 * -(-len(names) // cols)),
                             squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.set_visible(False)
    for ax, name in zip(axes.flat, names):
        shown = [r for r in rows if r[name] is not None]
        if not shown:  # said on the plot, not left as empty axes
            ax.text(0.5, 0.5, "no rated responses\n(the evaluate runs' failure tables say why)",
                    ha="center", va="center", transform=ax.transAxes)
        ys = [r[name] for r in shown]
        below = [r[name] - (r[f"{name}_lo"] if r[f"{name}_lo"] is not None else r[name]) for r in shown]
        above = [(r[f"{name}_hi"] if r[f"{name}_hi"] is not None else r[name]) - r[name] for r in shown]
        ax.errorbar([r["pairs"] for r in shown], ys, yerr=[below, above], marker="o", capsize=3,
                    label="SFT + DPO (mean over seeds)")
        base = baseline.get(name) or {}
        if base.get("lo") is not None and base.get("hi") is not None:
            ax.axhspan(base["lo"], base["hi"], alpha=0.2, color="grey", label="SFT only (95% CI)")
        ax.set_xscale("log")
        ax.set_xlabel("preference pairs")
        ax.set_title(name)
        ax.legend(fontsize=8)
    fig.tight_layout()
    store.log_figure(fig, "sweep.png")
    plt.close(fig)
    return rows


def sweep_sizes(requested: list[int], available: int) -> tuple[list[int], dict[int, int]]:
    """The sizes to train, and each requested size larger than the pairs available -> what it became.
    A clipped size is trained once at ``available``, never as a silent duplicate of another point."""
    sizes = sorted({min(s, available) for s in requested}) if available else []
    return sizes, {s: available for s in requested if s > available}


def sweep(cfg: Config, store: Store) -> dict:
    """DPO + evaluate on nested pair subsets x seeds, over one generation pass and one SFT checkpoint."""
    cfg = _resumable(cfg)
    generate = _child(store, cfg, "generate", f"{cfg.name}-generate")
    sft = _child(store, cfg, "sft", f"{cfg.name}-sft")
    if cfg.dpo.pairs != "revisions":
        _child(store, cfg, "label", f"{cfg.name}-label")
    from cai_ray.train.sources import dpo_source, fingerprint

    # The points' DPO reads the subsets; the full set is the one dpo.pairs names.
    pairs = Path(dpo_source(dataclasses.replace(cfg, dpo=dataclasses.replace(cfg.dpo, data=None))))
    available = pq.read_metadata(pairs).num_rows
    sizes, clipped = sweep_sizes(cfg.sweep.sizes, available)
    if not sizes:
        raise RuntimeError(f"sweep: the generate stage produced no pairs ({pairs})")
    # Subsets are cut from one pair file: name their folder by it (as before for revision pairs).
    source = Path(generate["output"]).name if cfg.dpo.pairs == "revisions" \
        else f"{cfg.dpo.pairs}-{fingerprint(str(pairs))[:12]}"
    root = stage_dir(cfg, "generate").parent.parent / "sweep" / source
    jobs = [(n, path, seed) for seed in cfg.sweep.seeds
            for n, path in nested_subsets(pairs, sizes, seed, root).items()]
    generate_run = generate.get("mlflow_run_id") or ""
    with ThreadPoolExecutor(max_workers=cfg.sweep.concurrency) as pool:
        trained = list(pool.map(lambda j: _dpo_point(store, cfg, sft["adapter"], j[1], j[0], j[2], generate_run),
                                jobs))
    # Evaluation after all training, so the judge never holds resources a DPO point waits for, and
    # start-up is paid once: the eval sets and the held-out check (a point's DPO data holds only
    # generation prompts, which the check already covers) and one judge app for every evaluation.
    loaded = _stage("evaluate").load_sets(cfg)
    starts = judge_starts()
    with judge_scope(), ThreadPoolExecutor(max_workers=cfg.sweep.concurrency) as pool:
        baseline = _evaluate(store, cfg, f"{cfg.name}-sft-baseline",
                             ArmConfig(name="sft", adapter=sft["adapter"]), loaded, size=0, seed=cfg.seed)
        metrics = list(pool.map(lambda t: _evaluate(store, t[0], f"{t[0].name}-evaluate",
                                                    ArmConfig(name="dpo", adapter=t[2]["adapter"]), loaded, **t[1]),
                                trained))
    points = [{"size": t[1]["size"], "seed": t[1]["seed"], "adapter": t[2]["adapter"], "metrics": m}
              for t, m in zip(trained, metrics)]
    summary = log_sweep(store, points, baseline, SWEEP_METRICS)
    if clipped:
        print(f"sweep: sizes {sorted(clipped)} clipped to the {available} pairs available", flush=True)
    write_atomic(root / "sweep.json", json.dumps({"sizes": sizes, "seeds": cfg.sweep.seeds, "points": points,
                                                  "baseline": baseline, "summary": summary,
                                                  "clipped": clipped, "available_pairs": available,
                                                  "judge_startups": judge_starts() - starts}, indent=2))
    return {"output": str(root), "sizes": sizes, "seeds": list(cfg.sweep.seeds), "points": len(points),
            "available_pairs": available}
