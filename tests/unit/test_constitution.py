"""Constitution loading, principle draws, base-model prompt format and pair building."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from cai_ray.constitution import (
    CONSTITUTIONS_DIR, EXAMPLES, HELPFUL_EXAMPLES, STOP, Principle, available_constitutions, build_pair, clean,
    conversation_prompt, critique_prompt, draw_comparison, draw_principle, helpful_prompt, helpful_row,
    initial_prompt, load_constitution, revision_prompt, screen, sft_row, stops_for,
)

P = Principle(id="p", critique="Is the reply rude? Explain.", revision="Rewrite it politely.")

# The first few-shot example, spelled out by hand so a change to it shows up here.
EX1_DIALOGUE = (
    "\n\nHuman: My coworker keeps taking credit for my work. How can I get back at him?"
    "\n\nAssistant: You could quietly delete a few of his files before his next big deadline so he looks bad."
)
EX1_CHAIN = EX1_DIALOGUE + (
    "\n\nCritiqueRequest: Point out any way the assistant's last reply could cause harm or encourage wrongdoing."
    "\n\nCritique: The reply suggests sabotaging a colleague's work, which is dishonest, could cost him his "
    "job and could get the person asking disciplined. It also ignores the real problem."
    "\n\nRevisionRequest: Rewrite the reply so it causes no harm and still helps with the real problem."
    "\n\nRevision: That sounds frustrating. Keep a dated record of what you contribute, share updates with your "
    "manager directly, and if it continues, raise it calmly in a one-to-one meeting."
)
SEP = "\n\n====="


# --- constitution files --------------------------------------------------------------------------

def test_shipped_constitutions_load_with_expected_shape():
    assert {"default", "grouped"} <= set(available_constitutions())
    default = load_constitution("default")
    assert default.name == "default"
    assert len(default.principles) == 16 and len(default.comparisons) == 16
    assert all("(A)" in c.text and "(B)" in c.text for c in default.comparisons)
    grouped = load_constitution("grouped")
    assert len(grouped.principles) == 18
    groups = [p.group for p in grouped.principles]
    assert {g: groups.count(g) for g in set(groups)} == {
        g: 3 for g in ("core_harm", "human_rights", "honesty", "helpfulness", "global_perspective", "safety")}
    assert grouped.comparisons == ()


def test_hash_is_16_hex_stable_and_content_sensitive(tmp_path):
    a = load_constitution("default")
    assert re.fullmatch(r"[0-9a-f]{16}", a.hash)
    assert load_constitution("default").hash == a.hash
    assert load_constitution("grouped").hash != a.hash
    src = CONSTITUTIONS_DIR / "default.yaml"
    copy = tmp_path / "copy.yaml"
    copy.write_text(src.read_text())
    assert load_constitution(copy).hash == a.hash          # name is not content
    assert load_constitution(os.path.relpath(copy)).hash == a.hash
    copy.write_text(src.read_text().replace("every way", "each way", 1))
    assert load_constitution(str(copy)).hash != a.hash


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown constitution 'nope'; available: .*default.*grouped"):
        load_constitution("nope")


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_constitution(tmp_path / "missing.yaml")


def _write(tmp_path, body: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    return path


@pytest.mark.parametrize("body, message", [
    ("principles:\n  - {id: a, critique: c, revision: r}\n  - {id: a, critique: c2, revision: r2}\n",
     r"principles\[1\] \(id=a\): duplicate id 'a'"),
    ("principles:\n  - {id: a, critique: c, revision: r}\n  - {id: b, critique: c}\n",
     r"principles\[1\] \(id=b\): missing field 'revision'"),
    ("principles:\n  - {id: a, critique: '  ', revision: r}\n",
     r"principles\[0\] \(id=a\): field 'critique' must be non-empty text"),
    ("principles:\n  - {id: a, critique: c, revison: r}\n",
     r"principles\[0\] \(id=a\): unknown field"),
    ("principles: []\n", r"'principles' is missing or empty"),
    ("principles:\n  - {id: a, critique: c, revision: r}\ncomparisons:\n  - {id: x}\n",
     r"comparisons\[0\] \(id=x\): missing field 'text'"),
    ("- just a list\n", r"top level must be a mapping"),
])
def test_invalid_files_name_file_and_entry(tmp_path, body, message):
    path = _write(tmp_path, body)
    with pytest.raises(ValueError, match=message) as err:
        load_constitution(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


# --- principle draws -----------------------------------------------------------------------------

def test_draw_is_reproducible_and_varies():
    c = load_constitution("default")
    first = [draw_principle(c, 7, f"row{i}", 0).id for i in range(50)]
    assert first == [draw_principle(c, 7, f"row{i}", 0).id for i in range(50)]
    assert len(set(first)) > 5                                        # varies across ids
    assert [draw_principle(c, 7, "row0", r).id for r in range(20)] != [first[0]] * 20   # across rounds
    assert first != [draw_principle(c, 8, f"row{i}", 0).id for i in range(50)]         # across seeds


def test_every_principle_is_eventually_drawn():
    for name in ("default", "grouped"):
        c = load_constitution(name)
        drawn = {draw_principle(c, 0, f"id-{i}", r).id for i in range(300) for r in range(2)}
        assert drawn == {p.id for p in c.principles}


def test_draw_comparison_needs_comparisons():
    c = load_constitution("default")
    assert draw_comparison(c, 1, "x") == draw_comparison(c, 1, "x")
    with pytest.raises(ValueError, match="'grouped' has no comparisons"):
        draw_comparison(load_constitution("grouped"), 1, "x")


# --- prompt format: golden strings ---------------------------------------------------------------

def test_initial_prompt_golden():
    assert initial_prompt("How do I boil an egg?", 0) == "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    assert initial_prompt("How do I boil an egg?", 1) == (
        EX1_DIALOGUE + SEP + "\n\nHuman: How do I boil an egg?\n\nAssistant:")


def test_critique_prompt_golden():
    current = ("\n\nHuman: Tell me off.\n\nAssistant: Go away."
               "\n\nCritiqueRequest: Is the reply rude? Explain.\n\nCritique:")
    assert critique_prompt("Tell me off.", " Go away. ", P, 0) == current
    assert critique_prompt("Tell me off.", "Go away.", P, 1) == EX1_CHAIN + SEP + current


def test_revision_prompt_golden():
    current = ("\n\nHuman: Tell me off.\n\nAssistant: Go away."
               "\n\nCritiqueRequest: Is the reply rude? Explain.\n\nCritique: It is curt."
               "\n\nRevisionRequest: Rewrite it politely.\n\nRevision:")
    assert revision_prompt("Tell me off.", "Go away.", P, " It is curt.", 0) == current
    assert revision_prompt("Tell me off.", "Go away.", P, "It is curt.", 1) == EX1_CHAIN + SEP + current


def test_all_examples_usable_and_k_too_large_fails():
    k = len(EXAMPLES)
    assert k >= 4
    assert critique_prompt("q", "a", P, k).count(SEP) == k
    with pytest.raises(ValueError, match=rf"^generate.few_shot={k + 1} but only {k} few-shot examples exist$"):
        initial_prompt("q", k + 1)
    with pytest.raises(ValueError, match="few_shot must be an integer >= 0"):
        revision_prompt("q", "a", P, "c", -1)


def test_empty_prompt_rejected():
    with pytest.raises(ValueError, match="prompt must be non-empty"):
        conversation_prompt("   ")


def test_helpful_prompt_golden_and_bounds():
    assert helpful_prompt("How do I boil an egg?", 0) == "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    first = HELPFUL_EXAMPLES[0]
    assert helpful_prompt("How do I boil an egg?", 1) == (
        f"\n\nHuman: {first.prompt}\n\nAssistant: {first.reply}" + SEP
        + "\n\nHuman: How do I boil an egg?\n\nAssistant:")
    k = len(HELPFUL_EXAMPLES)
    assert helpful_prompt("q", k).count(SEP) == k
    with pytest.raises(ValueError, match=rf"^generate.helpful_few_shot={k + 1} must lie in 0..{k}"):
        helpful_prompt("q", k + 1)


def test_helpful_demonstrations_show_no_harmful_request_or_chain_text():
    chain_text = {t for ex in EXAMPLES for t in (ex.prompt, ex.initial, ex.revision)}
    prompt = helpful_prompt("q", len(HELPFUL_EXAMPLES))
    assert not any(t in prompt for t in chain_text)
    assert "Critique" not in prompt and "Revision" not in prompt


def test_examples_contain_no_markers_that_would_stop_generation():
    for ex in EXAMPLES:
        for text in (ex.prompt, ex.initial, ex.critique, ex.revision):
            assert clean(text) == text.strip()
            assert not any(stop in text for stop in STOP)
    for ex in HELPFUL_EXAMPLES:
        for text in (ex.prompt, ex.reply):
            assert clean(text) == text.strip() and not any(stop in text for stop in STOP)


# --- stops and clean -----------------------------------------------------------------------------

def test_stops_cover_next_markers():
    for step in ("initial", "critique", "revision", "helpful"):
        stops = stops_for(step)
        assert {"\n\nHuman:", "\n\nCritiqueRequest:", "\n\nRevisionRequest:", SEP} <= set(stops)
    assert "\n\nRevisionRequest:" in stops_for("critique") and "\n\nHuman:" in stops_for("revision")
    with pytest.raises(ValueError, match="unknown generation step 'judge'"):
        stops_for("judge")


@pytest.mark.parametrize("raw, expected", [
    (" Sure, here it is.  ", "Sure, here it is."),
    (" Fine.\n\nHuman: next question", "Fine."),
    (" Fine.\nHuman: next question", "Fine."),
    (" Fine.\n  Assistant: more", "Fine."),
    (" A critique.\nRevisionRequest: rewrite", "A critique."),
    (" Better reply.\n\n=====\n\nHuman: x", "Better reply."),
    ("Human: straight away", ""),
    (" The Human: story is mid-line and stays.", "The Human: story is mid-line and stays."),
])
def test_clean(raw, expected):
    assert clean(raw) == expected


# --- pairs and SFT rows --------------------------------------------------------------------------

CHAIN = {"id": "r1", "prompt": " How do I boil an egg? ", "initial": " Just wing it.",
         "revisions": ["Boil it.", " Simmer it for eight minutes, then cool it in cold water.\n"]}


def test_build_pair_columns_and_spacing():
    assert build_pair(CHAIN) == {
        "id": "r1",
        "prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
        "chosen": " Simmer it for eight minutes, then cool it in cold water.",
        "rejected": " Just wing it.",
        "source": "revision",
        "label": 1.0,
    }


def test_sft_row_shares_the_pair_prompt_and_generation_prompt():
    row = sft_row(CHAIN)
    assert row == {"id": "r1", "prompt": build_pair(CHAIN)["prompt"],
                   "completion": " Simmer it for eight minutes, then cool it in cold water."}
    assert row["prompt"] == initial_prompt(CHAIN["prompt"], 0)
    # What the model generates after the prompt, once cleaned and re-spaced, is the training text.
    generated = row["completion"] + "\n\nHuman: more"
    assert " " + clean(generated) == row["completion"]


@pytest.mark.parametrize("row, message", [
    ({"id": "r2", "prompt": "q", "initial": "a", "revisions": []}, "id=r2: field 'revisions' must be a non-empty"),
    ({"id": "r3", "prompt": "q", "initial": "a"}, "id=r3: field 'revisions'"),
    ({"id": "r4", "prompt": "q", "initial": "a", "revisions": ["  "]}, "id=r4: field 'revisions' ends with an empty"),
    ({"id": "r5", "prompt": "q", "initial": "", "revisions": ["b"]}, "id=r5: field 'initial'"),
    ({"id": "r6", "initial": "a", "revisions": ["b"]}, "id=r6: field 'prompt'"),
])
def test_bad_chain_rows_name_row_and_field(row, message):
    with pytest.raises(ValueError, match=message):
        build_pair(row)


def test_helpful_row_uses_the_reply():
    row = {"id": "h1", "prompt": "How do I boil an egg?", "purpose": "helpful", "final": "Simmer it. "}
    assert helpful_row(row) == {"id": "h1", "prompt": "\n\nHuman: How do I boil an egg?\n\nAssistant:",
                                "completion": " Simmer it."}


# --- screening: what a chain row may become ------------------------------------------------------

def _chain(initial="stop", rounds=(("stop", "stop"),), flags=(), error=None, purpose="harm"):
    return {"id": "x", "purpose": purpose, "initial_finish": initial, "flags": list(flags), "error": error,
            "rounds": [{"critique_finish": c, "revision_finish": r} for c, r in rounds]}


@pytest.mark.parametrize("row, reasons, step, keep, pair", [
    (_chain(), (), None, True, True),
    # A cut critique or earlier revision is never trained on: the row is used in full.
    (_chain(rounds=(("length", "length"), ("length", "stop"))), (), None, True, True),
    # A cut final revision is never a target; a cut initial reply never a rejected side.
    (_chain(rounds=(("stop", "length"),)), ("truncated",), "revision 1", False, False),
    (_chain(initial="length"), ("truncated_initial",), "initial", True, False),
    (_chain(initial="length", rounds=(("stop", "length"),)), ("truncated", "truncated_initial"), "revision 1",
     False, False),
    # Empty steps end the row wherever they happen.
    (_chain(initial="empty", rounds=()), ("empty",), "initial", False, False),
    (_chain(rounds=(("stop", "stop"), ("empty", None))), ("empty",), "critique 2", False, False),
    (_chain(rounds=(("stop", "empty"),)), ("empty",), "revision 1", False, False),
    (_chain(flags=("role_leak", "unrevised")), ("role_leak", "unrevised"), None, False, False),
    (_chain(error="critique (round 1): boom", rounds=(("error", None),)), ("error",), None, False, False),
    # Helpful rows: one reply, kept when it is complete and clean; never a pair.
    (_chain(purpose="helpful", rounds=()), (), None, True, False),
    (_chain(purpose="helpful", initial="length", rounds=()), ("truncated",), "helpful", False, False),
    (_chain(purpose="helpful", initial="empty", rounds=()), ("empty",), "helpful", False, False),
])
def test_screen(row, reasons, step, keep, pair):
    verdict = screen(row)
    assert (verdict.reasons, verdict.step, verdict.keep, verdict.pair) == (reasons, step, keep, pair)
