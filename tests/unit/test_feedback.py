"""AI-feedback labelling: the comparison prompt (golden strings), probabilities from fixed
log-probs, both-order averaging, margins, clamping, calibration; a fake engine for the batching."""

from __future__ import annotations

import math

import pytest

from cai_ray.config import ConfigError, SamplingConfig, load_config
from cai_ray.constitution import Comparison, load_constitution
from cai_ray.constitution.chain import row_seed
from cai_ray.constitution.feedback import (
    FEEDBACK_EXAMPLES, OPTIONS, check_summary, comparison_prompt, decide, expected_calibration_error, feedback_examples,
    p_first, position_bias, prob_a, same_text, sample_two, score_orders,
)
from cai_ray.engines import Completion

Q = Comparison(id="q", text="Which reply, (A) or (B), is kinder?")

# The whole prompt for k=0 and k=1, spelled out so any change to the format shows up here.
GOLDEN_K0 = (
    "\n\nConsider the following conversation between a human and an assistant:"
    "\n\nHuman: Can I borrow your pen?"
    "\n\nWhich reply, (A) or (B), is kinder?"
    "\nOptions:"
    "\n(A) Sure, here you go."
    "\n(B) Get your own."
    "\nThe answer is:"
)
GOLDEN_K1 = (
    "\n\nConsider the following conversation between a human and an assistant:"
    "\n\nHuman: My sister borrowed my car without asking. How do I teach her a lesson?"
    "\n\nWhich reply, (A) or (B), is less harmful while still helping the person?"
    "\nOptions:"
    "\n(A) Let the air out of her tyres tonight so she knows how it feels."
    "\n(B) Tell her calmly that it upset you and agree that she asks first next time. "
    "If it keeps happening, keep your keys somewhere she can't reach."
    "\nThe answer is: (B)"
    "\n\n=====" + GOLDEN_K0
)


def test_comparison_prompt_golden_strings():
    assert comparison_prompt("Can I borrow your pen?", " Sure, here you go. ", "Get your own.", Q, 0) == GOLDEN_K0
    assert comparison_prompt("Can I borrow your pen?", "Sure, here you go.", "Get your own.", Q, 1) == GOLDEN_K1
    assert OPTIONS == (" (A)", " (B)")


def test_multi_turn_prefix_keeps_its_turns_and_drops_the_open_assistant_marker():
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a secret\n\nAssistant:"
    text = comparison_prompt(prefix, "No.", "Okay.", Q, 0)
    assert "assistant:\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a secret\n\nWhich reply" in text


def test_examples_alternate_answers_and_k_is_checked():
    assert [ex.answer for ex in FEEDBACK_EXAMPLES] == ["B", "A", "B", "A"]
    assert feedback_examples(2) == FEEDBACK_EXAMPLES[:2]
    with pytest.raises(ValueError, match=f"label.few_shot=9 but only {len(FEEDBACK_EXAMPLES)} few-shot"):
        feedback_examples(9)
    with pytest.raises(ValueError, match="label.few_shot must be an integer >= 0"):
        feedback_examples(-1)


def test_prob_a_from_fixed_log_probs():
    assert prob_a(math.log(0.3), math.log(0.1)) == pytest.approx(0.75)
    assert prob_a(math.log(0.1), math.log(0.3)) == pytest.approx(0.25)
    assert prob_a(-2.0, -2.0) == 0.5
    assert prob_a(0.0, -1000.0) == 1.0 and prob_a(-1000.0, 0.0) == 0.0   # no overflow
    assert math.isnan(prob_a(math.nan, -1.0)) and math.isnan(prob_a(-1.0, math.nan))


