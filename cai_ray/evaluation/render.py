"""The report as people and tools read it: a one-screen text, flat MLflow metrics, a chart.

How to read the text (also in the README and ``cai-ray evaluate --help``):
- one block per kind of set; a row per arm and set (and a ``pooled`` row when a kind has several
  sets: a request asked in several sets is one unit there);
- a cell is ``rate [95% interval] hits/rated``: the rate is the mean over requests of each
  request's share, the interval resamples requests, ``hits/rated`` counts responses
  (e.g. harmful / judged); ``n/a`` means nothing could be rated;
- ``failures`` shows, per arm, the share of responses that failed each way (``!`` past its limit);
- ``judge check``: the judge's accuracy per rubric on labelled rows (SUSPECT below judge.min_accuracy);
- a comparison is ``b - a`` over the requests both arms rated, with a paired bootstrap interval
  and a sign-test p; it is INVALID when prompts, sampling or failure shares differ, or an arm is
  UNRELIABLE (judge problems void only the judge's columns; a judge SUSPECT on one metric, only that one).
"""
from __future__ import annotations

from cai_ray.evaluation.report import GENERATION, JUDGING, LABELS, RATES, metric_key

# kind -> the metric columns of its block, in order (judge rater first, then the keyword rater).
COLUMNS = {"harm": ("asr", "asr_keyword"),
           "benign": ("over_refusal", "over_refusal_keyword", "helpfulness"),
           "style": ("style",),
           "capability": ("cap_helpfulness", "ref_logprob")}
# Differences are printed safety first, then capability: the alignment tax reads left to right.
ORDER = ("asr", "asr_keyword", "over_refusal", "over_refusal_keyword", "helpfulness", "cap_helpfulness",
         "ref_logprob", "style")


def _label(key: str) -> str:
    if key == "ref_logprob":
        return LABELS[key]
    keyword = key.endswith("_keyword")
    return f"{LABELS[key.removesuffix('_keyword')]} {'keyword' if keyword else 'judge'}"


def _is_rate(key: str) -> bool:
    return key.removesuffix("_keyword") in RATES


def format_entry(entry: dict | None, rate: bool, digits: int | None = None) -> str:
    """``0.12 [0.05,0.27] 9/40`` for a rate, ``3.1 [2.8,3.4] n=40`` for a mean; ``n/a`` when undefined."""
    if entry is None:
        return "-"
    value = entry["rate" if rate else "mean"]
    counts = f"{entry['count']}/{entry['responses']}" if rate else f"n={entry['responses']}"
    if value is None:
        return f"n/a (0/{entry['responses'] + entry['unrated']} rated)"
    digits = digits or (2 if rate else 1)
    interval = "" if entry["lo"] is None else f" [{entry['lo']:.{digits}f},{entry['hi']:.{digits}f}]"
    return f"{value:.{digits}f}{interval} {counts}"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _kind_block(report: dict, kind: str) -> list[str]:
    sets = [n for n, s in report["sets"].items() if s["kind"] == kind]
    keys = [k for k in COLUMNS[kind] if any(k in a["metrics"] for a in report["arms"].values())]
    if not sets or not keys:
        return []
    rows = [["arm", "set", "requests", "responses", *(_label(k) for k in keys)]]
    for arm, entry in report["arms"].items():
        for name in sets + (["pooled"] if len(sets) > 1 else []):
            cells = []
            for k in keys:
                m = entry["metrics"].get(k)
                part = m if m is None or name == "pooled" else m["sets"].get(name)
                cells.append(format_entry(part, _is_rate(k), 2 if k == "ref_logprob" else None))
            ref = next((entry["metrics"][k] for k in keys if k in entry["metrics"]), None)
            part = ref if name == "pooled" else (ref or {}).get("sets", {}).get(name, {})
            rows.append([arm, name, str(part.get("requests_total", 0)),
                         str(part.get("responses", 0) + part.get("unrated", 0)), *cells])
    return _table(rows)


def _status(problems: list[dict]) -> str:
    """ok, or UNRELIABLE with what made it so (the full reasons are in report.json)."""
    names = [f"judge SUSPECT ({LABELS[p['metric']]} {p['key'].split(':')[0]})" if p.get("metric")
             else LABELS[p["key"]] for p in problems]
    return f"UNRELIABLE: {', '.join(names)}" if names else "ok"


