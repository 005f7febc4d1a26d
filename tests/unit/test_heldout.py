import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cai_ray.data.heldout import Overlap, TrainIndex, find_overlaps, format_overlaps, ngrams, normalize

LONG = (
    "Please write a detailed essay about the history of the Roman empire, focusing on how its economy "
    "depended on grain shipments from Egypt and North Africa, how the roads and ports tied the provinces "
    "together, and why the currency lost its value during the third century crisis."
)


def test_normalize():
    assert normalize("  Hello,\tWORLD!!  How's it\n going? ") == "hello world hows it going"
    assert normalize("ＦＵＬＬ width") == "full width"  # NFKC folds full-width letters
    assert normalize("e-mail ... $100") == "email 100"
    assert normalize("?!") == ""


def test_ngrams():
    assert ngrams("a b c d", n=2) == {("a", "b"), ("b", "c"), ("c", "d")}
    assert ngrams("A, b. C", n=3) == {("a", "b", "c")}
    assert ngrams("too short", n=8) == set()
    assert ngrams("x x x x", n=2) == {("x", "x")}  # distinct n-grams only


def test_exact_match_after_normalisation():
    train = [("t1", "How do I pick a lock?"), ("t2", "unrelated")]
    overlaps = find_overlaps([("e1", "how do i PICK a lock")], train)
    assert overlaps == [Overlap("e1", "t1", "exact", 1.0)]


def test_short_prompts_compare_by_exact_text_only():
    train = [("t1", "tell me a joke about cats and dogs please")]
    # fewer than 8 words and contained in a train prompt, but not equal to one
    assert find_overlaps([("e1", "a joke about cats and dogs")], train) == []


def test_near_duplicate_one_word_changed():
    changed = LONG.replace("grain", "wheat")
    overlaps = find_overlaps([("e1", LONG)], [("t0", "something else"), ("t1", changed)])
    assert len(overlaps) == 1
    hit = overlaps[0]
    assert (hit.eval_id, hit.train_id, hit.kind) == ("e1", "t1", "ngram")
    words = len(normalize(LONG).split())
    assert hit.fraction == pytest.approx((words - 7 - 8) / (words - 7))  # 8 of the n-grams hold the word


def test_eval_prompt_inside_longer_train_prompt():
    train = [("t1", "Preamble text first. " + LONG + " And an unrelated closing request.")]
    assert find_overlaps([("e1", LONG)], train) == [Overlap("e1", "t1", "ngram", 1.0)]


def test_clean_eval_set_and_threshold():
    train = [("t1", LONG)]
    clean = [("e1", "What is the boiling point of water at the top of a tall mountain in winter?"),
             ("e2", "???")]
    assert find_overlaps(clean, train) == []
    # the first half of LONG only: 8-grams shared, but the eval prompt's own share decides
    half = " ".join(LONG.split()[:20]) + " " + " ".join(f"filler{i}" for i in range(30))
    share = find_overlaps([("e3", half)], train, threshold=0.1)[0].fraction
    assert 0.1 < share < 0.5
    assert find_overlaps([("e3", half)], train, threshold=0.5) == []


def test_exact_is_not_reported_twice_and_ordering():
    train = [("t1", LONG), ("t2", LONG.replace("grain", "wheat")), ("t3", LONG.replace("Egypt", "Spain"))]
    overlaps = find_overlaps([("e1", LONG)], train)
    assert [(o.train_id, o.kind) for o in overlaps][0] == ("t1", "exact")
    assert {o.train_id for o in overlaps if o.kind == "ngram"} == {"t2", "t3"}
    fractions = [o.fraction for o in overlaps[1:]]
    assert fractions == sorted(fractions, reverse=True)


def test_dict_rows_and_bad_rows():
    overlaps = find_overlaps([{"id": "e1", "prompt": "Same text here"}], [{"id": 7, "prompt": "same text HERE."}])
    assert overlaps == [Overlap("e1", 7, "exact", 1.0)]
    with pytest.raises(ValueError, match=r"train_rows\[1\] needs 'id' and 'prompt'"):
        find_overlaps([], [("a", "x"), {"id": "b", "text": "y"}])
    with pytest.raises(ValueError, match=r"eval_rows\[0\] must be an \(id, text\) pair"):
        find_overlaps(["just text"], [])
    with pytest.raises(ValueError, match=r"eval_rows\[0\] \(id 'e'\): text must be a str"):
        find_overlaps([("e", None)], [])
    with pytest.raises(ValueError, match="threshold"):
        find_overlaps([], [], threshold=0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        find_overlaps([], [], n=0)


def test_index_reused_across_eval_sets():
    index = TrainIndex([("t1", LONG), ("t2", "short one")])
    assert index.overlaps([("a", "short one")]) == [Overlap("a", "t2", "exact", 1.0)]
    assert index.overlaps([("b", LONG.upper())]) == [Overlap("b", "t1", "exact", 1.0)]
    assert TrainIndex([]).overlaps([("c", LONG)]) == []


def test_format_overlaps():
    assert format_overlaps([]) == "no eval prompt overlaps the training prompts"
    overlaps = [Overlap(f"e{i}", f"t{i}", "exact", 1.0) for i in range(25)]
    overlaps.append(Overlap("e3", "t99", "ngram", 0.8125))
    text = format_overlaps(overlaps, limit=20)
    assert "\n" not in text
    assert text.startswith("25 eval prompt(s) overlap training prompts (25 exact, 1 n-gram): ")
    assert "eval 'e0' = train 't0'" in text and "'e19'" in text and "'e20'" not in text
    assert text.endswith("; ... and 6 more")
    assert "eval 'e3' ~ train 't99' (81% of n-grams)" in format_overlaps(overlaps[-1:])


def test_scale_smoke_20k():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    train = [(f"t{i}", " ".join(rng.choice(vocab) for _ in range(rng.randint(4, 40)))) for i in range(20_000)]
    leaked = [(f"leak{i}", train[i * 97][1]) for i in range(100)]
    fresh = [(f"new{i}", " ".join(rng.choice(vocab) for _ in range(25))) for i in range(400)]
    overlaps = find_overlaps(leaked + fresh, train)
    flagged = {o.eval_id for o in overlaps}
    assert flagged == {eval_id for eval_id, _ in leaked}
    assert all(o.kind == "exact" for o in overlaps)


def test_index_works_after_pickling_into_another_process(tmp_path):
    # Ray ships objects to workers by pickling; the n-gram keys must not depend on the process.
    path = tmp_path / "index.pkl"
    path.write_bytes(pickle.dumps(TrainIndex([("t1", LONG)])))
    script = (
        f"import pickle; index = pickle.loads(open({str(path)!r}, 'rb').read()); "
        f"hits = index.overlaps([('e1', {LONG.replace('grain', 'wheat')!r})]); "
        "print(hits[0].kind if hits else 'none')"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         cwd=root, env={"PYTHONHASHSEED": "random", "PYTHONPATH": str(root)})
    assert out.stdout.strip() == "ngram"
