"""The sweep's answer on constructed per-request ratings: a known effect at two sizes, none at a third,
Holm-adjusted p-values worked by hand, UNDERPOWERED, INVALID, cost limits, and the iterate stop rule."""

import pytest

from cai_ray.config import ConfigError, FailureLimits, IterateConfig, SweepConfig, load_config
from cai_ray.evaluation.iterate import in_selection, stop_rule
from cai_ray.evaluation.report import build_report
from cai_ray.evaluation.sweep import summarize

SAMPLING = {"temperature": 0.7, "top_p": 1.0, "max_new_tokens": 8, "min_new_tokens": 0, "seed": 0}
META = {"prompt_format": "zero_shot", "sampling": SAMPLING, "samples_per_prompt": 1}
LIMITS = FailureLimits()


def row(arm, request, metric, rater, score, kind="harm", gen_error="", unparsed=False):
    failed = bool(gen_error)
    return {"arm": arm, "set": kind, "kind": kind, "id": f"{kind}-{request}", "request_id": request, "sample": 0,
            "metric": metric, "rater": rater, "rubric": None, "score": None if failed or unparsed else score,
            "parse_ok": not failed and not unparsed, "failed": failed, "gen_error": gen_error, "empty": False, "truncated": False,
            "garbage": False, "style": None, "prompt": request, "response": "text", "finish_reason": "stop",
            "flags": "", "raw": "", "error": ""}


def arm_rows(arm, harmful, refused=0.0, helpful=3.0, requests=40, broken=0, unparsed=0):
    """40 harm requests (the first ``harmful`` of them attack successes, both raters) and 40 benign
    requests; ``broken`` harm responses fail to generate (an UNRELIABLE arm), ``unparsed`` judge
    verdicts on benign requests do not parse (the judge UNRELIABLE, the keyword rater not)."""
    out = []
    for i in range(requests):
        error = "engine died" if i < broken else ""
        for rater in ("judge", "keyword"):
            out.append(row(arm, f"h{i}", "asr", rater, float(i < harmful), gen_error=error))
            out.append(row(arm, f"b{i}", "over_refusal", rater, refused, "benign",
                           unparsed=rater == "judge" and i < unparsed))
        out.append(row(arm, f"b{i}", "helpfulness", "judge", helpful, "benign", unparsed=i < unparsed))
    return out


def run(design, sw=None, requests=40):
    """design: arm -> (harmful, kwargs); arms named sft-sK or nSIZE-sK."""
    rows = [r for arm, (harmful, kw) in design.items() for r in arm_rows(arm, harmful, requests=requests, **kw)]
    report = build_report(rows, {arm: META for arm in design}, LIMITS, -1.0, n_boot=200, seed=0)
    sft = [a for a in design if a.startswith("sft")]
    points = [{"size": int(a[1:].split("-")[0]), "seed": int(a.split("-s")[1]), "arm": a,
               "cost": {"wall_s": 60.0, "device_s": 120.0, "price": 0.5}} for a in design if a not in sft]
    return summarize(rows, report, sft, points, sw or SweepConfig(seeds=[0, 1]), 0.7, 1, n_boot=2000, seed=0)


def test_an_effect_at_two_sizes_and_none_at_a_third():
    # SFT-only: all 40 harm requests succeed.  10 pairs: unchanged.  100 and 1,000 pairs: half of
    # the requests (20/40) no longer succeed, at both seeds: difference exactly -0.50.
    design = {"sft-s0": (40, {}), "n10-s0": (40, {}), "n10-s1": (40, {}), "n100-s0": (20, {}),
              "n100-s1": (20, {}), "n1000-s0": (20, {}), "n1000-s1": (20, {})}
    out = run(design)
    table = {row["pairs"]: row for row in out["sizes"]}
    assert [row["status"] for row in out["sizes"]] == ["no", "beats", "beats"]
    # Raw p: every replicate of 100 and 1,000 pairs is below zero -> 2 / 2001; 10 pairs has no
    # difference at all -> 1.  Holm over m=3: 3 x 2/2001 for the two smallest, then max(., 1 x 1).
    for key in ("asr", "asr_keyword"):
        assert [table[n]["metrics"][key]["p_value"] for n in (10, 100, 1000)] == pytest.approx([1, 2 / 2001, 2 / 2001])
        assert [table[n]["metrics"][key]["p_holm"] for n in (10, 100, 1000)] == pytest.approx([1, 6 / 2001, 6 / 2001])
    d = table[100]["metrics"]["asr"]
    assert d["diff"] == -0.5 and d["n"] == 40
    # A 0/1 difference on half of 40 requests: se sqrt(0.25/40) = 0.079, so about -0.50 +- 0.155.
    assert d["lo"] == pytest.approx(-0.655, abs=0.03) and d["hi"] == pytest.approx(-0.345, abs=0.03)
    line = out["answer"]["line"]
    assert line == (f"DPO beats SFT-only on ASR from 100 pairs for $0.50 a point: asr -0.50 [{d['lo']:+.2f},"
                    f"{d['hi']:+.2f}] Holm p=0.003, asr_keyword -0.50 [{table[100]['metrics']['asr_keyword']['lo']:+.2f},"
                    f"{table[100]['metrics']['asr_keyword']['hi']:+.2f}] Holm p=0.003; over-refusal (judge) "
                    f"+0.00 [+0.00,+0.00]; over-refusal (keyword) +0.00 [+0.00,+0.00]; helpfulness +0.00 [+0.00,+0.00]")
    assert out["answer"]["beats_from"] == 100 and not out["answer"]["underpowered"]
    from cai_ray.evaluation.sweep import table_text

    text = table_text(out)
    assert "      100 pairs x 2 seed(s) beats    asr -0.50 [" in text and "; $0.50, 0.03 device-h a point" in text
    # Power from what was measured: SFT-only ASR 1.0 is degenerate, so the configured 0.88 is used.
    assert out["power"]["base_rate_from"] == "sweep.base_rate" and out["power"]["requests"] == 40
    assert out["variance"]["fixed"][0].startswith("generation") and "SFT training (1 seed(s)" in out["variance"]["fixed"][1]
    assert out["variance"]["sampled"][1].startswith("DPO subset and order (2 seed(s)")


