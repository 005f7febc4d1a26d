"""How often the judge agrees with people: human feedback on an evaluate run's judge traces.

A person opens a judge trace in MLflow's UI (see traces.py) and adds feedback with MLflow's own
control, named after the trace's ``metric`` tag (or ``verdict``) with a value on that metric's
scale: yes/no (also true/false, 1/0) for ``asr`` and ``over_refusal``, an integer 1-5 for
``helpfulness``, ``cap_helpfulness`` and ``style``.  Only feedback from a HUMAN source counts.

Per rubric and arm: how many verdicts were reviewed, the judge's accuracy against people (a
parse failure is a wrong verdict, and also counted on its own) with a Wilson interval, Cohen's
kappa over the verdicts that parsed, the keyword rater's accuracy on the same traces where it
rates that metric, and the confusion table (rows: people, columns: judge).  With several people
on one trace the majority is the reference (a tie leaves the trace out, counted), and their
agreement with each other is reported too.  Feedback off the scale, on a trace of another run or
from a deleted run is skipped with its reason, never averaged in.
"""
from __future__ import annotations

import itertools
from collections import Counter, defaultdict

from cai_ray.evaluation.traces import BINARY, LIKERT
from cai_ray.stats import cohen_kappa, wilson

HUMAN = "HUMAN"
FEEDBACK_NAMES = ("verdict",)  # besides the trace's metric
_YES, _NO = {"yes", "true", "1", "1.0"}, {"no", "false", "0", "0.0"}


def human_label(metric: str, value) -> str | None:
    """A person's value on the metric's scale as the judge's tag spells it, or None if off the scale."""
    text = str(value).strip().lower()
    if metric in BINARY:
        return "yes" if text in _YES else "no" if text in _NO else None
    if metric in LIKERT:
        try:
            number = float(text)
        except ValueError:
            return None
        return str(int(number)) if number.is_integer() and 1 <= number <= 5 else None
    return None


def _feedback(trace, metric: str) -> list:
    return [a for a in (trace.info.assessments or []) if getattr(a, "feedback", None) is not None
            and a.name in (metric, *FEEDBACK_NAMES)]


def reviewed(traces: list, run_id: str, deleted: set[str]) -> tuple[list[dict], Counter]:
    """(one item per trace people reviewed, skipped feedback by reason)."""
    items, skipped = [], Counter()
    for trace in traces:
        tags, metric = trace.info.tags, trace.info.tags.get("metric", "")
        latest: dict[str, tuple[int, str]] = {}
        for a in _feedback(trace, metric):
            if a.source.source_type != HUMAN:
                continue  # an automated assessment is not a person's verdict
            if trace.info.request_metadata.get("mlflow.sourceRun") != run_id:
                skipped["on a trace of another run"] += 1
            elif a.run_id and a.run_id in deleted:
                skipped["from a deleted run"] += 1
            elif (label := human_label(metric, a.feedback.value)) is None:
                skipped[f"value off the {metric} scale ({BINARY.get(metric) or LIKERT.get(metric, '?')})"] += 1
            else:
                when = a.last_update_time_ms or 0
                if a.source.source_id not in latest or when >= latest[a.source.source_id][0]:
                    latest[a.source.source_id] = (when, label)
        if not latest:
            continue
        people = {who: label for who, (_, label) in latest.items()}
        (top, count), *rest = Counter(people.values()).most_common()
        if rest and rest[0][1] == count:
            skipped["people tie (no majority)"] += 1
            continue
        items.append({"rubric": tags.get("rubric"), "arm": tags.get("arm"), "metric": metric,
                      "judge": tags.get("verdict"), "keyword": tags.get("keyword", "none"),
                      "reference": top, "people": people})
    return items, skipped


