"""Label pairs never hold a reply cut at max_new_tokens; the reject says why."""

import pyarrow.parquet as pq

from cai_ray.config import load_config
from cai_ray.stages.label import _finalize


def _row(i, finish_1="stop", finish_2="stop"):
    return {"id": f"r{i}", "prompt": "How do I get back at my roommate?", "response_1": f"Talk to her, {i}.",
            "response_2": f"Hide her keys, {i}.", "principle_id": "p", "p_a_order1": 0.9, "p_a_order2": 0.2,
            "error": None, "prompt_tokens": 4, "completion_tokens": 8, "finish_1": finish_1, "finish_2": finish_2}


def test_truncated_replies_never_become_pairs(tmp_path):
    cfg = load_config(None, ["model.path=x", f"output_dir={tmp_path}", "label.sampling.max_new_tokens=32"])
    rows = [_row(0), _row(1, finish_1="length"), _row(2, finish_2="length"), _row(3, "length", "length"),
            _row(4, finish_1=None, finish_2=None)]  # parts written before finishes were kept
    summary = _finalize(cfg, tmp_path, rows)
    assert summary["pairs"] == 2 and summary["dropped"]["truncated"] == 3
    pairs = pq.read_table(tmp_path / "pairs.parquet").to_pylist()
    assert [p["id"] for p in pairs] == ["r0", "r4"]
    reasons = {r["id"]: r["reason"] for r in pq.read_table(tmp_path / "rejects.parquet").to_pylist()}
    assert reasons == {"r1": "truncated: response 1 cut at label.sampling.max_new_tokens=32",
                       "r2": "truncated: response 2 cut at label.sampling.max_new_tokens=32",
                       "r3": "truncated: response 1 and 2 cut at label.sampling.max_new_tokens=32"}
