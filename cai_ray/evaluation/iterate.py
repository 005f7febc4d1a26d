"""RL-CAI iterations judged apart from how they are reported: the selection split and the stop rule.

The eval requests are split once, stably by request id (``evaluate.selection_share``): the stop
rule compares consecutive policies only on the selection requests, and the per-iteration numbers
``run`` reports (metrics, plot) come from the other requests, so the choice of when to stop never
flatters the numbers shown beside it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq

from cai_ray.config import Config, IterateConfig
from cai_ray.evaluation.report import arm_report, differences
from cai_ray.tracking import Store


def in_selection(request_id: str, share: float) -> bool:
    """Whether a request belongs to the selection split: a hash of its id below ``share``, so the
    split never changes between runs, and a larger share keeps every request of a smaller one."""
    digest = hashlib.sha256(f"selection\x00{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64 < share


def policy_rows(evaluate_output: str, arm: str, share: float) -> dict[str, list[dict]]:
    """One policy's rating rows from a finished evaluate, split into "selection" and "report"."""
    table = pq.read_table(Path(evaluate_output) / "ratings.parquet")
    rows = [r for r in table.to_pylist() if r["arm"] == arm]
    chosen = {rid: in_selection(rid, share) for rid in {r["request_id"] for r in rows}}
    return {"selection": [r for r in rows if chosen[r["request_id"]]],
            "report": [r for r in rows if not chosen[r["request_id"]]]}


def metrics_of(cfg: Config, rows: list[dict], name: str) -> dict:
    e = cfg.evaluate
    return arm_report(name, rows, e.max_share, e.min_rater_kappa, e.bootstrap, cfg.seed)["metrics"]


def _value(metrics: dict, name: str) -> float | None:
    entry = metrics.get(name) or {}
    return entry.get("rate", entry.get("mean"))


def stop_rule(it: IterateConfig, change: dict, cur: dict) -> str | None:
    """Why the policy with selection metrics ``cur`` is rejected and the run stops (None: accept, go on).

    ``change``: the paired difference (this policy - the previous) of the harm metric over the
    selection requests both rated, with its interval.  Rejected when it is above zero beyond its
    interval (worse), when it falls by less than iterate.min_improvement without an interval wholly
    below zero, when it is undefined, or when a cost is past its limit.
    """
    d, lo, hi = change.get("diff"), change.get("lo"), change.get("hi")
    if d is None:
        return f"{it.metric} is undefined (n/a), so iterations cannot be compared"
    if lo is not None and lo > 0:
        return f"{it.metric} got worse: {d:+.3f} [{lo:+.3f},{hi:+.3f}] (paired, the interval above 0)"
    if -d < it.min_improvement and (hi is None or hi >= 0):
        return (f"{it.metric} fell by {-d:+.3f} < iterate.min_improvement={it.min_improvement} "
                f"with an interval that includes 0")
    refusal, helpful = _value(cur, it.over_refusal_metric), _value(cur, it.helpfulness_metric)
    if it.max_over_refusal is not None and refusal is not None and refusal > it.max_over_refusal:
        return f"{it.over_refusal_metric} {refusal:.3f} > iterate.max_over_refusal={it.max_over_refusal}"
    if it.min_helpfulness is not None and helpful is not None and helpful < it.min_helpfulness:
        return f"{it.helpfulness_metric} {helpful:.2f} < iterate.min_helpfulness={it.min_helpfulness}"
    return None


def judge_step(cfg: Config, prev: dict, cur: dict) -> str | None:
    """The stop rule between two policies' split rows (from ``policy_rows``)."""
    change = differences(prev["selection"], cur["selection"], [cfg.iterate.metric], cfg.evaluate.bootstrap,
                         cfg.seed)[cfg.iterate.metric]
    return stop_rule(cfg.iterate, change, metrics_of(cfg, cur["selection"], "selection"))


def log_iterations(store: Store, cfg: Config, curve: list[dict], stop: str | None, best: str,
                   requests: dict) -> None:
    """The per-iteration curve on the parent run, from the report split: metrics by step (0 = the SFT
    policy), tags naming the stop, the best policy and the split, and a plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it = cfg.iterate
    names = dict.fromkeys((it.metric, it.over_refusal_metric, it.helpfulness_metric))
    for k, metrics in enumerate(curve):
        values = {}
        for n in names:
            entry = metrics.get(n) or {}
            values.update({f"iteration/{n}": _value(metrics, n), f"iteration/{n}_lo": entry.get("lo"),
                           f"iteration/{n}_hi": entry.get("hi")})
        store.log_metrics(values, step=k)
    split = (f"stop rule on the selection split (evaluate.selection_share={cfg.evaluate.selection_share}, "
             f"{requests['selection']} requests by id); iteration/* from the other {requests['report']}")
    store.set_tags({"iterate.stopped": stop or "all iterations ran", "iterate.iterations_run": len(curve) - 1,
                    "iterate.best_policy": best, "iterate.selection": split})
    store.log_text(json.dumps({"curve": curve, "stop": stop, "best": best, "split": split}, indent=2),
                   "iterations.json")
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for ax, name in zip(axes[0], names):
        shown = [(k, m[name]) for k, m in enumerate(curve) if _value(m, name) is not None]
        ys = [_value({name: e}, name) for _, e in shown]
        err = [[y - (e["lo"] if e["lo"] is not None else y) for (_, e), y in zip(shown, ys)],
               [(e["hi"] if e["hi"] is not None else y) - y for (_, e), y in zip(shown, ys)]]
        ax.errorbar([k for k, _ in shown], ys, yerr=err, marker="o", capsize=3)
        ax.set_xlabel("iteration (0 = SFT policy)")
        ax.set_title(f"{name} (report split)")
    fig.tight_layout()
    store.log_figure(fig, "iterations.png")
    plt.close(fig)
