"""Training rows: where they come from (a file, ``samples:NAME``, the generate or label
stage's outputs, the SL-CAI mix) and how they are read and checked.

Everything here runs in the driver before any Ray Train worker starts, so bad
input fails with one line naming the file, column and row instead of a
traceback from inside a worker.
"""

from __future__ import annotations

import hashlib
import math
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cai_ray.config import Config, stage_folder
from cai_ray.data.prompts import jsonl_columns

SFT_COLUMNS = ("prompt", "completion")
DPO_COLUMNS = ("prompt", "chosen", "rejected")
SAMPLES = "samples:"


def _generated(cfg: Config, name: str, key: str) -> str:
    path = stage_folder(cfg, "generate") / name
    if not path.is_file():
        raise ValueError(f"{key} is unset and the generate stage has no {name} at {path}; "
                         f"run `cai-ray generate` with this config first, or set {key}=FILE")
    return str(path)


def sft_sources(cfg: Config) -> dict[str, str]:
    """{config key: file or samples:NAME}: ``sft.data`` alone, or the SL-CAI mix's sources that
    ``sft.helpful_ratio`` uses (revisions: the generate stage's ``sft.parquet``, helpful rows:
    its ``helpful.parquet``, unless set)."""
    files = {"sft.revisions": "sft.parquet", "sft.helpful": "helpful.parquet"}
    return {key: source or _generated(cfg, files[key], key) for key, source in cfg.sft.inputs().items()}


def _labelled(cfg: Config) -> str:
    folder = stage_folder(cfg, "label")
    if not (folder / "manifest.json").is_file():
        raise ValueError(f"dpo.pairs={cfg.dpo.pairs} and the label stage has no finished pairs at {folder}; "
                         f"run `cai-ray label` with this config first, or set dpo.data=FILE")
    return str(folder / "pairs.parquet")


def _both(revisions: str, feedback: str) -> str:
    """Both pair files in one, named by their contents (written once, atomically).

    Revision pairs carry label 1.0 (a revision is better by construction), feedback
    pairs the feedback model's probability; ``source`` tells them apart.
    """
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    digest = hashlib.sha256(f"{fingerprint(revisions)}{fingerprint(feedback)}".encode()).hexdigest()[:12]
    path = Path(feedback).parent / f"pairs-both-{digest}.parquet"
    if not path.is_file():
        tables = [pq.read_table(revisions), pq.read_table(feedback)]
        keep = [c for c in ("prompt", "chosen", "rejected", "source", "label", "id")
                if all(c in t.column_names for t in tables)]
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.concat_tables([t.select(keep).cast(tables[0].select(keep).schema) for t in tables]), tmp)
        os.replace(tmp, path)
    return str(path)


def dpo_source(cfg: Config) -> str:
    """``dpo.data``, else what ``dpo.pairs`` names: the generate stage's revision pairs,
    the label stage's feedback pairs, or both."""
    if cfg.dpo.data:
        return cfg.dpo.data
    if cfg.dpo.pairs == "feedback":
        return _labelled(cfg)
    revisions = _generated(cfg, "pairs.parquet", "dpo.data")
    return revisions if cfg.dpo.pairs == "revisions" else _both(revisions, _labelled(cfg))


