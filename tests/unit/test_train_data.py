"""Training rows: reading and checking them, TRL-style tokenisation, masking and the batch schedule.

No Ray and no model: the tokenizer is the tiny byte-level BPE built in-process.
"""


import numpy as np
import pytest

from cai_ray.config import load_config, stage_folder
from cai_ray.train.data import IGNORE_INDEX, Schedule, as_text, collate, tokenize, total_steps
from cai_ray.train.sources import (fingerprint, mix_counts, read_dpo, read_rows, read_sft, sft_sources)

from tests.helpers import jsonl

PROMPT = "\n\nHuman: how do I boil an egg?\n\nAssistant:"


@pytest.fixture(scope="module")
def tok():
    from cai_ray.tiny import build_tokenizer

    return build_tokenizer("base")


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"model.path={tmp_path}", f"output_dir={tmp_path / 'out'}", *overrides])


# ---------------------------------------------------------------- reading


def test_shipped_sft_set_reads_and_wraps_bare_prompts(tmp_path):
    rows = read_sft(_cfg(tmp_path, "sft.data=samples:helpful_sft"))
    assert len(rows) == 40 and set(rows[0]) == {"prompt", "completion"}
    prompt, completion = as_text(rows[0]["prompt"], rows[0]["completion"])
    assert prompt == f"\n\nHuman: {rows[0]['prompt'].strip()}\n\nAssistant:"
    assert completion.startswith(" ") and not completion.startswith("  ")


def test_formatted_rows_are_concatenated_untouched():
    assert as_text(PROMPT, " Boil it.") == (PROMPT, " Boil it.")


def test_generate_output_is_the_default_and_missing_output_says_what_to_run(tmp_path):
    with pytest.raises(ValueError, match=r"sft.revisions is unset .* no sft.parquet .* run `cai-ray generate`"):
        read_sft(_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"sft.helpful is unset .* no helpful.parquet"):
        read_sft(_cfg(tmp_path, "sft.helpful_ratio=1"))


# ---------------------------------------------------------------- the SL-CAI mix


@pytest.mark.parametrize("revisions, helpful, ratio, expected", [
    (100, 100, 0.5, (100, 100)),
    (30, 100, 0.5, (30, 30)),      # the larger source is subsampled, nothing repeats
    (30, 100, 0.25, (30, 10)),
    (30, 5, 0.25, (15, 5)),
    (7, 3, 0.3, (7, 3)),
    (10, 10, 0.0, (10, 0)),
    (10, 10, 1.0, (0, 10)),
    (3, 100, 0.9, (3, 27)),
])
def test_mix_counts_worked_numbers(revisions, helpful, ratio, expected):
    assert mix_counts(revisions, helpful, ratio) == expected


def _sft_files(tmp_path, n_rev, n_help):
    rev = jsonl(tmp_path / "rev.jsonl", [{"prompt": f"{PROMPT} r{i}", "completion": f" revised {i}"}
                                          for i in range(n_rev)])
    helpful = jsonl(tmp_path / "help.jsonl", [{"prompt": f"help me {i}", "completion": f"sure {i}"}
                                               for i in range(n_help)])
    return f"sft.revisions={rev}", f"sft.helpful={helpful}"


def test_mix_is_seeded_counted_and_in_file_order(tmp_path):
    files = _sft_files(tmp_path, 20, 60)
    mix = {}
    rows = read_sft(_cfg(tmp_path, *files, "sft.helpful_ratio=0.6"), mix)
    assert len(rows) == 50 and sum(r["completion"].startswith(" revised") for r in rows) == 20
    assert mix["rows"] == 50 and mix["helpful_share"] == 0.6 and mix["helpful_ratio"] == 0.6
    assert mix["sources"]["sft.revisions"]["available"] == 20 and mix["sources"]["sft.revisions"]["used"] == 20
    assert mix["sources"]["sft.helpful"] == {"source": files[1].split("=", 1)[1], "available": 60, "used": 30}
    picked = [int(r["completion"].split()[-1]) for r in rows[20:]]
    assert picked == sorted(picked)
    assert read_sft(_cfg(tmp_path, *files, "sft.helpful_ratio=0.6")) == rows
    other_seed = read_sft(_cfg(tmp_path, *files, "sft.helpful_ratio=0.6", "seed=1"))
    assert other_seed != rows and len(other_seed) == 50


