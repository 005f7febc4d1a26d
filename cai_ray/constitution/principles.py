"""Constitutions as data: loading, validation, content hash and principle draws.

A constitution is a YAML file with a list of ``principles`` (critique request +
revision request, optionally a ``group``) and an optional list of
``comparisons`` (questions choosing between replies (A) and (B), used for
preference labelling).  Shipped files live in ``configs/constitutions/`` at the
repository top and are addressed by file stem; any other YAML file can be
passed by path.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

# This file is cai_ray/constitution/principles.py; configs/ sits next to cai_ray/.
CONSTITUTIONS_DIR = Path(__file__).resolve().parents[2] / "configs" / "constitutions"

_PRINCIPLE_FIELDS = {"id": True, "critique": True, "revision": True, "group": False}
_COMPARISON_FIELDS = {"id": True, "text": True}
_TOP_FIELDS = {"principles", "comparisons", "description"}


@dataclass(frozen=True)
class Principle:
    id: str
    critique: str
    revision: str
    group: str | None = None


@dataclass(frozen=True)
class Comparison:
    id: str
    text: str


@dataclass(frozen=True)
class Constitution:
    name: str
    principles: tuple[Principle, ...]
    comparisons: tuple[Comparison, ...]
    hash: str


def available_constitutions() -> list[str]:
    return sorted(p.stem for p in CONSTITUTIONS_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    looks_like_path = text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text
    if looks_like_path:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"constitution file not found: {path}")
        return path
    path = CONSTITUTIONS_DIR / f"{text}.yaml"
    if not path.is_file():
        names = ", ".join(available_constitutions()) or "(none)"
        raise ValueError(f"unknown constitution {text!r}; available: {names}")
    return path


def _entries(raw: dict, key: str, fields: dict[str, bool], where: str) -> list[dict]:
    """Validate one list of entries; errors name the file, list index and id."""
    items = raw.get(key) or []
    if not isinstance(items, list):
        raise ValueError(f"{where}: '{key}' must be a list")
    seen: set[str] = set()
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{where}: {key}[{i}] must be a mapping")
        label = f"{where}: {key}[{i}] (id={item.get('id', '?')})"
        unknown = set(item) - set(fields)
        if unknown:
            raise ValueError(f"{label}: unknown field(s) {sorted(unknown)}; allowed {sorted(fields)}")
        for field, required in fields.items():
            if field not in item:
                if required:
                    raise ValueError(f"{label}: missing field '{field}'")
                continue
            value = item[field]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{label}: field '{field}' must be non-empty text")
        if item["id"] in seen:
            raise ValueError(f"{label}: duplicate id {item['id']!r} in '{key}'")
        seen.add(item["id"])
        # Requests sit on one line after their marker in the prompt; folding
        # YAML line breaks keeps a stray newline from looking like a new turn.
        out.append({k: " ".join(v.split()) for k, v in item.items()})
    return out


def _content_hash(principles: tuple[Principle, ...], comparisons: tuple[Comparison, ...]) -> str:
    # The hash covers content only (not the file name), so output folders keyed
    # by it change exactly when a principle's wording changes.
    payload = {"principles": [asdict(p) for p in principles],
               "comparisons": [asdict(c) for c in comparisons]}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def load_constitution(name_or_path: str | Path) -> Constitution:
    """Load a shipped constitution by name (file stem) or any YAML file by path."""
    path = _resolve(name_or_path)
    where = str(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: top level must be a mapping with a 'principles' list")
    unknown = set(raw) - _TOP_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown top-level key(s) {sorted(unknown)}; allowed {sorted(_TOP_FIELDS)}")
    principles = tuple(Principle(**e) for e in _entries(raw, "principles", _PRINCIPLE_FIELDS, where))
    if not principles:
        raise ValueError(f"{where}: 'principles' is missing or empty")
    comparisons = tuple(Comparison(**e) for e in _entries(raw, "comparisons", _COMPARISON_FIELDS, where))
    return Constitution(name=path.stem, principles=principles, comparisons=comparisons,
                        hash=_content_hash(principles, comparisons))


def _stable_index(seed: int, row_id: str, round: int, n: int, salt: str) -> int:
    # hashlib, not hash(): Python salts str hashes per process, and every Ray
    # worker must draw the same principle for the same (seed, id, round).
    key = f"{salt}\x1f{seed}\x1f{row_id}\x1f{round}".encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") % n


def draw_principle(constitution: Constitution, seed: int, row_id: str, round: int) -> Principle:
    """The principle for revision ``round`` of row ``row_id``; same inputs, same principle."""
    i = _stable_index(seed, row_id, round, len(constitution.principles), "principle")
    return constitution.principles[i]


def draw_comparison(constitution: Constitution, seed: int, row_id: str, round: int = 0) -> Comparison:
    """The comparison question for labelling a pair, drawn like ``draw_principle``."""
    if not constitution.comparisons:
        raise ValueError(f"constitution {constitution.name!r} has no comparisons for preference labelling")
    i = _stable_index(seed, row_id, round, len(constitution.comparisons), "comparison")
    return constitution.comparisons[i]
