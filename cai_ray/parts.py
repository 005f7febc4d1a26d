"""Resumable parts: the one owner of a stage's rows written as parquet parts while they stream.

generate, label and evaluate's response generation write each finished batch as a part; a rerun of
a killed job skips the keys already written, reads every part back once and writes its manifest
last (a stage with a manifest is finished and is not redone)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cai_ray import console
from cai_ray.files import write_atomic

MANIFEST = "manifest.json"


class Parts:
    """Parquet parts of one ``schema`` in ``folder``, each row named by its ``key`` column."""

    def __init__(self, folder: Path, schema: pa.Schema, key: str = "id"):
        self.folder, self.schema, self.key = Path(folder), schema, key
        self.folder.mkdir(parents=True, exist_ok=True)

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))  # names start with the time: oldest first

    def done_ids(self) -> tuple[set[str], int]:
        """Keys already written by an earlier (possibly killed) run, and how many parts could not be read.

        Half-written temp files are dropped.  A part that cannot be read (cut short by a failing disk or
        a copy) is never taken as data: it is moved aside as ``.unreadable-*`` and its rows are redone.
        A part of another schema is refused rather than mixed in."""
        done: set[str] = set()
        unreadable = 0
        for tmp in self.folder.glob(".*.tmp"):
            tmp.unlink()
        for part in self._parts():
            try:
                schema = pq.read_schema(part)
                keys = pq.read_table(part, columns=[self.key]).column(self.key).to_pylist()
            except (pa.ArrowException, OSError) as exc:
                console.say(f"   {part.name}: unreadable ({str(exc).splitlines()[0][:120]}); its rows are redone")
                os.replace(part, part.with_name(f".unreadable-{part.name}"))
                unreadable += 1
                continue
            if not schema.remove_metadata().equals(self.schema):
                raise ValueError(f"{part}: {self.folder.name} written with another schema (an older cai_ray?); "
                                 f"move {self.folder.parent} aside to start afresh rather than mix the two")
            done.update(keys)
        return done, unreadable

    def write(self, table: pa.Table) -> None:
        """One part, whole or not at all: rename is atomic, so a SIGKILL leaves a part or a temp file."""
        name = f"part-{time.time_ns()}-{os.getpid()}.parquet"
        tmp = self.folder / f".{name}.tmp"
        try:
            pq.write_table(table.select(self.schema.names).cast(self.schema), tmp)
            os.replace(tmp, self.folder / name)
        except OSError as exc:  # a full disk: name the file (pyarrow's errors name none)
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, os.strerror(exc.errno) if exc.errno else str(exc), str(tmp)) from None
        except BaseException:  # SIGTERM (runtime.Stopped) cut the write short
            tmp.unlink(missing_ok=True)
            raise

    def read(self, wanted: Iterable[str]) -> tuple[pa.Table, int]:
        """The rows of ``wanted`` keys, each once, and how many duplicate rows were dropped.

        A key can stand in two parts (a batch retried after its node was lost, whose first try was
        written already): the oldest part's row is kept, so a rerun reads the same rows."""
        wanted = set(wanted)
        tables = [pq.read_table(p).select(self.schema.names).cast(self.schema) for p in self._parts()]
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        seen: set[str] = set()
        keep, duplicates = [], 0
        for i, key in enumerate(table.column(self.key).to_pylist()):
            if key not in wanted:
                continue
            if key in seen:
                duplicates += 1
            else:
                seen.add(key)
                keep.append(i)
        return table.take(keep), duplicates


def finished(out: Path) -> dict | None:
    """The summary of a stage that finished in ``out`` (its manifest is written last), else None."""
    path = out / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_error_rate(out: Path, stage: str, errors: int, rows: int, rate: float, limit: float) -> None:
    """One line, naming the rejects file, when more rows failed than ``{stage}.max_error_rate``
    allows; the stage then writes no manifest and stays unfinished."""
    if rate > limit:
        raise RuntimeError(f"{stage}: {errors} of {rows} rows failed (error rate {rate:.3f} > "
                           f"{stage}.max_error_rate={limit}); see {out / 'rejects.parquet'}")


def write_manifest(out: Path, summary: dict) -> None:
    write_atomic(out / MANIFEST, json.dumps(summary, indent=2) + "\n")
