"""The judge measured on labelled rows: accuracy per rubric, a confusion table, parse failures.

A check row is one (request, response) with the verdict a careful reader gives it: ``kind`` harm
rows carry ``attack_success`` (yes/no), rated by ``judge.harm_rubric``; benign rows carry
``refused`` (yes/no), rated by the refusal rubric.  The shipped set (cai_ray/data/checks/, written
for this project) covers clear compliance and refusal, partial compliance, compliance inside a
disclaimer, deflection, off-topic replies, over-refusal of benign requests, lectures, replies that
quote the rubric's format, and other languages; its compliant replies are placeholders and
outlines, never working harmful detail.  ``judge.check_data`` adds a user's own files with the
same columns.

Accuracy counts every row: a verdict that did not parse, or never came back, is a wrong answer
(no verdict is imputed), and its share is shown beside it.  The interval is Wilson's 95%; a rubric
whose lower bound falls below ``judge.min_accuracy`` is SUSPECT, and the evaluate report marks
that metric's judge column so.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Optional

from cai_ray.config import Config, JudgeConfig, stage_folder
from cai_ray.stats import wilson

# Shipped beside the prompt sets but not one of them (no prompt column; never trained or evaluated on).
CHECK_SET = "judge_check (shipped)"
CHECK_FILE = Path(__file__).resolve().parents[1] / "data" / "checks" / "judge_check.jsonl"
# Verdict column -> (the kind of row it belongs to, the evaluate metric, the rubric rating it; None:
# judge.harm_rubric).
VERDICTS = {"attack_success": ("harm", "asr", None), "refused": ("benign", "over_refusal", "refusal")}
KIND_VERDICT = {kind: column for column, (kind, _, _) in VERDICTS.items()}
ANSWERS = {"yes": True, "no": False}
TEXT_COLUMNS = ("id", "kind", "request", "response")


def _rows_of(source: str) -> tuple[str, list[dict]]:
    """(name, raw rows) of a shipped set or a local .jsonl file."""
    from cai_ray.train.sources import read_rows

    path = str(CHECK_FILE) if source == CHECK_SET else source
    rows = read_rows(path, TEXT_COLUMNS, ("category", "language", *VERDICTS), key="judge.check_data")
    return source, rows


def _checked(name: str, n: int, row: dict, seen: dict) -> dict:
    """One row validated: known kind, a yes/no verdict in its column, an id not seen before."""
    where = f"judge.check_data: {name}: row {n}"
    kind = row["kind"].strip()
    if kind not in KIND_VERDICT:
        raise ValueError(f"{where}: column 'kind': {kind!r} is not a check kind; use one of {', '.join(KIND_VERDICT)}")
    column = KIND_VERDICT[kind]
    value = row.get(column)
    if value is None:
        raise ValueError(f"{where}: column {column!r} is missing (a {kind} row needs its verdict, yes or no)")
    answer = ANSWERS.get(str(value).strip().lower())
    if answer is None:
        raise ValueError(f"{where}: column {column!r}: {value!r} is not a verdict; use yes or no")
    key = row["id"].strip()
    if key in seen:
        raise ValueError(f"{where}: column 'id': duplicate id {key!r} (first at {seen[key]})")
    seen[key] = f"{name} row {n}"
    return {"id": key, "kind": kind, "verdict": column, "label": answer, "request": row["request"],
            "response": row["response"], "category": row.get("category") or "unlabelled", "set": name}


def load_check_rows(judge: JudgeConfig) -> list[dict]:
    """The shipped check set, then judge.check_data, validated (one-line errors naming file, row, column)."""
    rows, seen = [], {}
    for source in (CHECK_SET, *judge.check_data):
        if source != CHECK_SET and not Path(source).expanduser().is_file():
            raise ValueError(f"judge.check_data: {source}: no such file (a .jsonl of labelled rows)")
        name, raw = _rows_of(source)
        rows += [_checked(name, n, r, seen) for n, r in enumerate(raw, start=1)]
    if judge.check_limit is None:
        return rows
    kept, taken = [], Counter()
    for r in rows:
        taken[r["verdict"]] += 1
        if taken[r["verdict"]] <= judge.check_limit:
            kept.append(r)
    return kept


def check_requests(judge: JudgeConfig, rows: list[dict]) -> list[dict]:
    """One judge request per row, keyed by its id and verdict column."""
    return [{"key": f"check\x1f{r['id']}", "rubric": VERDICTS[r["verdict"]][2] or judge.harm_rubric,
             "request": r["request"], "response": r["response"], "style": None} for r in rows]


def _predicted(got: dict) -> Optional[bool]:
    """The judge's yes/no on the row's question (attack success, or refused); None without a verdict."""
    if got.get("failed") or not got.get("parse_ok") or got.get("score") is None:
        return None
    return bool(got["score"] >= 0.5)


def row_results(judge: JudgeConfig, rows: list[dict], verdicts: dict[str, dict]) -> list[dict]:
    """Per check row: its label, the judge's answer (None: no verdict), the raw text and why it failed."""
    out = []
    for r, req in zip(rows, check_requests(judge, rows)):
        got = verdicts.get(req["key"]) or {"failed": True, "error": "no verdict"}
        pred = _predicted(got)
        out.append({"id": r["id"], "set": r["set"], "category": r["category"], "verdict": r["verdict"],
                    "rubric": req["rubric"], "label": r["label"], "judged": pred,
                    "correct": pred is not None and pred == r["label"], "parse_ok": bool(got.get("parse_ok")),
                    "failed": bool(got.get("failed")), "raw": got.get("raw"), "error": got.get("error") or ""})
    return out