def _reads_generate(cfg) -> bool:
    """Whether SFT reads (in part) the generate stage's output, whose hash then keys the SFT folder."""
    return None in cfg.sft.inputs().values()


def test_ratio_zero_or_one_reads_only_one_source(tmp_path):
    mix = {}
    rows = read_sft(_cfg(tmp_path, "sft.helpful=samples:helpful_sft", "sft.helpful_ratio=1"), mix)
    assert len(rows) == 40 and list(mix["sources"]) == ["sft.helpful"] and mix["helpful_share"] == 1.0
    cfg = _cfg(tmp_path, "sft.helpful_ratio=1", "sft.helpful=samples:helpful_sft")
    assert not _reads_generate(cfg) and sft_sources(cfg) == {"sft.helpful": "samples:helpful_sft"}
    rev = _sft_files(tmp_path, 4, 1)[0]
    assert len(read_sft(_cfg(tmp_path, rev, "sft.helpful_ratio=0"))) == 4
    assert _reads_generate(_cfg(tmp_path, rev)) and not _reads_generate(_cfg(tmp_path, rev, "sft.helpful_ratio=0"))
    assert not _reads_generate(_cfg(tmp_path, "sft.data=samples:helpful_sft"))


def test_the_mix_keys_the_sft_folder(tmp_path):
    files = _sft_files(tmp_path, 4, 4)
    half, most = (stage_folder(_cfg(tmp_path, *files, f"sft.helpful_ratio={r}"), "sft") for r in (0.5, 0.8))
    assert half != most
    # Generated sources put the generate stage's hash into the SFT folder's key.
    mine = stage_folder(_cfg(tmp_path, files[1]), "sft")
    theirs = stage_folder(_cfg(tmp_path, files[1], "generate.rounds=3"), "sft")
    assert mine != theirs


@pytest.mark.parametrize("override, message", [
    (["sft.helpful_ratio=1.5"], "sft.helpful_ratio=1.5 must lie in [0, 1]"),
    (["sft.helpful_ratio=-0.1"], "sft.helpful_ratio=-0.1 must lie in [0, 1]"),
    (["sft.data=samples:helpful_sft", "sft.helpful=x.jsonl"], "sft.data replaces the SL-CAI mix"),
])
def test_bad_mix_config_is_one_line(tmp_path, override, message):
    from cai_ray.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _cfg(tmp_path, *override)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("content, message", [
    ("", r"has no rows"),
    ('{"prompt": "a"}\n', r"missing column\(s\) completion; columns: prompt"),
    ('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": 3}\n',
     r"line 2: column 'completion' holds a int, not a string"),
    ('{"prompt": "a", "completion": "b"}\n\n{"prompt": " ", "completion": "b"}\n',
     r"line 3: column 'prompt' is empty"),
    ('{"prompt": "a", "completion": "b"}\nnot json\n', r"line 2 is not valid JSON"),
])
def test_bad_sft_files_fail_with_one_line_naming_file_column_row(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        read_sft(_cfg(tmp_path, f"sft.data={path}"))
    assert len(str(err.value).splitlines()) == 1 and str(path) in str(err.value)


def test_missing_file_and_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"sft.data=.*nope.jsonl: file does not exist"):
        read_sft(_cfg(tmp_path, f"sft.data={tmp_path / 'nope.jsonl'}"))
    (tmp_path / "rows.csv").write_text("prompt,completion\n")
    with pytest.raises(ValueError, match=r"use a .jsonl or .parquet file"):
        read_rows(str(tmp_path / "rows.csv"), ("prompt",))


def test_parquet_rows_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"prompt": [PROMPT, PROMPT], "chosen": [" a", None], "rejected": [" b", " c"]}), path)
    with pytest.raises(ValueError, match=r"pairs.parquet: row 1: column 'chosen' is empty"):
        read_dpo(_cfg(tmp_path, f"dpo.data={path}"))