def fingerprint(source: str) -> str:
    """sha256 of the file behind ``source`` (shipped sets included), so a changed file retrains."""
    if source.startswith(SAMPLES):
        handle = resources.files("cai_ray.data").joinpath("samples", f"{source[len(SAMPLES):]}.jsonl")
        blob = handle.read_bytes() if handle.is_file() else source.encode()
        return hashlib.sha256(blob).hexdigest()
    path = Path(source).expanduser()
    if not path.is_file():
        return hashlib.sha256(source.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _columns(source: str, key: str) -> tuple[str, dict[str, list], Optional[list[int]]]:
    """(name for messages, {column: values}, jsonl line numbers or None) of a file or shipped set."""
    if source.startswith(SAMPLES):
        handle = resources.files("cai_ray.data").joinpath("samples", f"{source[len(SAMPLES):]}.jsonl")
        if not handle.is_file():
            raise ValueError(f"{key}={source}: no such shipped set in cai_ray/data/samples")
        with handle.open("r", encoding="utf-8") as fh:
            return (source, *jsonl_columns(fh, f"{key}: {source}"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"{key}={source}: " + ("is a folder; give a .jsonl or .parquet file" if path.is_dir()
                                                 else "file does not exist"))
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's messages run over several lines
            raise ValueError(f"{key}: {path} is not a readable parquet file "
                             f"({str(exc).strip().splitlines()[0]})") from None
        return str(path), table.to_pydict(), None
    if path.suffix != ".jsonl":
        raise ValueError(f"{key}={source}: use a .jsonl or .parquet file, or samples:NAME")
    try:
        with open(path, encoding="utf-8") as fh:
            return (str(path), *jsonl_columns(fh, f"{key}: {path}"))
    except UnicodeDecodeError:
        raise ValueError(f"{key}: {path} is not UTF-8 text") from None


def read_rows(source: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
              key: str = "data") -> list[dict[str, Any]]:
    """Rows with the ``required`` text columns (non-empty strings) and any ``optional`` ones present."""
    name, columns, lines = _columns(source, key)
    n = len(next(iter(columns.values()), []))
    if n == 0:
        raise ValueError(f"{key}: {name} has no rows")
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{key}: {name} is missing column(s) {', '.join(missing)}; "
                         f"columns: {', '.join(columns) or '(none)'}")
    for column in required:
        for i, value in enumerate(columns[column]):
            if not isinstance(value, str) or not value.strip():
                where = f"line {lines[i]}" if lines is not None else f"row {i}"
                what = "is empty" if value is None or isinstance(value, str) else \
                    f"holds a {type(value).__name__}, not a string"
                raise ValueError(f"{key}: {name}: {where}: column {column!r} {what}")
    kept = [c for c in (*required, *optional) if c in columns]
    return [{c: columns[c][i] for c in kept} for i in range(n)]


def mix_counts(revisions: int, helpful: int, ratio: float) -> tuple[int, int]:
    """(revision rows, helpful rows) to use: the most rows whose helpful share is ``ratio``
    without using any row twice; the larger source is subsampled, never repeated."""
    if ratio == 0:
        return revisions, 0
    if ratio == 1:
        return 0, helpful
    total = math.floor(min(revisions / (1 - ratio), helpful / ratio) + 1e-9)
    n_helpful = round(ratio * total)
    return total - n_helpful, n_helpful


def _sample(rows: list, n: int, seed: int, stream: int) -> list:
    """``n`` of ``rows`` chosen by a seeded permutation, kept in file order."""
    if n >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng([seed, stream]).permutation(len(rows))[:n])
    return [rows[i] for i in keep]


def read_sft(cfg: Config, mix: Optional[dict] = None) -> list[dict[str, str]]:
    """SFT rows: ``sft.data`` as it is, or the SL-CAI mix of revisions and helpful rows at
    ``sft.helpful_ratio`` (seeded by ``cfg.seed``).  ``mix``, if given, is filled with the
    composition: per source its file, rows available and rows used, and the ratio asked and got."""
    sources = sft_sources(cfg)
    read = {key: read_rows(source, SFT_COLUMNS, key=key) for key, source in sources.items()}
    if "sft.data" in read:
        rows, used = read["sft.data"], {"sft.data": len(read["sft.data"])}
    else:
        n_rev, n_help = mix_counts(len(read.get("sft.revisions", ())), len(read.get("sft.helpful", ())),
                                   cfg.sft.helpful_ratio)
        used = {key: n for key, n in (("sft.revisions", n_rev), ("sft.helpful", n_help)) if key in read}
        # One random stream per source, so one source's draw never depends on the other's size.
        rows = [row for stream, key in enumerate(("sft.revisions", "sft.helpful")) if key in used
                for row in _sample(read[key], used[key], cfg.seed, stream)]
    if mix is not None:
        mix.update({"helpful_ratio": cfg.sft.helpful_ratio, "rows": len(rows),
                    "helpful_share": used.get("sft.helpful", 0) / max(len(rows), 1),
                    "sources": {key: {"source": sources[key], "available": len(read[key]), "used": n}
                                for key, n in used.items()}})
    return rows


def read_dpo(cfg: Config) -> list[dict[str, Any]]:
    source = dpo_source(cfg)
    rows = read_rows(source, DPO_COLUMNS, ("label",), key="dpo.data")
    if cfg.dpo.loss != "soft":
        return rows
    if "label" not in rows[0]:
        raise ValueError(f"dpo.loss=soft needs a 'label' column (probability that chosen is better) "
                         f"in {source}; columns: {', '.join(rows[0])}")
    for i, row in enumerate(rows):
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 1:
            raise ValueError(f"dpo.data: {source}: row {i}: column 'label' must be a number in [0, 1], "
                             f"got {label!r}")
    return rows
