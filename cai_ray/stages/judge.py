"""``cai-ray judge --check``: the judge measured on labelled rows before its verdicts are trusted.

One command with one flag per mode (``MODES``); ``--check`` scores the shipped check set and
``judge.check_data`` (cai_ray/evaluation/judge_check.py): accuracy per rubric with a Wilson
interval, a confusion table and the parse-failure share.  ``evaluate`` runs the same check as a
child run first (``judge.check``) and marks a failing rubric's column SUSPECT.
"""

from __future__ import annotations

from cai_ray.config import Config
from cai_ray.tracking import Store

# The modes, each a --flag of the command (cli.JUDGE_MODES holds their help); one is given.
# Issue 21 adds "agreement".
MODES = ("check",)


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