def _block(items: list[dict]) -> dict:
    n = len(items)
    correct = sum(i["judge"] == i["reference"] for i in items)
    parsed = [i for i in items if i["judge"] != "parse_fail"]
    kappa = cohen_kappa([i["judge"] for i in parsed], [i["reference"] for i in parsed])
    keyword = [i for i in items if i["keyword"] != "none"]
    confusion: dict[str, Counter] = defaultdict(Counter)
    for i in items:
        confusion[i["reference"]][i["judge"]] += 1
    out = {"reviewed": n, "judge_correct": correct, "judge_accuracy": wilson(correct, n)._asdict(),
           "judge_parse_failures": n - len(parsed), "kappa": kappa.kappa, "kappa_n": kappa.n,
           "confusion": {ref: dict(row) for ref, row in sorted(confusion.items())}}
    if keyword:
        hits = sum(i["keyword"] == i["reference"] for i in keyword)
        out.update(keyword_reviewed=len(keyword), keyword_correct=hits,
                   keyword_accuracy=wilson(hits, len(keyword))._asdict())
    return out


def between_people(items: list[dict]) -> dict:
    """Pairwise agreement of people who reviewed the same trace."""
    pairs = [a == b for i in items for a, b in itertools.combinations(sorted(i["people"].values()), 2)]
    shared = sum(len(i["people"]) > 1 for i in items)
    return {"traces": shared, "pairs": len(pairs), "agreement": sum(pairs) / len(pairs) if pairs else None}


def summarize(items: list[dict], skipped: Counter) -> dict:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for item in items:
        groups[item["rubric"], item["arm"]].append(item)
    return {"blocks": [{"rubric": r, "arm": a, **_block(g)} for (r, a), g in sorted(groups.items())],
            "between_people": between_people(items), "skipped": dict(skipped),
            "people": sorted({p for i in items for p in i["people"]})}


def flat_metrics(result: dict) -> dict[str, float]:
    out = {}
    for b in result["blocks"]:
        prefix = f"agreement/{b['rubric']}/{b['arm']}"
        out[f"{prefix}/reviewed"] = b["reviewed"]
        for end in ("estimate", "lo", "hi"):
            out[f"{prefix}/judge_accuracy{'' if end == 'estimate' else '_' + end}"] = b["judge_accuracy"][end]
        if b["kappa"] is not None:
            out[f"{prefix}/kappa"] = b["kappa"]
        if "keyword_accuracy" in b:
            out[f"{prefix}/keyword_accuracy"] = b["keyword_accuracy"]["estimate"]
    return out


def _pct(interval: dict) -> str:
    return f"{interval['estimate']:.2f} [{interval['lo']:.2f},{interval['hi']:.2f}]"


def text(result: dict) -> str:
    """The agreement block the CLI prints and the evaluate report appends."""
    lines = [f"judge vs people ({len(result['people'])} reviewer(s)); accuracy [95% Wilson] correct/reviewed; "
             f"a parse failure counts as wrong",
             f"{'rubric':<24}{'arm':<12}{'reviewed':>9}  {'judge accuracy':<22}{'parse fail':>11}"
             f"{'kappa':>8}  keyword accuracy"]
    for b in result["blocks"]:
        kappa = "n/a" if b["kappa"] is None else f"{b['kappa']:.2f}"
        keyword = (f"{_pct(b['keyword_accuracy'])} {b['keyword_correct']}/{b['keyword_reviewed']}"
                   if "keyword_accuracy" in b else "-")
        lines.append(f"{b['rubric']:<24}{b['arm']:<12}{b['reviewed']:>9}  "
                     f"{_pct(b['judge_accuracy']) + ' ' + str(b['judge_correct']) + '/' + str(b['reviewed']):<22}"
                     f"{b['judge_parse_failures']:>11}{kappa:>8}  {keyword}")
        cells = "; ".join(f"people {ref}: " + ", ".join(f"judge {j} {n}" for j, n in sorted(row.items()))
                          for ref, row in b["confusion"].items())
        lines.append(f"  confusion: {cells}")
    people = result["between_people"]
    if people["pairs"]:
        lines.append(f"people vs people: {people['agreement']:.2f} agreement over {people['pairs']} pair(s) "
                     f"on {people['traces']} trace(s); the majority is the reference")
    if result["skipped"]:
        lines.append("skipped feedback: " + ", ".join(f"{n} {why}" for why, n in sorted(result["skipped"].items())))
    return "\n".join(lines)