def summarize(judge: JudgeConfig, rows: list[dict], verdicts: dict[str, dict]) -> dict:
    """Per metric: accuracy (failures wrong) with its Wilson interval, confusion, per-category counts."""
    by_verdict: dict[str, list[dict]] = defaultdict(list)
    for res in row_results(judge, rows, verdicts):
        by_verdict[res["verdict"]].append(res)
    metrics = {}
    for column, items in by_verdict.items():
        _, metric, rubric = VERDICTS[column]
        correct = sum(r["correct"] for r in items)
        parsed = [r for r in items if r["judged"] is not None]
        acc = wilson(correct, len(items))
        confusion = {truth: {shown: 0 for shown in ("yes", "no", "failed")} for truth in ("yes", "no")}
        categories: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in items:
            shown = "failed" if r["judged"] is None else "yes" if r["judged"] else "no"
            confusion["yes" if r["label"] else "no"][shown] += 1
            categories[r["category"]][0] += r["correct"]
            categories[r["category"]][1] += 1
        # Grouped by cause: the numbers in a message (sizes, counts) would split one cause into many.
        errors = Counter(re.sub(r"\d+", "N", r["error"])[:60] for r in items if r["judged"] is None)
        parse_failures = sum(1 for r in items if r["judged"] is None and not r["failed"])
        metrics[metric] = {
            "rubric": rubric or judge.harm_rubric, "column": column, "n": len(items), "correct": correct,
            "accuracy": acc.estimate, "lo": acc.lo, "hi": acc.hi,
            "accuracy_parsed": correct / len(parsed) if parsed else None,
            "parse_failures": parse_failures, "parse_failure_share": parse_failures / len(items),
            "judge_failures": sum(1 for r in items if r["failed"]),
            "confusion": confusion, "per_category": {k: {"correct": c, "n": n} for k, (c, n) in categories.items()},
            "failure_reasons": dict(errors.most_common(5)),
            "suspect": acc.lo < judge.min_accuracy, "min_accuracy": judge.min_accuracy}
    return {"rows": len(rows), "sets": sorted({r["set"] for r in rows}), "judge": judge.model.path,
            "role": judge.model.role, "metrics": metrics,
            "suspect": [m for m, c in metrics.items() if c["suspect"]]}


def check_text(summary: dict) -> str:
    """The check as people read it: per rubric accuracy, interval, parse failures and confusion."""
    lines = [f"judge check: {summary['judge']} ({summary['role']}) on {summary['rows']} labelled rows "
             f"({', '.join(summary['sets'])}); accuracy counts failures as wrong, Wilson 95%"]
    for metric, c in summary["metrics"].items():
        status = f"SUSPECT (lower bound < judge.min_accuracy={c['min_accuracy']})" if c["suspect"] else "ok"
        parsed = "n/a" if c["accuracy_parsed"] is None else f"{c['accuracy_parsed']:.2f}"
        lines.append(f"  {metric} ({c['rubric']}, column {c['column']}): accuracy {c['accuracy']:.2f} "
                     f"[{c['lo']:.2f},{c['hi']:.2f}] {c['correct']}/{c['n']}; parse failures "
                     f"{c['parse_failures']}/{c['n']} ({c['parse_failure_share']:.2f}), judge failures "
                     f"{c['judge_failures']}; accuracy on parsed {parsed}: {status}")
        lines.append("    truth \\ judge   yes   no  failed")
        for truth, shown in c["confusion"].items():
            lines.append(f"    {truth:<15} {shown['yes']:>4} {shown['no']:>4} {shown['failed']:>7}")
        worst = sorted(c["per_category"].items(), key=lambda kv: kv[1]["correct"] / kv[1]["n"])[:3]
        lines.append("    weakest categories: " + ", ".join(f"{k} {v['correct']}/{v['n']}" for k, v in worst))
        if c["failure_reasons"]:
            lines.append("    failures: " + "; ".join(f"{k or '?'} x{v}" for k, v in c["failure_reasons"].items()))
    return "\n".join(lines)


def run_judge_check(cfg: Config, store, brief: bool = False) -> dict:
    """Score the check rows through the judge app (reused if it runs), or read a finished check.

    Written to ``{output_dir}/judge-check/{key}/report.json``; the same judge and rows are not
    scored twice (a sweep's evaluations share one check)."""
    from cai_ray.evaluation.rating import judge_requests
    from cai_ray.runtime import init_ray
    from cai_ray.files import write_atomic

    rows = load_check_rows(cfg.judge)
    out = stage_folder(cfg, "judge-check", rows=rows)
    if (out / "report.json").is_file():
        summary = json.loads((out / "report.json").read_text())
    else:
        init_ray(cfg)
        verdicts = judge_requests(cfg, check_requests(cfg.judge, rows), "judge check")
        summary = summarize(cfg.judge, rows, verdicts)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "verdicts.jsonl", "".join(json.dumps(r) + "\n"
                                                     for r in row_results(cfg.judge, rows, verdicts)))
        write_atomic(out / "report.json", json.dumps(summary, indent=2) + "\n")
    summary["output"] = str(out)
    text = check_text(summary)
    write_atomic(out / "check.txt", text + "\n")
    store.set_tags({"stage": "judge-check", "judge_model": summary["judge"],
                    "suspect": ",".join(summary["suspect"]) or "none"})
    store.log_metrics({f"check/{m}/{k}": float(c[k]) for m, c in summary["metrics"].items()
                       for k in ("accuracy", "lo", "hi", "parse_failure_share", "suspect", "n")})
    for name in ("report.json", "check.txt", "verdicts.jsonl"):
        store.log_artifact(out / name, "judge-check")
    if not brief:  # evaluate's report carries the check's line per rubric (and check.txt the tables)
        print(text, flush=True)
    return summary
