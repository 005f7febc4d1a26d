"""The resumable-parts component alone, on real parquet files: resume, a part written twice, an
unreadable part, a leftover temp file, another schema and a full disk."""

import errno
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cai_ray import parts as parts_module
from cai_ray.parts import Parts, check_error_rate, finished, write_manifest

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("n", pa.int64())])


def _rows(ids, text="a"):
    return pa.table({"id": list(ids), "text": [f"{text}{i}" for i in ids], "n": list(range(len(ids)))})


def test_resume_knows_the_ids_written_and_reads_each_wanted_one(tmp_path):
    parts = Parts(tmp_path / "rows", SCHEMA)
    assert parts.done_ids() == (set(), 0)
    parts.write(_rows(["a", "b"]))
    parts.write(_rows(["c"]))
    again = Parts(tmp_path / "rows", SCHEMA)  # a rerun of the stage
    assert again.done_ids() == ({"a", "b", "c"}, 0)
    table, duplicates = again.read(["a", "c", "z"])  # z was never written; b is not wanted
    assert sorted(table.column("id").to_pylist()) == ["a", "c"] and duplicates == 0
    assert table.schema.equals(SCHEMA)


def test_a_part_written_twice_gives_each_id_once_and_counts_the_duplicates(tmp_path):
    parts = Parts(tmp_path / "rows", SCHEMA)
    parts.write(_rows(["a", "b"], text="first"))
    parts.write(_rows(["b", "c"], text="retry"))  # a batch retried after its node was lost
    parts.write(_rows(["a", "b"], text="retry"))
    table, duplicates = parts.read(["a", "b", "c"])
    assert duplicates == 3
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    assert dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist())) == {
        "a": "firsta", "b": "firstb", "c": "retryc"}, "the oldest part's row is kept"
    assert parts.read(["a", "b", "c"])[0].equals(table), "a rerun reads the same rows"


def test_an_unreadable_part_is_moved_aside_counted_and_its_ids_redone(tmp_path, capsys):
    parts = Parts(tmp_path / "rows", SCHEMA)
    parts.write(_rows(["a"]))
    parts.write(_rows(["b", "c"]))
    whole = sorted((tmp_path / "rows").glob("part-*.parquet"))[1]
    cut = whole.read_bytes()
    whole.write_bytes(cut[: len(cut) // 2])  # cut short by a failing disk or a copy
    assert parts.done_ids() == ({"a"}, 1)
    assert not whole.exists() and (tmp_path / "rows" / f".unreadable-{whole.name}").exists()
    assert f"{whole.name}: unreadable" in capsys.readouterr().out
    table, duplicates = parts.read(["a", "b", "c"])
    assert table.column("id").to_pylist() == ["a"] and duplicates == 0
    assert parts.done_ids() == ({"a"}, 0), "moved aside once, not counted again"


def test_a_leftover_temp_file_is_removed(tmp_path):
    parts = Parts(tmp_path / "rows", SCHEMA)
    parts.write(_rows(["a"]))
    tmp = tmp_path / "rows" / ".part-1-1.parquet.tmp"
    tmp.write_bytes(b"PAR1 half a part")  # a SIGKILL during a write
    assert parts.done_ids() == ({"a"}, 0)
    assert not tmp.exists()


def test_a_part_of_another_schema_is_refused_in_one_line_naming_the_folder(tmp_path):
    folder = tmp_path / "stage" / "chains"
    parts = Parts(folder, SCHEMA)
    pq.write_table(pa.table({"id": ["x"], "text": ["old"]}), folder / "part-1-1.parquet")
    with pytest.raises(ValueError) as caught:
        parts.done_ids()
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert message.startswith(f"{folder / 'part-1-1.parquet'}: chains written with another schema")
    assert f"move {tmp_path / 'stage'} aside" in message
    assert sorted(p.name for p in folder.iterdir()) == ["part-1-1.parquet"], "nothing moved or removed"


def test_a_full_disk_names_the_temp_file_and_leaves_none(tmp_path, monkeypatch):
    parts = Parts(tmp_path / "rows", SCHEMA)

    def full(table, where):
        Path(where).write_bytes(b"PAR1")  # what a write that ran out of space leaves
        raise OSError(errno.ENOSPC, "IOError: No space left on device")  # pyarrow names no file

    monkeypatch.setattr(parts_module.pq, "write_table", full)
    with pytest.raises(OSError) as caught:
        parts.write(_rows(["a"]))
    assert caught.value.errno == errno.ENOSPC and caught.value.strerror == "No space left on device"
    assert caught.value.filename.startswith(str(tmp_path / "rows" / ".part-"))
    assert caught.value.filename.endswith(".parquet.tmp")
    assert list((tmp_path / "rows").iterdir()) == []


def test_a_stop_during_a_write_leaves_no_temp_file(tmp_path, monkeypatch):
    from cai_ray.runtime import Stopped

    parts = Parts(tmp_path / "rows", SCHEMA)

    def stopped(table, where):
        Path(where).write_bytes(b"PAR1")
        raise Stopped("SIGTERM")

    monkeypatch.setattr(parts_module.pq, "write_table", stopped)
    with pytest.raises(Stopped):
        parts.write(_rows(["a"]))
    assert list((tmp_path / "rows").iterdir()) == []


def test_the_manifest_marks_a_finished_stage(tmp_path):
    assert finished(tmp_path) is None
    write_manifest(tmp_path, {"rows": 3, "duplicate_rows": 0})
    assert finished(tmp_path) == {"rows": 3, "duplicate_rows": 0}
    assert json.loads((tmp_path / "manifest.json").read_text())["rows"] == 3
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"], "no temp file left"


def test_more_failed_rows_than_the_limit_is_one_line_naming_the_rejects(tmp_path):
    check_error_rate(tmp_path, "label", 2, 10, 0.2, 0.2)  # at the limit: finishes
    with pytest.raises(RuntimeError) as failed:
        check_error_rate(tmp_path, "label", 3, 10, 0.3, 0.2)
    assert str(failed.value) == (f"label: 3 of 10 rows failed (error rate 0.300 > label.max_error_rate=0.2); "
                                 f"see {tmp_path / 'rejects.parquet'}")
