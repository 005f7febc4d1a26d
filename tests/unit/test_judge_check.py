"""The judge check without a model: the shipped labelled set, bad check files, the accuracy maths."""

import json

import pytest

from cai_ray.config import JudgeConfig
from cai_ray.evaluation.judge_check import check_requests, check_text, load_check_rows, summarize
from cai_ray.judge.rubrics import RUBRICS

CATEGORIES = {"clear_compliance", "clear_refusal", "partial_compliance", "disclaimer_compliance", "over_refusal",
              "off_topic", "quotes_rubric", "other_language"}


def test_shipped_set_is_large_varied_and_balanced():
    rows = load_check_rows(JudgeConfig())
    assert len(rows) >= 150
    assert CATEGORIES <= {r["category"] for r in rows}
    by_verdict = {v: [r["label"] for r in rows if r["verdict"] == v] for v in ("attack_success", "refused")}
    for labels in by_verdict.values():  # both answers well represented, so accuracy is not one class
        assert len(labels) >= 60 and 0.35 <= sum(labels) / len(labels) <= 0.65
    assert len({r["id"] for r in rows}) == len(rows)


def test_compliant_harm_replies_are_placeholders_not_instructions():
    rows = [r for r in load_check_rows(JudgeConfig()) if r["verdict"] == "attack_success" and r["label"]]
    # Every compliant reply keeps its substance in [brackets]: an outline, never working detail.
    assert rows and all("[" in r["response"] and "]" in r["response"] for r in rows)


def test_requests_use_the_configured_harm_rubric_and_the_refusal_rubric():
    judge = JudgeConfig(harm_rubric="harmful", check_limit=3)
    rows = load_check_rows(judge)
    assert len(rows) == 6
    assert [q["rubric"] for q in check_requests(judge, rows)] == ["harmful"] * 3 + ["refusal"] * 3


def write(tmp_path, rows, name="mine.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = {"id": "u1", "kind": "benign", "request": "What is 2+2?", "response": "4.", "refused": "no"}


@pytest.mark.parametrize("bad,message", [
    ({**GOOD, "refused": None}, "mine.jsonl: row 2: column 'refused' is missing"),
    ({k: v for k, v in GOOD.items() if k != "refused"} | {"attack_success": "no"},
     "mine.jsonl: row 2: column 'refused' is missing"),
    ({**GOOD, "refused": "maybe"}, "mine.jsonl: row 2: column 'refused': 'maybe' is not a verdict; use yes or no"),
    ({**GOOD, "kind": "style"}, "mine.jsonl: row 2: column 'kind': 'style' is not a check kind"),
    ({**GOOD, "id": "u0"}, "mine.jsonl: row 2: column 'id': duplicate id 'u0' (first at"),
    ({**GOOD, "id": "jc-001"}, "mine.jsonl: row 2: column 'id': duplicate id 'jc-001' (first at judge_check (shipped) row 1)"),
    ({**GOOD, "response": ""}, "mine.jsonl: line 2: column 'response' is empty"),
])
def test_bad_check_rows_fail_in_one_line_naming_file_row_and_column(tmp_path, bad, message):
    path = write(tmp_path, [{**GOOD, "id": "u0"}, bad])
    with pytest.raises(ValueError) as info:
        load_check_rows(JudgeConfig(check_data=[path]))
    text = str(info.value)
    assert message in text and "\n" not in text


def test_missing_file_and_missing_column_everywhere(tmp_path):
    with pytest.raises(ValueError, match="judge.check_data: .*nope.jsonl: no such file"):
        load_check_rows(JudgeConfig(check_data=[str(tmp_path / "nope.jsonl")]))
    path = write(tmp_path, [{k: v for k, v in GOOD.items() if k != "request"}])
    with pytest.raises(ValueError, match="is missing column\\(s\\) request"):
        load_check_rows(JudgeConfig(check_data=[path]))


def verdicts_for(judge, rows, answer):
    """The judge's reply per request, as judge_requests returns it, from ``answer(row) -> raw text``."""
    out = {}
    for r, q in zip(rows, check_requests(judge, rows)):
        raw = answer(r)
        if raw is None:
            out[q["key"]] = {"failed": True, "parse_ok": False, "score": None, "error": "judge unreachable"}
            continue
        v = RUBRICS[q["rubric"]].parse(raw)
        score = None if not v.parse_ok else float(v.value if q["rubric"] != "harmful" else v.value)
        out[q["key"]] = {"failed": False, "parse_ok": v.parse_ok, "value": score, "score": score, "error": v.error}
    return out


def test_accuracy_counts_parse_failures_as_wrong_and_fills_the_confusion_table():
    judge = JudgeConfig(harm_rubric="harmful", check_limit=20)
    rows = load_check_rows(judge)
    field = {"attack_success": "harmful", "refused": "refused"}

    def answer(r):  # right on the first 10 of each verdict, format echo on the rest
        n = sum(1 for x in rows[:rows.index(r)] if x["verdict"] == r["verdict"])
        truth = "yes" if r["label"] else "no"
        return f"{field[r['verdict']]}: {truth}" if n < 10 else f"{field[r['verdict']]}: yes or no"

    s = summarize(judge, rows, verdicts_for(judge, rows, answer))
    asr = s["metrics"]["asr"]
    assert (asr["n"], asr["correct"], asr["parse_failures"], asr["judge_failures"]) == (20, 10, 10, 0)
    assert asr["accuracy"] == 0.5 and asr["accuracy_parsed"] == 1.0 and asr["suspect"]
    assert sum(asr["confusion"][t]["failed"] for t in ("yes", "no")) == 10
    assert asr["lo"] == pytest.approx(0.299, abs=0.01) and asr["hi"] == pytest.approx(0.701, abs=0.01)
    assert s["suspect"] == ["asr", "over_refusal"]
    text = check_text(s)
    assert "asr (harmful, column attack_success): accuracy 0.50 [0.30,0.70] 10/20; parse failures 10/20" in text
    assert "echoed the format hint for 'harmful'" in text


def test_a_judge_that_returns_nothing_fails_every_row():
    judge = JudgeConfig()
    rows = load_check_rows(judge)
    s = summarize(judge, rows, verdicts_for(judge, rows, lambda r: None))
    for c in s["metrics"].values():
        assert c["correct"] == 0 and c["judge_failures"] == c["n"] and c["accuracy"] == 0.0 and c["suspect"]
        assert c["accuracy_parsed"] is None
    assert s["rows"] == len(rows) and sum(c["n"] for c in s["metrics"].values()) == len(rows)
    s = summarize(judge, rows, {})  # verdicts lost entirely: still every row, as failures
    assert all(c["judge_failures"] == c["n"] for c in s["metrics"].values())


def test_a_judge_that_is_always_right_passes():
    judge = JudgeConfig(harm_rubric="harmful")
    rows = load_check_rows(judge)
    field = {"attack_success": "harmful", "refused": "refused"}
    s = summarize(judge, rows, verdicts_for(judge, rows, lambda r: f"{field[r['verdict']]}: {'yes' if r['label'] else 'no'}"))
    assert s["suspect"] == [] and all(c["accuracy"] == 1.0 and c["lo"] > 0.9 for c in s["metrics"].values())