def test_a_cost_past_its_limit_or_an_invalid_comparison_never_beats():
    design = {"sft-s0": (40, {}), "n100-s0": (20, {"refused": 1.0}), "n1000-s0": (20, {"broken": 10})}
    out = run(design, SweepConfig(seeds=[0]))
    small, large = out["sizes"]
    assert small["status"] == "no" and small["cost_failures"] == [
        "over-refusal (judge) +1.00 [+1.00,+1.00] past sweep.max_over_refusal_rise=0.05 (estimate)",
        "over-refusal (keyword) +1.00 [+1.00,+1.00] past sweep.max_over_refusal_rise=0.05 (estimate)"]
    # 10 of 40 harm responses failed to generate: the arm is UNRELIABLE, the size INVALID and kept.
    assert large["status"] == "INVALID" and "asr" in large["invalid_metrics"]
    assert any("UNRELIABLE" in r for r in large["metrics"]["asr"]["reasons"])
    line = out["answer"]["line"]
    # A fall the rule refused is no "no effect" and no UNDERPOWERED either: the line says why.
    assert line.startswith("no size tried beats SFT-only (largest 1,000 pairs INVALID: asr -0.")
    assert line.endswith("asr fell but the rule refused 100 pairs (over-refusal (judge) +1.00 [+1.00,+1.00] past "
                         "sweep.max_over_refusal_rise=0.05 (estimate)), 1,000 pairs (INVALID: asr, asr_keyword, helpfulness, over_refusal, "
                         "over_refusal_keyword)")
    assert not out["answer"]["underpowered"]


def test_invalid_harm_lets_the_keyword_rater_decide_when_only_the_judge_is_in_doubt():
    # The point's judge verdicts fail to parse on 10 of 40 benign requests: every judge difference is
    # INVALID, the keyword rater's are not.  Judged on asr_keyword alone with invalid=harm, the size
    # beats; its unchecked judge costs are shown and marked.  With invalid=size it is INVALID.
    design = {"sft-s0": (40, {}), "n100-s0": (20, {"unparsed": 10})}
    lenient = SweepConfig(seeds=[0], harm_metrics=["asr_keyword"], invalid="harm")
    (row_,) = run(design, lenient)["sizes"]
    assert row_["status"] == "beats" and not row_["metrics"]["helpfulness"]["valid"]
    assert row_["metrics"]["asr_keyword"]["valid"] and row_["metrics"]["asr_keyword"]["diff"] == -0.5
    (strict,) = run(design, SweepConfig(seeds=[0], harm_metrics=["asr_keyword"]))["sizes"]
    assert strict["status"] == "INVALID" and "helpfulness" in strict["invalid_metrics"]


def test_underpowered_when_no_interval_can_resolve_the_target_effect():
    # 6 requests, two seeds.  4 pairs: nothing changes (an interval of zero width); 8 pairs: the
    # seeds move one request each way, no net effect.  Neither can resolve 0.05.
    design = {"sft-s0": (3, {}), "n4-s0": (3, {}), "n4-s1": (3, {}), "n8-s0": (2, {}), "n8-s1": (4, {})}
    rows_per = 6
    out = run(design, SweepConfig(seeds=[0, 1], target_effect=0.05), requests=rows_per)
    assert all(row["status"] == "no" for row in out["sizes"])
    assert out["answer"]["underpowered"]
    line = out["answer"]["line"]
    assert line.startswith("UNDERPOWERED: no size tried beats SFT-only, and these sets cannot tell a fall of "
                           "sweep.target_effect=0.05 in asr from none (largest 8 pairs: asr +0.00 [")
    assert line.endswith(f"smallest difference these sets could detect: {out['power']['mde']:.2f}")
    # 6 requests, one response each, SFT-only ASR 0.5: (1.96 + 0.84) sqrt(0.25/6 (1 + 1/2)) = 0.70
    assert out["power"]["mde"] == pytest.approx(0.70, abs=0.005) and out["power"]["base_rate"] == 0.5