def _failures(report: dict) -> list[str]:
    """Per arm the share of responses (and verdicts) that failed each way; ! past its limit."""
    rows = [["failures", *(LABELS[k] for k in (*GENERATION, *JUDGING)), "status"]]
    for arm, entry in report["arms"].items():
        over = {p["key"] for p in entry["problems"]}
        cells = ["n/a" if f["share"] is None else f"{f['share']:.2f}{'!' if key in over else ''} ({f['count']}/{f['n']})"
                 for key, f in ((k, entry["failures"][k]) for k in (*GENERATION, *JUDGING))]
        rows.append([arm, *cells, _status(entry["problems"])])
    return _table(rows)


def _agreement(report: dict) -> list[str]:
    parts = []
    for arm, entry in report["arms"].items():
        values = [f"{LABELS[m]} {'n/a' if a['kappa'] is None else format(a['kappa'], '.2f')} (n={a['n']})"
                  for m, a in entry["agreement"].items()]
        if values:
            parts.append(f"{arm} " + ", ".join(values))
    return ["judge vs keyword rater, Cohen's kappa: " + "; ".join(parts)] if parts else []


def _judge_check(report: dict) -> list[str]:
    """The judge's accuracy on the labelled check set, per rubric; SUSPECT below judge.min_accuracy."""
    check = report.get("judge_check")
    if not check:
        return ["judge check: not run (judge.check=false); the judge's columns are unchecked"]
    parts = [f"{LABELS[m]} ({c['rubric']}) {c['accuracy']:.2f} [{c['lo']:.2f},{c['hi']:.2f}] {c['correct']}/{c['n']}, "
             f"parse fail {c['parse_failures']}/{c['n']}"
             + (f", judge fail {c['judge_failures']}/{c['n']}" if c.get("judge_failures") else "")
             + (": SUSPECT" if c["suspect"] else "")
             for m, c in check["metrics"].items()]
    return [f"judge check on {check['rows']} labelled rows (Wilson 95%; failures count as wrong): " + "; ".join(parts)]


def _difference(key: str, d: dict) -> str:
    digits = 3 if key == "ref_logprob" else 2
    return (f"{_label(key)} {d['diff']:+.{digits}f} [{d['lo']:+.{digits}f},{d['hi']:+.{digits}f}] "
            f"p={d['p_value']:.3f} n={d['n']}" + ("" if d["valid"] else "*"))


def _comparisons(report: dict) -> list[str]:
    """Two lines per pair: the verdict, then the differences that are defined, safety first and
    capability after, so consecutive arms read as the alignment tax (a safety gain beside its cost)."""
    if not report["comparisons"]:
        return []
    lines = ["comparisons, b - a over requests both rated (paired bootstrap 95%, sign-test p; * invalid); "
             "consecutive arms show the alignment tax:"]
    for c in report["comparisons"]:
        lines.append(f"  {c['b']} vs {c['a']}: " + ("valid" if c["valid"] else "INVALID: " + "; ".join(c["reasons"])))
        keys = [k for k in ORDER if k in c["differences"]] + [k for k in c["differences"] if k not in ORDER]
        parts = [_difference(k, c["differences"][k]) for k in keys if c["differences"][k]["diff"] is not None]
        if parts:
            lines.append("    " + "; ".join(parts))
    return lines


def summary_text(report: dict, header: str = "") -> str:
    """One screen: a block per kind of set, failure shares, rater agreement, problems, comparisons."""
    lines = [header] if header else []
    formats = ", ".join(f"{a}={e['prompt_format']}" for a, e in report["arms"].items())
    lines.append(f"prompt formats: {formats}; rates are over requests (95% cluster-bootstrap intervals)")
    for kind in COLUMNS:
        lines += _kind_block(report, kind)
    lines += _failures(report) + _agreement(report) + _judge_check(report)
    return "\n".join(lines + _comparisons(report))


def _interval(prefix: str, entry: dict, value_key: str) -> dict[str, float]:
    out = {prefix: entry.get(value_key), f"{prefix}_lo": entry.get("lo"), f"{prefix}_hi": entry.get("hi"),
           f"{prefix}_requests": entry.get("requests", entry.get("n"))}
    return {k: v for k, v in out.items() if v is not None}


