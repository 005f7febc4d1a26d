"""``cai-ray judge --check | --agreement``: the judge measured before its verdicts are trusted.

One command with one flag per mode (``MODES``); ``--agreement`` compares the judge with people's
feedback on an evaluate run's judge traces in MLflow (see ``agreement``); ``--check`` scores the shipped check set and
``judge.check_data`` (cai_ray/evaluation/judge_check.py): accuracy per rubric with a Wilson
interval, a confusion table and the parse-failure share.  ``evaluate`` runs the same check as a
child run first (``judge.check``) and marks a failing rubric's column SUSPECT.
"""

from __future__ import annotations

from cai_ray.config import Config
from cai_ray.tracking import Store

# The modes, each a --flag of the command (cli.JUDGE_MODES holds their help); one is given.
MODES = ("check", "agreement")


def check(cfg: Config) -> None:
    """Before any MLflow run: a judge model is named and resolvable, the check rows are valid."""
    from cai_ray.engines.base import resolve_model_path
    from cai_ray.evaluation.judge_check import load_check_rows

    if not cfg.judge.model.path:
        raise ValueError("judge.model.path is empty; set it to the judge model (folder, hub id or .gguf file)")
    load_check_rows(cfg.judge)
    resolve_model_path(cfg.judge.model)


def run(cfg: Config, store: Store, **modes: bool) -> dict:
    chosen = [m for m, on in modes.items() if on]
    if chosen != ["check"]:
        raise ValueError(f"cai-ray judge needs one mode: {', '.join('--' + m for m in MODES)}")
    from cai_ray.evaluation.judge_check import run_judge_check

    summary = run_judge_check(cfg, store)
    out = {"stage": "judge-check", "output": summary["output"], "rows": summary["rows"]}
    for metric, c in summary["metrics"].items():
        out[f"{metric}/{c['rubric']}"] = (f"{c['accuracy']:.2f} [{c['lo']:.2f},{c['hi']:.2f}] {c['correct']}/{c['n']}"
                                          f", parse fail {c['parse_failures']}/{c['n']}"
                                          + (" SUSPECT" if c["suspect"] else ""))
    out["suspect"] = summary["suspect"]
    return out


HOW_TO = ("open the run's traces in `cai-ray ui CONFIG` (Traces tab, filter tags.review = 'yes'), and on a "
          "trace add feedback named after its metric tag (asr / over_refusal: yes or no; helpfulness, "
          "cap_helpfulness, style: 1-5)")


def agreement(cfg: Config, run_id: str | None = None) -> dict:
    """``--agreement``: human feedback on the judge traces of the newest evaluate run (or ``run_id``),
    printed per rubric and arm (evaluation/agreement.py) and logged to that run as metrics and
    ``evaluate/agreement.json``; the evaluate folder gets ``agreement.json``, so its report shows it.
    Opens no MLflow run of its own."""
    import json
    from pathlib import Path

    from cai_ray.evaluation import agreement as agree
    from cai_ray.files import write_atomic
    from cai_ray.tracking import MlflowStore, deleted_runs, run_traces

    if not cfg.tracking.enabled:
        raise ValueError("tracking.enabled=false: judge --agreement reads human feedback from MLflow")
    uri = cfg.tracking_uri
    run_id, traces = run_traces(uri, run_id, cfg.tracking.experiment)
    assessed = {a.run_id for t in traces for a in (t.info.assessments or []) if a.run_id}
    items, skipped = agree.reviewed(traces, run_id, deleted_runs(uri, assessed))
    if not items:
        note = f" ({', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
        print(f"judge --agreement: no usable human feedback on the {len(traces)} judge traces of run {run_id}"
              f"{note}; to add some, {HOW_TO}", flush=True)
        return {"run": run_id, "traces": len(traces), "reviewed": 0}
    result = {"run": run_id, "traces": len(traces), **agree.summarize(items, skipped)}
    print(agree.text(result), flush=True)
    store = MlflowStore(uri, run_id)
    store.log_metrics(agree.flat_metrics(result))
    store.log_text(json.dumps(result, indent=2), "evaluate/agreement.json")
    output = store.client.get_run(run_id).data.tags.get("output")
    if output and Path(output).is_dir():
        write_atomic(Path(output) / "agreement.json", json.dumps(result, indent=2) + "\n")
    return {"run": run_id, "traces": len(traces), "reviewed": len(items)}