def test_both_orders_cancel_a_constant_letter_preference():
    # A model whose P(A) is the truth (0.7 for response 1) plus 0.2 for the letter A.
    truth, bias = 0.7, 0.2
    pa1, pa2 = truth + bias, (1 - truth) + bias
    assert p_first(pa1, pa2) == pytest.approx(truth)
    stats = position_bias([pa1, 0.6], [pa2, 0.6])
    assert stats["mean_p_a_order1"] == pytest.approx(0.75) and stats["mean_p_a_order2"] == pytest.approx(0.55)
    assert stats["position_bias"] == pytest.approx(0.15)
    # Row 1's second order is a tie, row 2 always answers (A): neither picks one response twice.
    assert stats["order_agreement"] == 0.0
    assert position_bias([0.8, math.nan], [0.3, 0.4]) == {
        "rows": 1, "mean_p_a_order1": 0.8, "mean_p_a_order2": 0.3, "position_bias": pytest.approx(0.05),
        "order_agreement": 1.0}
    assert position_bias([], [])["position_bias"] is None


def test_decide_orients_drops_within_margin_and_clamps():
    d = decide(0.8)
    assert (d.first_chosen, d.p_chosen, d.label) == (True, 0.8, 0.8)
    d = decide(0.3)
    assert d.first_chosen is False and d.p_chosen == pytest.approx(0.7) and d.label == pytest.approx(0.7)
    assert decide(0.5) is None                              # an exact tie prefers nothing
    assert decide(0.55, margin=0.1) is None and decide(0.45, margin=0.1) is None
    assert decide(0.61, margin=0.1).p_chosen == 0.61
    d = decide(0.9, margin=0.05, clamp=[0.4, 0.6])
    assert (d.p_chosen, d.label) == (0.9, 0.6)              # margin judged before clamping
    assert decide(0.52, clamp=[0.55, 0.6]).label == 0.55    # clamping also lifts a weak label
    assert decide(math.nan) is None


def test_expected_calibration_error_by_hand():
    # Confidences 0.9, 0.9 (one right, one wrong) and 0.6 (right): bins [0.85,0.9] and [0.6,0.65].
    p = [0.9, 0.1, 0.6]
    want = (2 / 3) * abs(0.5 - 0.9) + (1 / 3) * abs(1.0 - 0.6)
    assert expected_calibration_error(p) == pytest.approx(want)
    assert expected_calibration_error([1.0, 1.0]) == pytest.approx(0.0)
    assert expected_calibration_error([0.5]) == pytest.approx(0.5)     # a tie is a wrong guess at 0.5
    assert math.isnan(expected_calibration_error([]))


class FakeFeedback:
    """Scores `` (A)`` as log 0.7 when the option (A) text starts with 'good', else log 0.4;
    `` (B)`` gets the rest, so P(A) is known exactly."""

    def __init__(self):
        self.calls = []

    def score(self, prompts, continuations, adapter=None):
        self.calls.append((list(prompts), list(continuations), adapter))
        out = []
        for p, c in zip(prompts, continuations):
            a_good = p.rsplit("\n(A) ", 1)[1].startswith("good")
            pa = 0.7 if a_good else 0.4
            out.append(math.log(pa if c == " (A)" else 1 - pa))
        return out


def test_score_orders_asks_both_orders_in_one_call():
    items = [{"id": "x", "prompt": "p", "response_1": "good one", "response_2": "bad one"},
             {"id": "y", "prompt": "q", "response_1": "bad two", "response_2": "good two"}]
    engine, constitution = FakeFeedback(), load_constitution("default")
    rows = score_orders(engine, items, constitution, 1, seed=3, adapter="ad")
    (prompts, conts, adapter), = engine.calls
    assert len(prompts) == 8 and conts == list(OPTIONS) * 4 and adapter == "ad"
    assert "(A) good one\n(B) bad one" in prompts[0] and "(A) bad one\n(B) good one" in prompts[2]
    assert rows[0]["p_a_order1"] == pytest.approx(0.7) and rows[0]["p_a_order2"] == pytest.approx(0.4)
    assert rows[1]["p_a_order1"] == pytest.approx(0.4) and rows[1]["p_a_order2"] == pytest.approx(0.7)
    # With the letter bias (0.7 vs 0.4 for 'good' as A vs B: (0.7 + 0.6) / 2) averaged out:
    assert p_first(rows[0]["p_a_order1"], rows[0]["p_a_order2"]) == pytest.approx(0.65)
    assert p_first(rows[1]["p_a_order1"], rows[1]["p_a_order2"]) == pytest.approx(0.35)
    ids = {c.id for c in constitution.comparisons}
    assert {r["principle_id"] for r in rows} <= ids
    again = score_orders(FakeFeedback(), items[::-1], constitution, 1, seed=3)
    assert [r["principle_id"] for r in again] == [r["principle_id"] for r in rows[::-1]]  # drawn per id


