"""Judge verdicts as MLflow traces a person can open, and the sample people are asked to review.

Every judge call of an evaluate run becomes one trace on that run (``evaluate.trace=all``), or
only the calls in the review sample (``sample``, the default; ``none`` logs nothing).  A trace's
inputs are what the judge saw (rubric, request, response) plus where it came from (arm, set,
request id, sample); its outputs are the judge's raw text, the parsed verdict or the parse
failure, and the keyword rater's verdict on the same response.  Tags carry arm, set, rubric,
metric, verdict, disagreement and ``review`` (yes/no), so MLflow's trace list filters on them.

The review sample is stratified by arm x metric x judge verdict x judge-keyword disagreement, filled
round-robin over the strata: a few hundred reviews then still cover rare verdicts, parse
failures and the disagreements, where a uniform sample of a mostly-refusing arm would show
little else than refusals.  Within a stratum the order is a hash of (seed, call), so the sample
is stable across reruns.  People mark a trace with MLflow's own feedback control, naming the
feedback after the trace's ``metric`` tag (see agreement.py for the scales).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

JUDGE = "judge"
# The verdict scale a person answers on, per metric (the scale of the rating's score).
BINARY = {"asr": "attack success: yes or no", "over_refusal": "refused: yes or no"}
LIKERT = {"helpfulness": "1 to 5", "cap_helpfulness": "1 to 5", "style": "1 to 5"}


def call_key(row: dict) -> tuple:
    """One judge call's response and metric; the keyword rater's row for it has the same key."""
    return row["arm"], row["set"], row["id"], int(row["sample"]), row["metric"]


def verdict_label(row: dict) -> str:
    """The judge's verdict as a tag: yes/no for binary metrics, the score for 1-5, or parse_fail."""
    if row.get("score") is None or not row.get("parse_ok"):
        return "parse_fail"
    if row["metric"] in BINARY:
        return "yes" if row["score"] >= 0.5 else "no"
    return str(int(row["score"])) if float(row["score"]).is_integer() else f"{row['score']:g}"


def judge_calls(rows: list[dict]) -> list[dict]:
    """Rating rows that are judge calls: a response that failed to generate was never judged."""
    return [r for r in rows if r["rater"] == JUDGE and not str(r.get("error") or "").startswith("generation failed")]


def keyword_scores(rows: list[dict]) -> dict[tuple, float]:
    return {call_key(r): r["score"] for r in rows if r["rater"] == "keyword" and r.get("score") is not None}


def disagrees(row: dict, keyword: dict[tuple, float]) -> bool:
    theirs = keyword.get(call_key(row))
    return row.get("score") is not None and theirs is not None and (row["score"] >= 0.5) != (theirs >= 0.5)


def review_sample(rows: list[dict], n: int, seed: int) -> set[str]:
    """Keys of ``n`` judge calls: round-robin over arm x metric x verdict x disagreement strata."""
    keyword = keyword_scores(rows)
    strata: dict[tuple, list[dict]] = defaultdict(list)
    for row in judge_calls(rows):
        strata[row["arm"], row["metric"], verdict_label(row), disagrees(row, keyword)].append(row)
    queues = []
    for name in sorted(strata):
        ranked = sorted(strata[name], key=lambda r: hashlib.sha256(f"{seed}\x1f{r['key']}".encode()).hexdigest())
        queues.append(ranked)
    chosen: set[str] = set()
    depth = 0
    while len(chosen) < n and any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue) and len(chosen) < n:
                chosen.add(queue[depth]["key"])
        depth += 1
    return chosen


def trace_records(rows: list[dict], mode: str, n: int, seed: int) -> list[dict]:
    """What ``Store.log_traces`` writes: one record per traced judge call."""
    if mode == "none":
        return []
    sample = review_sample(rows, n, seed)
    keyword = keyword_scores(rows)
    records = []
    for row in judge_calls(rows):
        review = row["key"] in sample
        if mode == "sample" and not review:
            continue
        theirs = keyword.get(call_key(row))
        scale = BINARY.get(row["metric"]) or LIKERT.get(row["metric"], "")
        records.append({
            "name": f"judge/{row['rubric']}",
            "inputs": {"rubric": row["rubric"], "metric": row["metric"], "request": row["request"],
                       "response": row["response"], "arm": row["arm"], "set": row["set"],
                       "request_id": row["request_id"], "id": row["id"], "sample": int(row["sample"])},
            "outputs": {"raw": row.get("raw"), "verdict": row.get("score"), "parse_ok": bool(row.get("parse_ok")),
                        "error": row.get("error") or "", "keyword_verdict": theirs,
                        "feedback": f"name it {row['metric']!r}; value {scale}"},
            "tags": {"arm": row["arm"], "set": row["set"], "rubric": row["rubric"], "metric": row["metric"],
                     "verdict": verdict_label(row), "disagree": "yes" if disagrees(row, keyword) else "no",
                     "keyword": "none" if theirs is None else ("yes" if theirs >= 0.5 else "no"),
                     "review": "yes" if review else "no", "request_id": row["request_id"]},
        })
    return records