def test_soft_loss_needs_a_label_column_with_probabilities(tmp_path):
    pair = {"prompt": PROMPT, "chosen": " a", "rejected": " b"}
    path = jsonl(tmp_path / "pairs.jsonl", [pair])
    assert read_dpo(_cfg(tmp_path, f"dpo.data={path}")) == [pair]
    with pytest.raises(ValueError, match=r"dpo.loss=soft needs a 'label' column .* columns: prompt, chosen"):
        read_dpo(_cfg(tmp_path, f"dpo.data={path}", "dpo.loss=soft"))
    path = jsonl(tmp_path / "labelled.jsonl", [{**pair, "label": 0.8}, {**pair, "label": 1.5}])
    with pytest.raises(ValueError, match=r"row 1: column 'label' must be a number in \[0, 1\], got 1.5"):
        read_dpo(_cfg(tmp_path, f"dpo.data={path}", "dpo.loss=soft"))


def test_fingerprint_follows_file_content(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("a\n")
    before = fingerprint(str(path))
    path.write_text("b\n")
    assert fingerprint(str(path)) != before
    assert fingerprint("samples:helpful_sft") == fingerprint("samples:helpful_sft")


# ---------------------------------------------------------------- tokens and masks


def test_sft_labels_cover_completion_and_eos_only(tok):
    rows = [{"prompt": PROMPT, "completion": " Put it in boiling water."},
            {"prompt": "Why is the sky blue?", "completion": "Light scatters."}]
    data = tokenize(tok, rows, "sft", max_length=512)
    batch = collate(data, np.array([0, 1]), tok.pad_token_id)
    for i, (prompt, completion) in enumerate(as_text(r["prompt"], r["completion"]) for r in rows):
        ids, labels = batch["input_ids"][i], batch["labels"][i]
        real = batch["attention_mask"][i].bool()
        learned = labels[labels != IGNORE_INDEX].tolist()
        assert tok.decode(learned) == completion + tok.eos_token
        assert tok.decode(ids[real][: int(data.seqs[0].split[i])].tolist()) == prompt
        assert (labels[~real] == IGNORE_INDEX).all() and (ids[~real] == tok.pad_token_id).all()
        assert real[: int(real.sum())].all(), "padding goes on the right"


def test_dpo_split_is_shared_by_the_pair_and_follows_trl_on_merges(tok):
    # A trailing space merges with the completion's first word: the split moves, tokens stay whole.
    rows = [{"prompt": "\n\nHuman: explain water\n\nAssistant: ", "chosen": "sure, water is kind.",
             "rejected": "sure thing", "label": 0.75}]
    data = tokenize(tok, rows, "dpo", max_length=512)
    chosen, rejected = data.seqs
    full_c = tok(rows[0]["prompt"] + "sure, water is kind." + tok.eos_token).input_ids
    prompt_ids = tok(rows[0]["prompt"]).input_ids
    assert chosen.row(0).tolist() == full_c
    assert chosen.split[0] == rejected.split[0] < len(prompt_ids)
    batch = collate(data, np.array([0]), tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2 and batch["pref"].tolist() == [0.75]


def test_rows_cut_to_max_length_keep_the_prompt_and_drop_rows_without_completion(tok):
    rows = [{"prompt": PROMPT, "completion": " " + "word " * 50},
            {"prompt": PROMPT * 20, "completion": " short"}]
    n_prompt = len(tok(PROMPT).input_ids)
    data = tokenize(tok, rows, "sft", max_length=n_prompt + 5)
    assert len(data) == 1 and data.stats["dropped_too_long"] == 1
    assert len(data.seqs[0].row(0)) == n_prompt + 5
    with pytest.raises(ValueError, match=r"train.max_length=4 leaves no completion token"):
        tokenize(tok, rows, "sft", max_length=4)


def test_tokenising_in_chunks_gives_the_same_arrays_as_at_once(tok, monkeypatch):
    import cai_ray.train.data as data_module

    rows = [{"prompt": PROMPT * (1 + i % 3), "chosen": f" Yes {i}.", "rejected": " No." * (i % 4 + 1),
             "label": i / 10} for i in range(10)]
    rows[4]["prompt"] = PROMPT * 40  # dropped: nothing left after max_length
    whole = tokenize(tok, rows, "dpo", max_length=120)
    monkeypatch.setattr(data_module, "TOKENIZE_CHUNK", 3)  # chunks of 3, 3, 3, 1; one holds the dropped row
    chunked = tokenize(tok, rows, "dpo", max_length=120)
    assert whole.stats == chunked.stats and whole.stats["dropped_too_long"] == 1
    for a, b in zip(whole.seqs, chunked.seqs):
        assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("ids", "offsets", "split"))
    assert chunked.labels.tolist() == whole.labels.tolist() and len(chunked.labels) == 9


# ---------------------------------------------------------------- schedule


def test_schedule_shards_each_epoch_exactly_once_across_ranks():
    n, batch, accum, world = 24, 2, 3, 2  # one step = 12 examples, an epoch = 2 steps
    sched = Schedule(n, batch, accum, world, seed=7)
    seen = [i for step in (0, 1) for micro in range(accum) for rank in range(world)
            for i in sched.micro_batch(step, micro, rank).tolist()]
    assert sorted(seen) == list(range(n))
    second_epoch = [i for micro in range(accum) for rank in range(world)
                    for i in sched.micro_batch(2, micro, rank).tolist()]
    assert len(set(second_epoch)) == 12 and second_epoch != seen[:12]


def test_schedule_is_a_pure_function_of_step_and_rank():
    a, b = Schedule(10, 4, 1, 2, seed=0), Schedule(10, 4, 1, 2, seed=0)
    later = b.micro_batch(5, 0, 1).tolist()  # a restored run jumps straight to step 5
    for step in range(5):
        a.micro_batch(step, 0, 1)
    assert a.micro_batch(5, 0, 1).tolist() == later
    assert Schedule(10, 4, 1, 2, seed=1).micro_batch(5, 0, 1).tolist() != later


def test_total_steps_from_epochs_or_max_steps():
    train = load_config(None, ["model.path=x", "train.batch_size=2", "train.grad_accum=2"]).train
    assert total_steps(40, train, world=2, epochs=1, max_steps=-1) == 5
    assert total_steps(41, train, world=2, epochs=2, max_steps=-1) == 11
    assert total_steps(3, train, world=2, epochs=1, max_steps=-1) == 1
    assert total_steps(40, train, world=2, epochs=1, max_steps=7) == 7


@pytest.mark.parametrize("batch, accum, world", [(1, 1, 12), (2, 3, 2), (3, 4, 1), (6, 1, 2), (1, 4, 3)])
def test_each_step_sees_the_same_examples_for_the_same_global_batch_on_any_split(batch, accum, world):
    # Global batch 12 of 30 examples: steps cross epoch boundaries (30 is not a multiple of 12).
    reference = Schedule(30, 12, 1, 1, seed=3)
    sched = Schedule(30, batch, accum, world, seed=3)
    for step in range(6):
        want = reference.micro_batch(step, 0, 0)
        got = [i for micro in range(accum) for rank in range(world)
               for i in sched.micro_batch(step, micro, rank).tolist()]
        assert sorted(got) == sorted(want.tolist())
        assert sched.global_batch(step).tolist() == want.tolist()


def test_label_tokens_count_what_the_loss_scores(tok):
    rows = [{"prompt": PROMPT, "completion": " Put it in boiling water."},
            {"prompt": "Why is the sky blue?", "completion": "Light scatters."},
            {"prompt": PROMPT, "completion": " Yes."}]
    data = tokenize(tok, rows, "sft", max_length=512)
    indices = np.array([2, 0, 2])  # a later epoch can repeat an example within a step
    batch = collate(data, indices, tok.pad_token_id)
    assert data.label_tokens(indices) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def test_train_hash_keeps_the_global_batch_not_its_split(tmp_path):
    from cai_ray.config import stage_hash

    base = _cfg(tmp_path, "train.workers=2", "train.batch_size=4", "train.grad_accum=1")
    same = [_cfg(tmp_path, "train.workers=1", "train.batch_size=4", "train.grad_accum=2"),
            _cfg(tmp_path, "train.workers=8", "train.batch_size=1", "train.grad_accum=1",
                 "train.gradient_checkpointing=true", "train.zero_stage=3")]
    other = [_cfg(tmp_path, "train.workers=4", "train.batch_size=4", "train.grad_accum=1"),
             _cfg(tmp_path, "train.workers=2", "train.batch_size=4", "train.grad_accum=2")]
    for kind in ("sft", "dpo"):
        assert all(stage_hash(c, kind) == stage_hash(base, kind) for c in same)
        assert all(stage_hash(c, kind) != stage_hash(base, kind) for c in other)
    assert stage_hash(other[0], "generate") == stage_hash(base, "generate")
