"""Where DPO's pairs come from: ``dpo.pairs`` = revisions | feedback | both (pure file logic, no Ray)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_ray.config import load_config, stage_folder
from cai_ray.train.sources import dpo_source, read_dpo


def _pairs(path, n, source, label):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "chosen": f" good {i}", "rejected": f" bad {i}",
             "source": source, "label": label, "id": f"{source}{i}"} for i in range(n)]
    if source == "feedback":  # the label stage's extra columns
        rows = [r | {"principle_id": "p", "p_chosen": label} for r in rows]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, ["model.path=m", f"output_dir={tmp_path}", "dpo.loss=soft"])


def test_revision_pairs_are_the_default(cfg):
    with pytest.raises(ValueError, match="dpo.data is unset and the generate stage has no pairs.parquet"):
        dpo_source(cfg)
    path = _pairs(stage_folder(cfg, "generate") / "pairs.parquet", 3, "revision", 1.0)
    assert dpo_source(cfg) == str(path)


def test_feedback_pairs_need_a_finished_label_stage(cfg):
    cfg.dpo.pairs = "feedback"
    path = _pairs(stage_folder(cfg, "label") / "pairs.parquet", 2, "feedback", 0.7)
    with pytest.raises(ValueError, match=r"dpo.pairs=feedback and the label stage has no finished pairs .*"
                                         r"run `cai-ray label`"):
        dpo_source(cfg)
    (path.parent / "manifest.json").write_text("{}")
    assert dpo_source(cfg) == str(path)
    assert [r["label"] for r in read_dpo(cfg)] == [0.7, 0.7]


def test_both_concatenates_once_keeping_each_label(cfg):
    _pairs(stage_folder(cfg, "generate") / "pairs.parquet", 3, "revision", 1.0)
    _pairs(stage_folder(cfg, "label") / "pairs.parquet", 2, "feedback", 0.6)
    (stage_folder(cfg, "label") / "manifest.json").write_text(json.dumps({}))
    cfg.dpo.pairs = "both"
    first = dpo_source(cfg)
    assert dpo_source(cfg) == first and first.startswith(str(stage_folder(cfg, "label")))
    table = pq.read_table(first)
    assert table.column_names == ["prompt", "chosen", "rejected", "source", "label", "id"]
    assert table.column("source").to_pylist() == ["revision"] * 3 + ["feedback"] * 2
    assert [r["label"] for r in read_dpo(cfg)] == [1.0, 1.0, 1.0, 0.6, 0.6]
    # New feedback pairs: a new combined file, the old one untouched.
    _pairs(stage_folder(cfg, "label") / "pairs.parquet", 4, "feedback", 0.8)
    assert dpo_source(cfg) != first and pq.read_metadata(dpo_source(cfg)).num_rows == 7


def test_dpo_data_wins_and_label_folder_follows_the_constitution_and_policy(cfg, tmp_path):
    cfg.dpo.pairs, cfg.dpo.data = "feedback", str(tmp_path / "mine.jsonl")
    assert dpo_source(cfg) == cfg.dpo.data
    before = stage_folder(cfg, "label")
    cfg.generate.constitution = "grouped"
    assert stage_folder(cfg, "label") != before
    cfg.generate.constitution = "default"
    cfg.label.policy = str(tmp_path / "adapter")
    assert stage_folder(cfg, "label") != before
    cfg.label.policy, cfg.label.actors, cfg.label.check_data = None, 4, ["x.jsonl"]   # resources only
    assert stage_folder(cfg, "label") == before
