"""Held-out evaluation of every arm: ASR, over-refusal, helpfulness and style, rated twice, over requests.

How to read the report: one block per kind of set with a row per arm and set; a cell is
`rate [95% interval] hits/rated`, the rate averaged over requests (a request's samples and
jailbreak templates count once) and the interval resampling requests. The judge's columns sit
beside a refusal-phrase rater's; their agreement is Cohen's kappa. `failures` shows the share of
responses that failed to generate, were empty, truncated or garbage, and of verdicts that did not
parse; past evaluate.max_share an arm is UNRELIABLE. Comparisons (b - a) are valid only for arms
with the same prompt format, sampling and failure shares.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cai_ray.config import Config, stage_dir, stage_hash, to_yaml
from cai_ray.constitution.chain import row_seed
from cai_ray.evaluation import render
from cai_ray.evaluation.arms import generate_arm, resolve_arms
from cai_ray.evaluation.rating import rate
from cai_ray.evaluation.report import build_report
from cai_ray.evaluation.sets import check_heldout, load_eval_sets
from cai_ray.locks import hold
from cai_ray.tracking import Store, write_atomic

RATING_COLUMNS = [
    ("arm", pa.string()), ("set", pa.string()), ("kind", pa.string()), ("id", pa.string()),
    ("request_id", pa.string()), ("sample", pa.int64()), ("prompt", pa.string()), ("request", pa.string()),
    ("response", pa.string()), ("finish_reason", pa.string()), ("completion_tokens", pa.int64()),
    ("gen_error", pa.string()), ("empty", pa.bool_()), ("truncated", pa.bool_()), ("garbage", pa.bool_()),
    ("flags", pa.string()), ("metric", pa.string()), ("rater", pa.string()), ("rubric", pa.string()),
    ("style", pa.string()), ("value", pa.float64()), ("score", pa.float64()), ("parse_ok", pa.bool_()),
    ("failed", pa.bool_()), ("raw", pa.string()), ("error", pa.string()), ("fields", pa.string())]


def _write_outputs(out: Path, rows: list[dict], report: dict):
    """ratings.parquet, report.json and chart.png, each renamed into place whole; returns the chart."""
    schema = pa.schema(RATING_COLUMNS)
    tmp = out / ".ratings.parquet.tmp"
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema), tmp)
    os.replace(tmp, out / "ratings.parquet")
    write_atomic(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    fig = render.chart(report)
    fig.savefig(out / ".chart.png.tmp", format="png", dpi=100)
    os.replace(out / ".chart.png.tmp", out / "chart.png")
    return fig


def _log(store: Store, out: Path, rows: list[dict], report: dict, fig) -> None:
    store.set_tags({"stage": "evaluate", "config_hash": out.name})
    store.log_metrics(render.flat_metrics(report))
    # One row per response with each rater's verdict and the judge's raw text: MLflow's table view.
    store.log_table(render.response_table(rows), "evaluate/responses.json")
    store.log_figure(fig, "evaluate/chart.png")
    for name in ("report.json", "config.yaml"):
        store.log_artifact(out / name, "evaluate")


def _summary(report: dict) -> dict:
    """The few lines the CLI prints after the one-screen report."""
    out = {"stage": "evaluate", "output": report["output"], "mlflow_run_id": report.get("mlflow_run_id")}
    for name, arm in report["arms"].items():
        for key in ("asr", "asr_keyword"):
            if key in arm["metrics"]:
                out[f"{name}/{key}"] = render.format_entry(arm["metrics"][key], True)
    out["unreliable_arms"] = [name for name, arm in report["arms"].items() if arm["problems"]]
    out["invalid_comparisons"] = sum(1 for c in report["comparisons"] if not c["valid"])
    return out


def _header(cfg: Config, report: dict) -> str:
    sets = ", ".join(f"{n} ({s['kind']}, {s['requests']} requests)" for n, s in report["sets"].items())
    return (f"evaluate: {sets}; {cfg.evaluate.samples_per_prompt} sample(s) per prompt; judge "
            f"{cfg.judge.model.path} ({cfg.judge.model.role}, harm rubric {cfg.judge.harm_rubric})")


def check(cfg: Config) -> None:
    """Run by the CLI before any MLflow run or output exists: sets and their kinds."""
    cfg.require("evaluate")
    load_eval_sets(cfg)


def load_sets(cfg: Config) -> tuple[list[dict], dict, int]:
    """Eval rows, per-set info, and how many training prompts the held-out check compared."""
    items, sets = load_eval_sets(cfg)
    return items, sets, check_heldout(cfg, items)


def prepare(cfg: Config, loaded: tuple | None = None) -> tuple[list[dict], dict, int, dict]:
    """Everything that can fail on bad input, before Ray or any write: sets (with kinds), the
    held-out check (or ``loaded``, its result for the same sets and training prompts), the arms
    and the judge's model."""
    from cai_ray.engines.base import resolve_model_path

    cfg.require("evaluate")
    items, sets, checked = loaded or load_sets(cfg)
    arms = resolve_arms(cfg)
    resolve_model_path(cfg.judge.model)  # a bad judge path fails here, not after generation
    return items, sets, checked, arms


