"""Collapse guards: each filter fires on its crafted case and ordinary answers pass."""

from __future__ import annotations

import dataclasses

import pytest

from cai_ray.config import QualityConfig
from cai_ray.quality import (
    FILTERS, check, compression_ratio, distinct_n, emoji_count, longest_line_run,
    longest_symbol_run, repeated_ngram_frac, role_marker_count,
)

CHORES = [
    "Wash the dishes right after dinner so food does not dry on", "Wipe the counters with warm soapy water",
    "Sweep the floor before you mop it", "Empty the bins and put in fresh liners",
    "Water the plants on the windowsill", "Fold the laundry while it is still warm",
    "Change the bed sheets once a week", "Dust the shelves from top to bottom",
    "Clean the bathroom mirror with a dry cloth", "Vacuum the rugs in the living room",
    "Take out the recycling on collection day", "Descale the kettle with a little vinegar",
    "Wipe the inside of the microwave", "Check the fridge for food past its date",
    "Scrub the shower tiles with a soft brush", "Shake the doormat outside",
    "Line up the shoes by the front door", "Polish the taps in the kitchen and bathroom",
    "Run hot water down the sink drain", "Open the windows for ten minutes to air the rooms",
]
NUMBERED_LIST = "Here is a weekly routine:\n\n" + "\n".join(f"{i}. {c}." for i, c in enumerate(CHORES, 1))
# Every item opens the same way; only the object changes.
TEMPLATED_LIST = "\n".join(f"{i}. Wash the {thing} with care." for i, thing in enumerate(
    "cups plates bowls pans lids forks knives spoons jars bottles mugs trays racks "
    "sieves whisks ladles graters boards tins kettles".split(), 1))
PROSE = ("Please don't go over the dose on the label; more does not work faster and can cause harm. "
         "Rest, drink water, and ask a pharmacist or doctor if the headache is severe or keeps coming back. "
         "If you also have a stiff neck, a fever or blurred vision, get medical help straight away.")

CRAFTED = {
    "too_short": ["", "   \n ", "ok"],
    "repeated_ngrams": ["word " * 40, "I am sorry I am sorry I am sorry I am sorry I am sorry"],
    "repeated_lines": ["I cannot help.\nI cannot help.\nI cannot help.",
                       "Sure.\n\nThanks!\n\nThanks!\n\nThanks!"],
    "symbol_run": ["Great job 😀😀😀😀😀😀😀!", "wow 🔥 🎉 💯 ✨ 🙌 😀 nice", "Done ★★★★★★★★"],
    "role_leak": ["Sure, here you go.\nHuman: thanks", "Fine. Assistant: and then",
                  "My answer.\nCritiqueRequest: again", "Text\nRevision: a new one"],
    "compression": ["The cat sat on the mat. " * 20],
}


def test_check_returns_every_filter():
    assert set(check("Hello there, how can I help?")) == set(FILTERS)


@pytest.mark.parametrize("text", [NUMBERED_LIST, TEMPLATED_LIST, PROSE, "No.", "Ça va très bien, merci !",
                                  "Step 1: mix.\nStep 2: bake.\n\n---\n\n**Note:** wait 10 min!!"])
def test_legitimate_text_is_not_flagged(text):
    assert check(text) == {name: False for name in FILTERS}


def test_numbered_list_is_long_enough_to_exercise_every_filter():
    assert len(NUMBERED_LIST) >= QualityConfig().compression_min_chars
    assert len(TEMPLATED_LIST) >= QualityConfig().compression_min_chars


@pytest.mark.parametrize("name, text", [(n, t) for n, texts in CRAFTED.items() for t in texts])
def test_crafted_case_is_flagged_by_its_filter(name, text):
    assert check(text)[name], f"{name} missed {text!r}"


def test_measures():
    assert repeated_ngram_frac("a b c a b c", 3) == pytest.approx(1 / 4)   # (a b c) repeats once in 4
    assert repeated_ngram_frac("too short", 3) == 0.0
    assert longest_line_run("x\ny\ny\n\ny\nz") == 3
    assert longest_line_run("") == 0
    assert longest_symbol_run("ab 🔥🔥 c 🔥") == 2
    assert longest_symbol_run("👨\u200d👩\u200d👧") == 3                      # joiners glue, do not count
    assert emoji_count("hi 😀 there 🎉") == 2 and emoji_count("plain - text!") == 0
    assert role_marker_count("Human: a\nAssistant: b\nthe revision: fine") == 2
    assert compression_ratio("") == 0.0
    assert compression_ratio("abc " * 100) > compression_ratio(PROSE)


def test_compression_ignored_for_short_texts():
    short_loop = "ab " * 30                     # 90 chars: below compression_min_chars
    assert compression_ratio(short_loop) > QualityConfig().max_compression_ratio
    assert not check(short_loop)["compression"]


def test_thresholds_come_from_cfg():
    loose = dataclasses.replace(QualityConfig(), max_repeated_line_run=5, min_chars=0)
    assert not check("I cannot help.\nI cannot help.\nI cannot help.", loose)["repeated_lines"]
    assert not check("", loose)["too_short"]
    strict = dataclasses.replace(QualityConfig(), max_symbol_run=1)
    assert check("yes 😀😀", strict)["symbol_run"]


def test_distinct_n():
    assert distinct_n(["a b c", "d e f"], 2) == 1.0
    assert distinct_n(["a b c", "a b c"], 2) == 0.5
    assert distinct_n(["a b", "b c"], 2) == 1.0                            # n-grams never span texts
    assert distinct_n([], 2) == 0.0 and distinct_n(["one"], 2) == 0.0
    assert distinct_n(["word " * 50], 1) == pytest.approx(1 / 50)