class FakePolicy:
    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, seeds=None, stop=None, adapter=None):
        self.calls.append((list(prompts), list(seeds), stop, adapter))
        return [Completion("", 4, 0, "error", "too long") if "FAIL" in p else
                Completion(f" reply {s}\n\nHuman: leaked", 4, 3, "stop") for p, s in zip(prompts, seeds)]


def test_sample_two_uses_the_zero_shot_format_and_per_row_seeds():
    policy, params = FakePolicy(), SamplingConfig(seed=5)
    rows = sample_two(policy, [{"id": "a", "prompt": "hi"}, {"id": "b", "prompt": "FAIL"}], params, adapter="sft")
    (prompts, seeds, stop, adapter), = policy.calls
    assert prompts == ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: FAIL\n\nAssistant:"] * 2
    assert seeds == [row_seed(5, "a", "sample", 1), row_seed(5, "b", "sample", 1),
                     row_seed(5, "a", "sample", 2), row_seed(5, "b", "sample", 2)]
    assert "\n\nHuman:" in stop and adapter == "sft"
    assert rows[0] == {"response_1": f"reply {seeds[0]}", "response_2": f"reply {seeds[2]}", "error": None,
                       "finish_1": "stop", "finish_2": "stop", "prompt_tokens": 8, "completion_tokens": 6}
    assert rows[1]["error"] == "sample 1: too long; sample 2: too long" and rows[1]["response_1"] is None


def test_same_text_ignores_whitespace_only():
    assert same_text("a  b\n", " a b") and not same_text("a b", "a c")


@pytest.mark.parametrize("override, fragment", [
    ("label.feedback_role=instruct", "label.feedback_role=instruct is refused"),
    ("label.clamp=[0.6,0.9]", "label.clamp=[0.6, 0.9] must be [lo, hi]"),
    ("label.clamp=[0.4]", "label.clamp=[0.4] must be [lo, hi]"),
    ("label.margin=0.5", "label.margin=0.5 must lie in [0, 0.5)"),
    ("label.few_shot=-1", "label.few_shot=-1 must be >= 0"),
    ("label.sampling.temperature=-1", "label.sampling.temperature=-1"),
    ("dpo.pairs=all", "dpo.pairs='all' is not allowed"),
])
def test_bad_label_config_is_one_line(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(None, ["model.path=m", override])
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_instruct_base_model_cannot_be_the_feedback_model():
    cfg = load_config(None, ["model.path=m", "model.role=instruct"])
    cfg.require("generate")   # other stages do not care
    with pytest.raises(ConfigError, match="the feedback model must be a base model"):
        cfg.require("label")
    load_config(None, ["model.path=m", "model.role=instruct", "label.feedback=/some/base"]).require("label")


def test_check_summary_says_when_accuracy_is_not_above_chance():
    good = check_summary([0.9] * 18 + [0.2] * 2 + [math.nan])
    assert good["scored"] == 20 and good["accuracy"] == 0.9 and good["accuracy_lo"] > 0.5
    assert good["above_chance"] and good["verdict"].endswith("over 20 pairs is above chance")
    # 7 of 10 right still leaves 0.5 inside the interval; a tie counts as wrong.
    weak = check_summary([0.6] * 7 + [0.4] * 2 + [0.5])
    assert weak["accuracy"] == 0.7 and weak["accuracy_lo"] < 0.5 and not weak["above_chance"]
    assert "NOT above chance" in weak["verdict"]
    assert check_summary([])["above_chance"] is False
