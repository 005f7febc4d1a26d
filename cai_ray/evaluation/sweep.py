"""The sweep's answer: from how many preference pairs DPO beats SFT-only, with power and cost.

Every sweep point (size x seed) and the SFT-only baseline (one arm per SFT seed) are arms of one
evaluate over the same requests, so each size is compared with SFT-only request by request.

Scheme.  Per metric, a request's value is the mean of its rated responses in one arm (samples and
jailbreak templates count once, as in the report).  The requests of a size's comparison are those
every arm of the size and every SFT-only arm rated.  The difference is the mean over those requests
of (mean over the size's DPO seeds - mean over the SFT seeds); its interval and p-value come from a
two-way bootstrap that resamples requests and, independently, each side's seeds
(``stats.crossed_bootstrap``).  p-values are Holm-adjusted across the sizes of the sweep, per
metric.  The rule for "beats" (``SweepConfig``): every harm metric falls with an adjusted p under
alpha, no cost passes its limit, and the comparison is not INVALID.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from cai_ray.config import SweepConfig
from cai_ray.evaluation.report import _per_request, metric_key, number_or_none
from cai_ray.stats import crossed_bootstrap, holm, icc_oneway, min_detectable_difference

# Differences computed per size (those the evaluate measured); costs: metric -> (limit field, sign
# of a cost: +1 where a rise costs, -1 where a fall does).
DIFFERENCES = ("asr", "asr_keyword", "over_refusal", "over_refusal_keyword", "helpfulness", "cap_helpfulness",
               "ref_logprob")
COSTS = {"over_refusal": ("max_over_refusal_rise", 1), "over_refusal_keyword": ("max_over_refusal_rise", 1),
         "helpfulness": ("max_helpfulness_drop", -1), "cap_helpfulness": ("max_capability_drop", -1)}
NAMES = {"asr": "ASR (judge)", "asr_keyword": "ASR (keyword)", "over_refusal": "over-refusal (judge)",
         "over_refusal_keyword": "over-refusal (keyword)", "helpfulness": "helpfulness",
         "cap_helpfulness": "capability", "ref_logprob": "ref log-lik"}


def _cell(d: dict) -> str:
    if d.get("diff") is None:
        return "n/a (no request rated by every arm)"
    return f"{d['diff']:+.2f} [{d['lo']:+.2f},{d['hi']:+.2f}]"


def _valid(report: dict, sft_arms: list[str], arms: list[str], key: str) -> tuple[bool, list[str]]:
    """Whether every (SFT-only arm, point arm) comparison of ``key`` is valid, and the reasons if not."""
    ok, reasons = True, []
    for c in report["comparisons"]:
        if not ({c["a"], c["b"]} & set(sft_arms) and {c["a"], c["b"]} & set(arms)):
            continue
        d = c["differences"].get(key)
        if d is None or not d.get("valid", c["valid"]):
            ok = False
            reasons += [r for r in c["reasons"] if r not in reasons]
    return ok, reasons


def compare_size(by_arm: dict[str, list[dict]], sft_arms: list[str], arms: list[str], key: str,
                 n_boot: int, seed: int) -> dict:
    """One size against SFT-only on one metric: difference, interval, raw p, requests."""
    values = {arm: _per_request(by_arm[arm], key) for arm in (*sft_arms, *arms)}
    common = sorted(set.intersection(*(set(v) for v in values.values())))
    if not common:
        return {"n": 0, "diff": None, "lo": None, "hi": None, "p_value": None}
    a = np.array([[values[arm][r] for arm in sft_arms] for r in common])
    b = np.array([[values[arm][r] for arm in arms] for r in common])
    d = crossed_bootstrap(a, b, n_boot, seed)
    return {"n": d.n, "diff": d.diff, "lo": d.lo, "hi": d.hi, "p_value": d.p_value}


def _cost_failures(sw: SweepConfig, metrics: dict, checked: set[str]) -> list[str]:
    """The costs past their limit at one size, one line each."""
    failed = []
    for key, (limit_name, sign) in COSTS.items():
        d, limit = metrics.get(key), getattr(sw, limit_name)
        if key not in checked or limit is None or d is None or d["diff"] is None:
            continue
        worst = d["diff"] if sw.cost_bound == "estimate" else (d["hi"] if sign > 0 else d["lo"])
        if sign * worst > limit:
            failed.append(f"{NAMES[key]} {_cell(d)} past sweep.{limit_name}={limit} ({sw.cost_bound})")
    return failed


def _falls(d: dict | None, alpha: float) -> bool:
    return bool(d) and d["diff"] is not None and d["diff"] < 0 and d["p_holm"] < alpha


def judge_size(sw: SweepConfig, row: dict) -> None:
    """Status of one size by the rule: beats | no | INVALID, with the reasons."""
    m = row["metrics"]
    ruled = set(sw.harm_metrics) | (set() if sw.invalid == "harm" else set(COSTS))
    invalid = [k for k in ruled if k in m and not m[k]["valid"]]
    row["cost_failures"] = _cost_failures(sw, m, {k for k in COSTS if k in m and m[k]["valid"]})
    falls = [_falls(m.get(k), sw.alpha) for k in sw.harm_metrics]
    row["status"] = "INVALID" if invalid else "beats" if all(falls) and not row["cost_failures"] else "no"
    row["invalid_metrics"] = sorted(invalid)


def analyse(rows: list[dict], report: dict, sft_arms: list[str], points: list[dict], sw: SweepConfig,
            n_boot: int = 2000, seed: int = 0) -> dict:
    """Per size, each metric's paired difference from SFT-only, Holm-adjusted, and the rule's status.

    ``points``: dicts with size, seed and arm (the evaluate's arm name), optionally cost.
    """
    by_arm: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_arm[r["arm"]].append(r)
    measured = {k for arm in sft_arms for k in report["arms"][arm]["metrics"]}
    keys = [k for k in DIFFERENCES if k in measured]
    sizes = sorted({p["size"] for p in points})
    table = []
    for size in sizes:
        arms = [p["arm"] for p in points if p["size"] == size]
        metrics = {}
        for key in keys:
            d = compare_size(by_arm, sft_arms, arms, key, n_boot, seed)
            ok, reasons = _valid(report, sft_arms, arms, key)
            metrics[key] = {**d, "valid": ok, "reasons": reasons}
        table.append({"pairs": size, "seeds": len(arms), "arms": arms, "metrics": metrics,
                      "levels": _levels(report, arms, keys), "cost": _size_cost(points, size)})
    for key in keys:
        adjusted = holm([row["metrics"][key]["p_value"] for row in table])
        for row, p in zip(table, adjusted):
            row["metrics"][key]["p_holm"] = p
    for row in table:
        judge_size(sw, row)
    return {"sizes": table, "baseline": {"arms": sft_arms, "levels": _levels(report, sft_arms, keys)},
            "scheme": __doc__.split("Scheme.  ")[1].split("\n\n")[0].replace("\n", " ")}


def _levels(report: dict, arms: list[str], keys: list[str]) -> dict:
    """Mean over the arms (seeds) of each metric's level, for the plot's left column."""
    out = {}
    for key in keys:
        got = [e.get("rate", e.get("mean")) for a in arms if (e := report["arms"][a]["metrics"].get(key))]
        got = [v for v in got if v is not None]
        out[key] = sum(got) / len(got) if got else None
    return out


def _size_cost(points: list[dict], size: int) -> dict | None:
    """Mean over a size's points of each point's measured cost (wall, device seconds, price)."""
    costs = [p["cost"] for p in points if p["size"] == size and p.get("cost")]
    if not costs:
        return None
    return {k: sum(c[k] for c in costs) / len(costs) for k in ("wall_s", "device_s", "price")}


def _rated_by_request(rows: list[dict], arm: str, key: str) -> dict[str, list[float]]:
    by_request: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["arm"] == arm and metric_key(r["metric"], r["rater"]) == key and r["parse_ok"] and not r["failed"] \
                and r["score"] is not None:
            by_request[r["request_id"]].append(r["score"])
    return by_request


def power(rows: list[dict], sft_arms: list[str], sw: SweepConfig, seeds: int) -> dict:
    """The smallest ASR difference the sweep's harm requests could detect, from what was measured:
    the SFT-only rate (the configured base rate when it is 0, 1 or undefined), the ICC of a
    request's responses (sweep.icc when set) and the mean responses per request.  The first harm
    metric with rated responses is used; with none rated, the design alone (every harm response
    of SFT-only, the configured base rate)."""
    key = next((k for k in sw.harm_metrics if _rated_by_request(rows, sft_arms[0], k)), None)
    by_request = _rated_by_request(rows, sft_arms[0], key) if key else defaultdict(list)
    if not by_request:  # nothing rated: the design's requests and responses, no measured rate or ICC
        for r in rows:
            if r["arm"] == sft_arms[0] and r["metric"] == "asr" and r["rater"] == "judge":
                by_request[r["request_id"]].append(sw.base_rate)
    if not by_request:
        return {"metric": sw.harm_metrics[0], "mde": None, "requests": 0}
    scores = [s for v in by_request.values() for s in v]
    rate = sum(scores) / len(scores) if key else None
    base = rate if rate is not None and 0 < rate < 1 else sw.base_rate
    icc = sw.icc if sw.icc is not None else icc_oneway(list(by_request.values())) if key else None
    m = len(scores) / len(by_request)
    mde = min_detectable_difference(base, len(by_request), m, 1.0 if icc is None else icc, len(sft_arms), seeds,
                                    sw.alpha, sw.power)
    return {"metric": key or f"{sw.harm_metrics[0]} (no response rated: design only)", "mde": mde,
            "requests": len(by_request), "responses_per_request": m, "base_rate": base,
            "base_rate_from": "measured" if base == rate else "sweep.base_rate",
            "icc": icc, "icc_from": "sweep.icc" if sw.icc is not None else "measured" if icc is not None
            else "not estimable: 1 assumed", "alpha": sw.alpha, "power": sw.power}


def answer(analysis: dict, sw: SweepConfig, mde: float | None) -> dict:
    """The one line, and whether the sweep was UNDERPOWERED."""
    table, first = analysis["sizes"], sw.harm_metrics[0]
    beating = [row for row in table if row["status"] == "beats"]
    detect = f"smallest difference these sets could detect: {mde:.2f}" if mde is not None else \
        "smallest detectable difference unknown (no rated harm request)"
    half = [(row["metrics"][first]["hi"] - row["metrics"][first]["lo"]) / 2 for row in table
            if row["metrics"].get(first, {}).get("diff") is not None]
    fell = [row for row in table if row["status"] != "beats" and _falls(row["metrics"].get(first), sw.alpha)]
    # An interval of zero width (every request unchanged) is no evidence on its own: a design whose
    # detectable difference is above the target cannot say "no effect" either.
    blind = not half or min(half) > sw.target_effect or (mde is not None and mde > sw.target_effect)
    every_invalid = all(r["status"] == "INVALID" for r in table)
    underpowered = not beating and not fell and blind and not every_invalid
    if beating:
        row = beating[0]
        harm = ", ".join(f"{k} {_cell(row['metrics'][k])} Holm p={row['metrics'][k]['p_holm']:.3f}"
                         for k in sw.harm_metrics)
        costs = "; ".join(f"{NAMES[k]} {_cell(row['metrics'][k])}" for k in COSTS if k in row["metrics"])
        price = f" for ${row['cost']['price']:.2f} a point" if row.get("cost") else ""
        later = [f"{r['pairs']:,}" for r in table if r["pairs"] > row["pairs"] and r["status"] != "beats"]
        tail = f"; not at {', '.join(later)} pairs" if later else ""
        line = f"DPO beats SFT-only on ASR from {row['pairs']:,} pairs{price}: {harm}; {costs or 'no cost measured'}{tail}"
    else:
        row = table[-1]
        d = row["metrics"].get(first, {})
        mark = " INVALID" if row["status"] == "INVALID" else ""
        p = f", Holm p={d['p_holm']:.3f}" if d.get("p_holm") is not None else ""
        largest = f"largest {row['pairs']:,} pairs{mark}: {first} {_cell(d)}{p}"
        if every_invalid:
            reasons = row["metrics"].get(first, {}).get("reasons") or ["see the evaluate report"]
            line = f"INVALID: no size could be compared with SFT-only ({largest}; {reasons[0]}); {detect}"
        elif underpowered:
            line = (f"UNDERPOWERED: no size tried beats SFT-only, and these sets cannot tell a fall of "
                    f"sweep.target_effect={sw.target_effect} in {first} from none ({largest}); {detect}")
        else:
            line = f"no size tried beats SFT-only ({largest}); {detect}"
        if fell:
            why = ", ".join(f"{r['pairs']:,} pairs ({(r['cost_failures'] or ['INVALID: ' + ', '.join(r['invalid_metrics'])])[0]})"
                            for r in fell)
            line += f"; {first} fell but the rule refused {why}"
    return {"line": line, "underpowered": underpowered, "beats_from": beating[0]["pairs"] if beating else None}


def variance_sources(sw: SweepConfig, temperature: float, samples_per_prompt: int) -> dict:
    """Which sources of variance the intervals sample and which the sweep held fixed."""
    sampled, fixed = ["eval requests (bootstrap over requests)"], ["generation: one generate pass makes every pair"]
    (sampled if len(sw.sft_seeds) > 1 else fixed).append(f"SFT training ({len(sw.sft_seeds)} seed(s), sweep.sft_seeds)")
    (sampled if len(sw.seeds) > 1 else fixed).append(f"DPO subset and order ({len(sw.seeds)} seed(s), sweep.seeds)")
    (sampled if temperature > 0 else fixed).append(
        f"evaluation sampling (temperature {temperature}, {samples_per_prompt} sample(s) per prompt)")
    return {"sampled": sampled, "fixed": fixed}


def flat(analysis: dict) -> list[dict]:
    """One plain row per size for sweep_summary.json and MLflow's table view."""
    out = []
    for row in analysis["sizes"]:
        flat_row = {"pairs": row["pairs"], "seeds": row["seeds"], "status": row["status"]}
        for key, d in row["metrics"].items():
            flat_row.update({f"{key}": row["levels"].get(key), f"diff_{key}": number_or_none(d["diff"]),
                             f"diff_{key}_lo": number_or_none(d["lo"]), f"diff_{key}_hi": number_or_none(d["hi"]),
                             f"p_holm_{key}": number_or_none(d["p_holm"])})
        for k, v in (row.get("cost") or {}).items():
            flat_row[f"cost_{k}"] = v
        out.append(flat_row)
    return out


def summarize(rows: list[dict], report: dict, sft_arms: list[str], points: list[dict], sw: SweepConfig,
              temperature: float, samples_per_prompt: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """Analysis, power, the answer and the variance sources: what sweep.json and the parent run hold."""
    analysis = analyse(rows, report, sft_arms, points, sw, n_boot, seed)
    analysis["power"] = power(rows, sft_arms, sw, len(sw.seeds))
    analysis["answer"] = answer(analysis, sw, analysis["power"]["mde"])
    analysis["variance"] = variance_sources(sw, temperature, samples_per_prompt)
    analysis["selection"] = ("the sweep chooses nothing: every size is reported (Holm across sizes) on all "
                             "requests; evaluate.selection_share applies to iterate's stop rule")
    return analysis


def stage_cost(wall_s: float, devices: float, device_hour_cost: float) -> dict:
    """Measured wall seconds, device seconds held, and their price at estimate.device_hour_cost (the
    price of one device-hour: a GPU, or a CPU actor/worker when running on CPU, as in the estimate)."""
    return {"wall_s": wall_s, "device_s": wall_s * devices, "price": wall_s * devices / 3600 * device_hour_cost}


def train_devices(cfg) -> float:
    """Devices a training run holds: one per Ray Train worker (its GPU, or the worker on CPU)."""
    return float(cfg.train.workers)


def evaluate_devices(cfg) -> float:
    """Devices an evaluate holds: the generation actors' and the judge replicas' GPUs (or units on CPU)."""
    g, j = cfg.generate, cfg.judge
    return g.actors * (g.num_gpus_per_actor or 1) + j.replicas * (j.num_gpus or 1)


def planned_power(cfg) -> str:
    """The plan's line: the smallest ASR difference the configured harm sets, samples per prompt and
    seeds could detect, before any GPU-hour is spent (assumed base rate and ICC from sweep.*)."""
    from cai_ray.evaluation.sets import load_eval_sets

    sw = cfg.sweep
    rows, _ = load_eval_sets(cfg)
    per_request: dict[str, int] = defaultdict(int)
    for r in rows:
        if r["kind"] == "harm":
            per_request[r["request_id"]] += cfg.evaluate.samples_per_prompt
    if not per_request:
        return "power: no harm set in evaluate.sets, so no ASR difference can be detected"
    n, m = len(per_request), sum(per_request.values()) / len(per_request)
    icc = 1.0 if sw.icc is None else sw.icc

    def mde(alpha: float) -> float:
        return min_detectable_difference(sw.base_rate, n, m, icc, len(sw.sft_seeds), len(sw.seeds), alpha, sw.power)

    verdict = "resolves" if mde(sw.alpha) <= sw.target_effect else "cannot resolve"
    return (f"power: smallest ASR difference detectable at {sw.power:.0%} power, alpha={sw.alpha}: {mde(sw.alpha):.3f} "
            f"({mde(sw.alpha / len(sw.sizes)):.3f} at Holm's strictest step, alpha/{len(sw.sizes)}); {n} harm requests, "
            f"{m:.1f} responses each (evaluate.samples_per_prompt={cfg.evaluate.samples_per_prompt}), "
            f"{len(sw.sft_seeds)} SFT and {len(sw.seeds)} DPO seed(s), base rate sweep.base_rate={sw.base_rate}, "
            f"ICC {'sweep.icc=' + str(sw.icc) if sw.icc is not None else '1 assumed (sweep.icc unset)'}; "
            f"training-seed variance not included; {verdict} sweep.target_effect={sw.target_effect}")


def table_text(analysis: dict) -> str:
    """The per-size table the sweep prints: status, each difference from SFT-only, Holm p, cost."""
    lines = ["sweep: difference from SFT-only per size (mean over requests of DPO seeds - SFT seeds; 95% "
             "interval over requests x seeds; p Holm-adjusted across sizes)"]
    for row in analysis["sizes"]:
        cells = [f"{k} {_cell(d)}" + (f" p={d['p_holm']:.3f}" if d.get("p_holm") is not None else "")
                 + ("" if d["valid"] else " INVALID") + f" n={d['n']}" for k, d in row["metrics"].items()]
        cost = row.get("cost") or {}
        price = f"; ${cost['price']:.2f}, {cost['device_s'] / 3600:.2f} device-h a point" if cost else ""
        lines.append(f"  {row['pairs']:>9,} pairs x {row['seeds']} seed(s) {row['status']:<7}  {'; '.join(cells)}{price}")
    pw = analysis["power"]
    if pw.get("mde") is not None:
        icc = "n/a" if pw["icc"] is None else f"{pw['icc']:.2f}"
        lines.append(f"  power: detectable {pw['metric']} difference {pw['mde']:.3f} at {pw['power']:.0%}, "
                     f"alpha={pw['alpha']}: {pw['requests']} requests x {pw['responses_per_request']:.1f} "
                     f"responses, base rate {pw['base_rate']:.2f} ({pw['base_rate_from']}), ICC {icc} ({pw['icc_from']})")
    lines.append(f"  {analysis['selection']}")
    return "\n".join(lines)
