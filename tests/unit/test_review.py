"""Judge traces for people to review: the stratified sample, and judge-human agreement with worked numbers."""
from types import SimpleNamespace

import pytest
from mlflow.entities import AssessmentSource, Feedback

from cai_ray.evaluation import agreement
from cai_ray.evaluation.traces import review_sample, trace_records


def _row(arm, i, score, keyword=None, metric="asr", error=""):
    key = f"{arm}\x1fset\x1f{i}\x1f0\x1f{metric}\x1fjudge"
    judge = {"arm": arm, "set": "set", "id": str(i), "sample": 0, "metric": metric, "rater": "judge",
             "rubric": "harm", "key": key, "score": score, "parse_ok": score is not None, "raw": "x",
             "error": error, "request": f"q{i}", "response": f"r{i}", "request_id": f"q{i}"}
    rows = [judge]
    if keyword is not None:
        rows.append({**judge, "rater": "keyword", "key": key.replace("judge", "keyword"), "score": keyword})
    return rows


def _rows():
    rows = []
    for i in range(10):
        rows += _row("a", i, 0.0, keyword=0.0)       # judge no, keyword agrees
    rows += _row("a", 10, 1.0, keyword=0.0)          # judge yes, keyword disagrees
    rows += _row("a", 11, None, keyword=1.0)         # parse failures
    rows += _row("a", 12, None, keyword=0.0)
    rows += _row("a", 13, None, error="generation failed: boom")  # never judged
    for i in range(5):
        rows += _row("b", i, 0.0, keyword=0.0)
    return rows


def test_review_sample_covers_every_stratum_before_repeating_one():
    rows = _rows()
    chosen = review_sample(rows, 4, seed=0)
    by_key = {r["key"]: r for r in rows}
    strata = {(by_key[k]["arm"], by_key[k]["score"]) for k in chosen}
    # arm a: no / yes (disagreeing) / parse failure; arm b: no -- one each.
    assert strata == {("a", 0.0), ("a", 1.0), ("a", None), ("b", 0.0)}
    assert review_sample(rows, 4, seed=0) == chosen  # stable across reruns
    assert len(review_sample(rows, 100, seed=0)) == 18  # every judge call, none that was never judged


def test_trace_records_per_mode():
    rows = _rows()
    assert trace_records(rows, "none", 4, 0) == []
    sample = trace_records(rows, "sample", 4, 0)
    assert len(sample) == 4 and {r["tags"]["review"] for r in sample} == {"yes"}
    every = trace_records(rows, "all", 4, 0)
    assert len(every) == 18 and sum(r["tags"]["review"] == "yes" for r in every) == 4
    yes = next(r for r in every if r["inputs"]["id"] == "10" and r["inputs"]["arm"] == "a")
    assert {k: yes["tags"][k] for k in ("verdict", "keyword", "disagree", "metric", "review")} == {
        "verdict": "yes", "keyword": "no", "disagree": "yes", "metric": "asr", "review": "yes"}
    assert yes["outputs"]["verdict"] == 1.0 and yes["outputs"]["keyword_verdict"] == 0.0
    failed = next(r for r in every if r["inputs"]["id"] == "11")
    assert failed["tags"]["verdict"] == "parse_fail" and failed["outputs"]["parse_ok"] is False


def _fb(who, value, when=1, kind="HUMAN", run_id=None, name="asr"):
    fb = Feedback(name=name, value=value, source=AssessmentSource(source_type=kind, source_id=who))
    fb.last_update_time_ms, fb.run_id = when, run_id
    return fb


def _trace(arm, metric, judge, keyword, feedback, run="R", rubric=None):
    rubric = rubric or ("harm" if metric == "asr" else "helpfulness")
    tags = {"arm": arm, "metric": metric, "rubric": rubric, "verdict": judge, "keyword": keyword}
    info = SimpleNamespace(tags=tags, assessments=feedback, request_metadata={"mlflow.sourceRun": run})
    return SimpleNamespace(info=info)


def test_agreement_worked_numbers():
    h = "helpfulness"
    traces = [
        _trace("sft", "asr", "yes", "no", [_fb("alice", "no", when=1), _fb("alice", "yes", when=2)]),  # latest counts
        _trace("sft", "asr", "no", "no", [_fb("alice", "no"), _fb("bob", True), _fb("carol", 0)]),  # 2:1 -> no
        _trace("sft", "asr", "parse_fail", "yes", [_fb("alice", "yes")]),
        _trace("sft", "asr", "yes", "yes", [_fb("alice", "maybe")]),                      # off the scale
        _trace("sft", "asr", "no", "no", [_fb("alice", "yes"), _fb("bob", "no")]),         # tie
        _trace("sft", "asr", "yes", "yes", [_fb("llm", "no", kind="LLM_JUDGE")]),          # not a person
        _trace("sft", "asr", "no", "no", [_fb("alice", "no", run_id="D")]),                # deleted run
        _trace("sft", "asr", "no", "no", [_fb("alice", "yes")], run="X"),                  # another run
        _trace("base", h, "4", "none", [_fb("alice", 4, name=h)]),
        _trace("base", h, "2", "none", [_fb("alice", "5.0", name=h)]),
        _trace("base", h, "3", "none", [_fb("alice", 7, name=h)]),                         # off the scale
        _trace("base", h, "3", "none", [_fb("alice", 3, name="something else")]),          # not this metric
    ]
    items, skipped = agreement.reviewed(traces, "R", deleted={"D"})
    result = agreement.summarize(items, skipped)
    harm, helpful = sorted(result["blocks"], key=lambda b: b["rubric"])
    assert (harm["rubric"], harm["arm"], harm["reviewed"], harm["judge_correct"]) == ("harm", "sft", 3, 2)
    assert harm["judge_parse_failures"] == 1
    assert harm["kappa"] == pytest.approx(1.0)  # yes/no on the two that parsed, both right
    assert (harm["keyword_correct"], harm["keyword_reviewed"]) == (2, 3)
    assert harm["confusion"] == {"no": {"no": 1}, "yes": {"parse_fail": 1, "yes": 1}}
    assert harm["judge_accuracy"]["estimate"] == pytest.approx(2 / 3)
    assert 0 < harm["judge_accuracy"]["lo"] < 2 / 3 < harm["judge_accuracy"]["hi"] < 1
    # helpfulness: judge 4/2 vs people 4/5 -> p_o 0.5, p_e 0.25, kappa 1/3; no keyword rater.
    assert (helpful["reviewed"], helpful["judge_correct"]) == (2, 1)
    assert helpful["kappa"] == pytest.approx(1 / 3) and "keyword_accuracy" not in helpful
    assert result["between_people"] == {"traces": 1, "pairs": 3, "agreement": pytest.approx(1 / 3)}
    assert result["skipped"] == {"value off the asr scale (attack success: yes or no)": 1,
                                 "value off the helpfulness scale (1 to 5)": 1, "people tie (no majority)": 1,
                                 "from a deleted run": 1, "on a trace of another run": 1}
    assert result["people"] == ["alice", "bob", "carol"]
    text = agreement.text(result)
    assert "harm                    sft                 3  0.67" in text and "people vs people: 0.33" in text
    metrics = agreement.flat_metrics(result)
    assert metrics["agreement/harm/sft/reviewed"] == 3 and metrics["agreement/harm/sft/keyword_accuracy"] == pytest.approx(2 / 3)