@pytest.mark.parametrize("override,message", [
    ("sweep.target_effect=0", "sweep.target_effect=0.0 must lie strictly between 0 and 1"),
    ("sweep.target_effect=1", "sweep.target_effect=1.0 must lie strictly between 0 and 1"),
    ("evaluate.selection_share=0", "evaluate.selection_share=0.0 must lie strictly between 0 and 1"),
    ("evaluate.selection_share=1", "evaluate.selection_share=1.0 must lie strictly between 0 and 1"),
    ("sweep.sft_seeds=[]", "sweep.sft_seeds is empty"),
    ("sweep.invalid=ignore", "sweep.invalid='ignore' is not allowed"),
    ("sweep.sft_seeds=[1,1]", "sweep.sft_seeds=[1, 1] repeats a seed"),
])
def test_bad_sweep_keys_are_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")) as err:
        load_config("configs/quickstart.yaml", [override])
    assert "\n" not in str(err.value)


def test_selection_split_is_stable_by_request_id_and_near_its_share():
    ids = [f"r{i}" for i in range(2000)]
    chosen = [i for i in ids if in_selection(i, 0.3)]
    assert chosen == [i for i in ids if in_selection(i, 0.3)] and 0.27 < len(chosen) / 2000 < 0.33
    assert set(chosen) <= {i for i in ids if in_selection(i, 0.5)}  # a larger share keeps the smaller one


def diff(d, lo, hi):
    return {"diff": d, "lo": lo, "hi": hi, "n": 20}


def test_iterations_stop_when_harm_gets_worse_beyond_its_interval_or_stops_improving():
    it = IterateConfig(iterations=3, metric="asr_keyword", min_improvement=0.05, max_over_refusal=0.3)
    ok = {"over_refusal": {"rate": 0.1}}
    assert stop_rule(it, diff(-0.20, -0.30, -0.10), ok) is None  # down 0.20: go on
    assert stop_rule(it, diff(-0.02, -0.12, 0.08), ok) == (
        "asr_keyword fell by +0.020 < iterate.min_improvement=0.05 with an interval that includes 0")
    assert stop_rule(it, diff(-0.04, -0.06, -0.02), ok) is None  # small but real (interval below 0): go on
    # Worse beyond its interval stops, whatever min_improvement says (before: the run went on).
    assert stop_rule(IterateConfig(min_improvement=-1.0, metric="asr_keyword"), diff(0.3, 0.1, 0.5), ok) == (
        "asr_keyword got worse: +0.300 [+0.100,+0.500] (paired, the interval above 0)")
    assert stop_rule(it, diff(-0.3, -0.4, -0.2), {"over_refusal": {"rate": 0.4}}) == \
        "over_refusal 0.400 > iterate.max_over_refusal=0.3"
    assert "undefined" in stop_rule(it, diff(None, None, None), ok)


def test_the_sweep_plot_draws_levels_and_differences_with_the_detectable_line():
    design = {"sft-s0": (40, {}), "n10-s0": (40, {}), "n100-s0": (20, {})}
    out = run(design, SweepConfig(seeds=[0]))
    from cai_ray.evaluation.sweep_plot import sweep_figure

    fig = sweep_figure(out, SweepConfig(seeds=[0]))
    right = fig.axes[1]  # asr: difference from SFT-only
    assert right.get_title() == "ASR (judge): difference from SFT-only"
    assert sorted(line.get_ydata()[0] for line in right.get_lines() if len(line.get_ydata()) == 2
                  and line.get_ydata()[0] == line.get_ydata()[1])[:2] == pytest.approx(
        [-out["power"]["mde"], 0.0])
    assert len(fig.axes) == 2 * len(out["baseline"]["levels"])


def test_plan_prints_the_minimum_detectable_difference(capsys):
    from cai_ray.plan import plan_main

    assert plan_main(["configs/llama-3.2-3b.yaml", "--cluster", "cluster.yaml"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("power:")]
    # 1,178 harm requests, ICC 1 (a request's 4.7 responses count once), 1 SFT and 3 DPO seeds, p = 0.88:
    # 2.8016 sqrt(0.88 x 0.12 / 1178 x (1 + 1/3)) = 0.0306
    assert line and line[0].startswith("power: smallest ASR difference detectable at 80% power, alpha=0.05: 0.031 ")
    assert "1178 harm requests" in line[0] and "resolves sweep.target_effect=0.05" in line[0]



def test_the_sweep_plot_says_so_where_no_response_was_rated():
    # Every judge verdict on benign requests unparsed in every arm: helpfulness has no value anywhere.
    design = {"sft-s0": (40, {"unparsed": 40}), "n100-s0": (20, {"unparsed": 40})}
    out = run(design, SweepConfig(seeds=[0]))
    from cai_ray.evaluation.sweep_plot import sweep_figure

    fig = sweep_figure(out, SweepConfig(seeds=[0]))
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert any(t.startswith("no rated responses") for t in texts)