def run(cfg: Config, store: Store, loaded: tuple | None = None) -> dict:
    """Held-out check, generation per arm, both raters, then the report; a finished config is not redone.

    ``loaded``: ``load_sets(cfg)`` done once by a caller evaluating many points on the same sets.
    """
    items, sets, train_checked, arms = prepare(cfg, loaded)
    upstream = (json.dumps(asdict(cfg.generate.quality), sort_keys=True),
                *(f"{n}:{a['adapter']}:{a['adapter_sha256']}" for n, a in arms.items()),
                hashlib.sha256("\n".join(sorted(f"{r['set']}:{r['id']}" for r in items)).encode()).hexdigest())
    out = stage_dir(cfg, "evaluate", upstream)
    if (out / "manifest.json").is_file():
        report = json.loads((out / "report.json").read_text())
        print(render.summary_text(report, _header(cfg, report) + f" (finished earlier: {out})"))
        return _summary(report)
    with hold(out, cfg.runtime.lock_lease_s):
        return _evaluate(cfg, store, out, upstream, items, sets, train_checked, arms)


def _evaluate(cfg: Config, store: Store, out: Path, upstream: tuple, items: list, sets, train_checked, arms) -> dict:
    from cai_ray.runtime import init_ray

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", to_yaml(cfg))
    e = cfg.evaluate
    work = [{**r, "sample": s, "seed": row_seed(e.sampling.seed, r["id"], "evaluate", s)}
            for r in items for s in range(e.samples_per_prompt)]
    init_ray(cfg)
    responses = [row for name, arm in arms.items() for row in generate_arm(cfg, name, arm, work)]
    rows = rate(cfg, responses)
    report = build_report(rows, arms, e.max_share, e.min_rater_kappa, e.allow_mixed_formats, e.bootstrap, cfg.seed)
    report.update(stage="evaluate", output=str(out), config_hash=stage_hash(cfg, "evaluate", upstream),
                  sets=sets, train_prompts_checked=train_checked, mlflow_run_id=store.run_id,
                  judge={"model": cfg.judge.model.path, "role": cfg.judge.model.role,
                         "harm_rubric": cfg.judge.harm_rubric},
                  limits={"max_share": asdict(e.max_share), "min_rater_kappa": e.min_rater_kappa})
    _log(store, out, rows, report, _write_outputs(out, rows, report))
    summary = _summary(report)
    write_atomic(out / "manifest.json", json.dumps({**summary, "rows": len(rows)}, indent=2) + "\n")
    print(render.summary_text(report, _header(cfg, report)), flush=True)
    return summary
