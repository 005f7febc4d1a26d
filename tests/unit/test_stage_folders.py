"""Stage folder names are fixed: a rename would orphan every finished output.

The expected names were recorded from the code before the folders were named in one
place (config.stage_folder); they must stay byte-identical.
"""

from pathlib import Path

import pytest

from cai_ray.config import load_config, stage_folder

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
CASES = {
    "quickstart": [],
    "sft_data": ["sft.data=/data/sft.jsonl"],
    "dpo_data": ["dpo.data=/data/pairs.parquet"],
    "dpo_adapter": ["dpo.sft_adapter=/models/sft-adapter"],
    "dpo_feedback": ["dpo.pairs=feedback"],
    "label_policy": ["label.policy=/models/policy"],
}
# generate, sft, dpo, label per case; evaluate and judge-check depend on their inputs only here.
EXPECTED = {
    "quickstart": ("9c70fd4a059c", "d95f491b7bd2", "7d8bd26cc93a", "a296a96ed8b7"),
    "sft_data": ("9c70fd4a059c", "544511c7dc76", "9cf06f0ea51d", "0de6ceb4afb7"),
    "dpo_data": ("9c70fd4a059c", "d95f491b7bd2", "967ad3777e46", "a296a96ed8b7"),
    "dpo_adapter": ("9c70fd4a059c", "d95f491b7bd2", "c8b2dad846ce", "fec5d5f14c75"),
    "dpo_feedback": ("9c70fd4a059c", "d95f491b7bd2", "f59ab27975b5", "a296a96ed8b7"),
    "label_policy": ("9c70fd4a059c", "d95f491b7bd2", "7d8bd26cc93a", "25576db7cada"),
}
ARMS = {"base": {"adapter": None, "adapter_sha256": None}, "sft": {"adapter": "/a/sft", "adapter_sha256": "ab12"}}
ITEMS = [{"set": "harm", "id": "p1"}, {"set": "helpful", "id": "p2"}]
ROWS = [{"id": "r1", "verdict": "harmful", "label": True, "request": "q", "response": "a"}]


@pytest.mark.parametrize("case", CASES)
def test_stage_folders_keep_their_names(case):
    cfg = load_config(QUICKSTART, ["output_dir=/tmp/folders", *CASES[case]])
    got = tuple(stage_folder(cfg, kind) for kind in ("generate", "sft", "dpo", "label"))
    assert got == tuple(Path("/tmp/folders", kind, name)
                        for kind, name in zip(("generate", "sft", "dpo", "label"), EXPECTED[case]))
    assert stage_folder(cfg, "evaluate", arms=ARMS, items=ITEMS) == Path("/tmp/folders/evaluate/99a1000e6ff8")
    assert stage_folder(cfg, "judge-check", rows=ROWS) == Path("/tmp/folders/judge-check/47a187868ea5")


def test_sweep_folder_is_named_by_its_pair_source():
    revisions = load_config(QUICKSTART, ["output_dir=/tmp/folders"])
    assert stage_folder(revisions, "sweep") == Path("/tmp/folders/sweep/9c70fd4a059c")
    feedback = load_config(QUICKSTART, ["output_dir=/tmp/folders", "dpo.pairs=feedback"])
    assert stage_folder(feedback, "sweep", pairs_sha256="0123456789abcdef") == \
        Path("/tmp/folders/sweep/feedback-0123456789ab")