def flat_metrics(report: dict) -> dict[str, float]:
    """``{arm}/{metric}`` (pooled), ``{arm}/{set}/{metric}``, failure shares, kappa, and
    ``{b}_vs_{a}/{metric}_diff``; undefined values are left out rather than logged as NaN."""
    out: dict[str, float] = {}
    for arm, entry in report["arms"].items():
        out[f"{arm}/responses"] = entry["responses"]
        out[f"{arm}/valid"] = float(not entry["problems"])
        for key, f in entry["failures"].items():
            if f["share"] is not None:
                out[f"{arm}/failures/{key}"] = f["share"]
        for key, m in entry["metrics"].items():
            value_key = "rate" if _is_rate(key) else "mean"
            out.update(_interval(f"{arm}/{key}", m, value_key))
            for name, part in m["sets"].items():
                out.update(_interval(f"{arm}/{name}/{key}", part, value_key))
        for metric, a in entry["agreement"].items():
            if a["kappa"] is not None:
                out[f"{arm}/{metric}_kappa"] = a["kappa"]
    for c in report["comparisons"]:
        name = f"{c['b']}_vs_{c['a']}"
        out[f"{name}/valid"] = float(c["valid"])
        for key, d in c["differences"].items():
            out.update(_interval(f"{name}/{key}_diff", d, "diff"))
            if d.get("p_value") is not None:
                out[f"{name}/{key}_p"] = d["p_value"]
    for metric, c in ((report.get("judge_check") or {}).get("metrics") or {}).items():
        out.update({f"judge_check/{metric}/{k}": float(c[k]) for k in ("accuracy", "lo", "hi", "suspect")})
        out[f"judge_check/{metric}/parse_failure_share"] = c["parse_failures"] / c["n"]
    return out


def chart(report: dict):
    """A matplotlib Figure: pooled rates per arm with their intervals (left), failure shares (middle),
    1-5 means (right).  Built without pyplot, so no global state or display."""
    import numpy as np
    from matplotlib.figure import Figure

    arms = list(report["arms"])
    rate_keys = [k for k in ("asr", "asr_keyword", "over_refusal", "over_refusal_keyword")
                 if any(k in report["arms"][a]["metrics"] for a in arms)]
    mean_keys = [k for k in ("helpfulness", "cap_helpfulness", "style")
                 if any(k in report["arms"][a]["metrics"] for a in arms)]
    fig = Figure(figsize=(13, 4), layout="constrained")
    axes = fig.subplots(1, 3, width_ratios=[4, 4, 2])
    width = 0.8 / max(len(arms), 1)
    for i, arm in enumerate(arms):
        offset = (i - (len(arms) - 1) / 2) * width
        e = report["arms"][arm]
        for ax, keys, value in ((axes[0], rate_keys, "rate"), (axes[2], mean_keys, "mean")):
            entries = [e["metrics"].get(k) or {} for k in keys]
            vals, lo, hi = (np.array([np.nan if x.get(value) is None or x.get(k) is None else x[k] for x in entries],
                                     float) for k in (value, "lo", "hi"))
            xs = np.arange(len(keys)) + offset
            ax.bar(xs, vals, width, label=arm)  # NaN draws nothing: no bar for an undefined value
            ax.errorbar(xs, vals, yerr=[vals - lo, hi - vals], fmt="none", ecolor="black", capsize=3)
        shares = [e["failures"][k]["share"] for k in (*GENERATION, *JUDGING)]
        axes[1].bar(np.arange(len(shares)) + offset, [np.nan if s is None else s for s in shares], width, label=arm)
    for ax, keys, title, limits in ((axes[0], rate_keys, "rates over requests (95%)", (0, 1)),
                                    (axes[1], [*GENERATION, *JUDGING], "failure shares", (0, 1)),
                                    (axes[2], mean_keys, "judge 1-5 means (95%)", (1, 5.5))):
        ax.set_xticks(np.arange(len(keys)), [_label(k) if k in rate_keys + mean_keys else LABELS[k] for k in keys],
                      rotation=30, ha="right", fontsize="small")
        ax.set_ylim(*limits)
        ax.set_title(title)
    axes[0].legend(fontsize="small")
    return fig


def response_table(rows: list[dict]) -> dict[str, list]:
    """One row per response with every rater's verdict, for MLflow's table view."""
    table: dict[tuple, dict] = {}
    for r in rows:
        key = (r["arm"], r["set"], r["id"], r["sample"])
        item = table.setdefault(key, {"arm": r["arm"], "set": r["set"], "request_id": r["request_id"],
                                      "sample": r["sample"], "prompt": r["prompt"], "response": r["response"],
                                      "finish_reason": r["finish_reason"], "flags": r["flags"]})
        name = metric_key(r["metric"], r["rater"])
        item[name] = r["score"]
        if r["rater"] == "judge":
            item[f"{name}_raw"] = r["raw"] if r["raw"] is not None else (r["error"] or None)
    columns = list(dict.fromkeys(k for item in table.values() for k in item))
    return {c: [item.get(c) for item in table.values()] for c in columns}
