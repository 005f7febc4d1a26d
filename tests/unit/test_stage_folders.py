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
    # Renamed once on purpose (was 99a1000e6ff8): evaluate.trace and evaluate.review_sample had changed
    # the evaluate hash, against RESOURCE_KEYS (a repeated "evaluate" key there dropped them).
    assert stage_folder(cfg, "evaluate", arms=ARMS, items=ITEMS) == Path("/tmp/folders/evaluate/8e5f11459c8a")
    assert stage_folder(cfg, "judge-check", rows=ROWS) == Path("/tmp/folders/judge-check/47a187868ea5")


def test_sweep_folder_is_named_by_its_pair_source():
    revisions = load_config(QUICKSTART, ["output_dir=/tmp/folders"])
    assert stage_folder(revisions, "sweep") == Path("/tmp/folders/sweep/9c70fd4a059c")
    feedback = load_config(QUICKSTART, ["output_dir=/tmp/folders", "dpo.pairs=feedback"])
    assert stage_folder(feedback, "sweep", pairs_sha256="0123456789abcdef") == \
        Path("/tmp/folders/sweep/feedback-0123456789ab")


@pytest.mark.parametrize("stage", ["generate", "train", "judge", "label", "evaluate"])
def test_resource_keys_never_change_a_folder_and_other_keys_do(stage):
    """Every key listed in RESOURCE_KEYS (e.g. evaluate.trace, evaluate.selection_share) leaves the
    stage's folder as it is; a key that changes the numbers (evaluate.bootstrap) moves it."""
    from cai_ray.config import RESOURCE_KEYS, stage_hash

    values = {"trace": "all", "review_sample": 7, "selection_share": 0.3, "resources": "{x: 1}",
              "labels": "{zone: a}", "check_data": "[/x.jsonl]", "check": "false", "resume": "true",
              "use_gpu": "true", "host": "0.0.0.0", "port": 9999}
    kinds = {"train": ["sft", "dpo"], "judge": ["evaluate"]}.get(stage, [stage])
    base = load_config(QUICKSTART, [])
    # The split of the global batch (workers x batch_size x grad_accum) is kept out, its product is not.
    for key in set(RESOURCE_KEYS[stage]) - {"workers", "batch_size", "grad_accum"}:
        cfg = load_config(QUICKSTART, [f"{stage}.{key}={values.get(key, 3)}"])
        for kind in kinds:
            assert stage_hash(cfg, kind) == stage_hash(base, kind), f"{stage}.{key} changed the {kind} folder"
    if stage == "evaluate":
        assert stage_hash(load_config(QUICKSTART, ["evaluate.bootstrap=123"]), "evaluate") != stage_hash(base, "evaluate")
