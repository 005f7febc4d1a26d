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

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cai_ray import console
from cai_ray.config import Config, stage_folder, to_yaml
from cai_ray.constitution.chain import row_seed
from cai_ray.evaluation import render
from cai_ray.evaluation.agreement import text as agreement_text
from cai_ray.evaluation.arms import generate_arms, resolve_arms
from cai_ray.evaluation.judge_check import load_check_rows, run_judge_check
from cai_ray.evaluation.rating import judge_scope, rate
from cai_ray.evaluation.report import build_report
from cai_ray.evaluation.sets import check_heldout, load_eval_sets
from cai_ray.evaluation.traces import trace_records
from cai_ray.files import write_atomic
from cai_ray.locks import hold
from cai_ray.parts import write_manifest
from cai_ray.tracking import Store, stage_run

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
    store.set_tags({"stage": "evaluate", "config_hash": out.name, "output": str(out)})
    store.log_metrics(render.flat_metrics(report))
    # One row per response with each rater's verdict and the judge's raw text: MLflow's table view.
    store.log_table(render.response_table(rows), "evaluate/responses.json")
    store.log_figure(fig, "evaluate/chart.png")
    for name in ("report.json", "config.yaml"):
        store.log_artifact(out / name, "evaluate")


def _trace(cfg: Config, store: Store, rows: list[dict]) -> dict:
    """Judge calls as MLflow traces for people to review (evaluate.trace); what it cost."""
    started = time.monotonic()
    records = trace_records(rows, cfg.evaluate.trace, cfg.evaluate.review_sample, cfg.seed)
    logged = store.log_traces(records) if records else 0
    return {"mode": cfg.evaluate.trace, "logged": logged or 0,
            "review": sum(r["tags"]["review"] == "yes" for r in records),
            "seconds": round(time.monotonic() - started, 2)}


def _with_agreement(out: Path, text: str) -> str:
    """The report text, and people's agreement with the judge once `judge --agreement` wrote it."""
    path = out / "agreement.json"
    return f"{text}\n{agreement_text(json.loads(path.read_text()))}" if path.is_file() else text


def _summary(report: dict) -> dict:
    """The few lines the CLI prints after the one-screen report."""
    out = {"stage": "evaluate", "output": report["output"], "mlflow_run_id": report.get("mlflow_run_id")}
    for name, arm in report["arms"].items():
        for key in ("asr", "asr_keyword"):
            if key in arm["metrics"]:
                out[f"{name}/{key}"] = render.format_entry(arm["metrics"][key], True)
    out["unreliable_arms"] = [name for name, arm in report["arms"].items() if arm["problems"]]
    out["invalid_comparisons"] = sum(1 for c in report["comparisons"] if not c["valid"])
    if report.get("judge_check"):
        out["judge_suspect"] = report["judge_check"]["suspect"]
    return out


def _header(cfg: Config, report: dict) -> str:
    sets = ", ".join(f"{n} ({s['kind']}, {s['requests']} requests)" for n, s in report["sets"].items())
    return (f"evaluate: {sets}; {cfg.evaluate.samples_per_prompt} sample(s) per prompt; judge "
            f"{cfg.judge.model.path} ({cfg.judge.model.role}, harm rubric {cfg.judge.harm_rubric})")


def budget_warning(cfg: Config) -> str | None:
    """One line when evaluate cuts replies shorter than the training targets were allowed to be."""
    budget = cfg.evaluate.sampling.max_new_tokens
    trained = [(k, s.max_new_tokens) for k, s in (("generate", cfg.generate.sampling), ("label", cfg.label.sampling))
               if budget < s.max_new_tokens and (k == "generate" or cfg.dpo.pairs != "revisions")]
    if not trained:
        return None
    key, cut = max(trained, key=lambda t: t[1])
    return (f"evaluate: warning: evaluate.sampling.max_new_tokens={budget} is below {key}.sampling.max_new_tokens="
            f"{cut}, where training targets were cut: replies the policy learned to finish will be counted "
            f"truncated; leave evaluate.sampling.max_new_tokens unset (it then follows generate) or raise it")


def check(cfg: Config) -> None:
    """Run by the CLI before any MLflow run or output exists: sets and their kinds, the judge's
    check rows, and a warning for an evaluate budget below the training targets' cut."""
    cfg.require("evaluate")
    load_eval_sets(cfg)
    if cfg.judge.check:
        load_check_rows(cfg.judge)
    warning = budget_warning(cfg)
    if warning:
        console.say(warning)


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
    out = stage_folder(cfg, "evaluate", arms=arms, items=items)
    if (out / "manifest.json").is_file():
        report = json.loads((out / "report.json").read_text())
        print(_with_agreement(out, render.summary_text(report, _header(cfg, report) + f" (finished earlier: {out})")))
        return _summary(report)
    with hold(out, cfg.runtime.lock_lease_s):
        return _evaluate(cfg, store, out, items, sets, train_checked, arms)


def _evaluate(cfg: Config, store: Store, out: Path, items: list, sets, train_checked, arms) -> dict:
    from cai_ray.runtime import init_ray

    started = time.monotonic()  # the evaluate's measured wall time, for the sweep's cost per point
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", to_yaml(cfg))
    e = cfg.evaluate
    work = [{**r, "sample": s, "seed": row_seed(e.sampling.seed, r["id"], "evaluate", s)}
            for r in items for s in range(e.samples_per_prompt)]
    init_ray(cfg)
    responses, engine_starts = generate_arms(cfg, arms, work, out / "responses")
    checked = None
    with judge_scope():  # the check and the rating share one judge start
        if cfg.judge.check:
            # The judge measured on labelled rows first; a rubric that fails is SUSPECT in the report.
            with stage_run(store, f"{cfg.name}-judge-check", {"stage": "judge-check"}) as child:
                checked = run_judge_check(cfg, child, brief=True)
        rows = rate(cfg, responses)
    report = build_report(rows, arms, e.max_share, e.min_rater_kappa, e.allow_mixed_formats, e.bootstrap, cfg.seed,
                          judge_check=checked)
    report.update(stage="evaluate", output=str(out), config_hash=out.name,
                  sets=sets, train_prompts_checked=train_checked, mlflow_run_id=store.run_id,
                  # Engines started per model: at most generate.actors each, however many arms.
                  engine_starts=engine_starts,
                  judge={"model": cfg.judge.model.path, "role": cfg.judge.model.role,
                         "harm_rubric": cfg.judge.harm_rubric},
                  judge_check=checked,
                  limits={"max_share": asdict(e.max_share), "min_rater_kappa": e.min_rater_kappa,
                          "min_accuracy": cfg.judge.min_accuracy},
                  wall_seconds=round(time.monotonic() - started, 1))
    _log(store, out, rows, report, _write_outputs(out, rows, report))
    traces = _trace(cfg, store, rows)
    summary = {**_summary(report), "traces": f"{traces['logged']} judge calls ({traces['review']} for review)"}
    write_manifest(out, {**summary, "rows": len(rows), "traces": traces})
    print(render.summary_text(report, _header(cfg, report)), flush=True)
    return summary
