"""`cai-ray judge --agreement CONFIG [--run RUN_ID]`: the judge against people's feedback in MLflow.

Reads the human feedback on the judge traces of the newest evaluate run (or ``--run``), prints
the agreement per rubric and arm (see evaluation/agreement.py) and logs it to that run as
metrics and ``evaluate/agreement.json``; the evaluate stage folder gets ``agreement.json`` too,
so the evaluate report shows it.  Opens no MLflow run of its own.
"""
from __future__ import annotations

import json
from pathlib import Path

from cai_ray.config import Config
from cai_ray.evaluation import agreement
from cai_ray.tracking import MlflowStore, deleted_runs, run_traces, write_atomic

HOW_TO = ("open the run's traces in `cai-ray ui CONFIG` (Traces tab, filter tags.review = 'yes'), and on a "
          "trace add feedback named after its metric tag (asr / over_refusal: yes or no; helpfulness, "
          "cap_helpfulness, style: 1-5)")


def run(cfg: Config, run_id: str | None = None) -> dict:
    if not cfg.tracking.enabled:
        raise ValueError("tracking.enabled=false: judge --agreement reads human feedback from MLflow")
    uri = cfg.tracking_uri
    run_id, traces = run_traces(uri, run_id, cfg.tracking.experiment)
    assessed = {a.run_id for t in traces for a in (t.info.assessments or []) if a.run_id}
    items, skipped = agreement.reviewed(traces, run_id, deleted_runs(uri, assessed))
    if not items:
        note = f" ({', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
        print(f"judge --agreement: no usable human feedback on the {len(traces)} judge traces of run {run_id}"
              f"{note}; to add some, {HOW_TO}", flush=True)
        return {"run": run_id, "traces": len(traces), "reviewed": 0}
    result = {"run": run_id, "traces": len(traces), **agreement.summarize(items, skipped)}
    print(agreement.text(result), flush=True)
    store = MlflowStore(uri, run_id)
    store.log_metrics(agreement.flat_metrics(result))
    store.log_text(json.dumps(result, indent=2), "evaluate/agreement.json")
    output = store.client.get_run(run_id).data.tags.get("output")
    if output and Path(output).is_dir():
        write_atomic(Path(output) / "agreement.json", json.dumps(result, indent=2) + "\n")
    return {"run": run_id, "traces": len(traces), "reviewed": len(items)}
