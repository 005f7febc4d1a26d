"""Paths of the wrong kind and prompt text that cannot be encoded: one line naming the path (or the
file and line), exit 2, never a traceback.  Every case stops before Ray or a model starts."""

import json

import pytest

from cai_ray.cli import main
from cai_ray.config import DataConfig
from cai_ray.data import DataError, load_prompts


def test_prompt_files_with_text_that_cannot_be_encoded_name_the_file_and_line(tmp_path):
    bad_bytes = tmp_path / "latin1.jsonl"
    bad_bytes.write_bytes(b'{"prompt": "fine"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{bad_bytes}: line 2 is not valid UTF-8 \(byte 0xe9 at byte 16 of the line"):
        load_prompts(DataConfig(source=str(bad_bytes)))
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"prompt": "fine"}\n\n{"prompt": "half \\ud800 a pair"}\n')
    with pytest.raises(DataError, match=rf"^{surrogate}: line 3: column 'prompt' has text that cannot be encoded"):
        load_prompts(DataConfig(source=str(surrogate)))


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_paths_of_the_wrong_kind_are_one_line_naming_the_key_and_path(tmp_path, capsys):
    a_file, a_folder = tmp_path / "a_file.txt", tmp_path / "a_folder"
    a_file.write_text("x")
    a_folder.mkdir()
    model = tmp_path / "model"  # enough for the folder checks: config.json and a tokenizer file
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    base = ["configs/quickstart.yaml", f"model.path={model}", f"output_dir={tmp_path / 'out'}",
            "tracking.enabled=false"]
    cases = [
        (["generate", str(a_folder)], f"config file {a_folder} is a folder; give a YAML file"),
        (["generate", *base, f"model.path={a_file}"], f"model.path={a_file}: is a file; expected a model folder"),
        (["generate", *base, f"output_dir={a_file}"], f"output_dir={a_file}: is a file; expected a folder"),
        (["sft", *base, f"runtime.storage_path={a_file}"], f"runtime.storage_path={a_file}: is a file"),
        (["generate", *base, f"runtime.temp_dir={a_file}"], f"runtime.temp_dir={a_file}: is a file"),
        (["sft", *base, f"sft.data={a_folder}"], f"sft.data={a_folder}: is a folder; give a .jsonl or .parquet"),
        (["generate", *base, f"data.source={a_folder}"], f"{a_folder} holds no save_to_disk dataset"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        line = _one_line(capsys)
        assert line.startswith(f"cai-ray: error: {expected}"), line


def test_stop_timeout_must_be_positive_in_one_line(capsys):
    assert main(["config", "show", "configs/quickstart.yaml", "runtime.stop_timeout_s=0"]) == 2
    assert _one_line(capsys) == "cai-ray: error: runtime.stop_timeout_s=0.0 must be > 0"
