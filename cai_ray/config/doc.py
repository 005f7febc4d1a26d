"""The configuration reference, read from the dataclasses themselves.

A field's description is the ``#`` comment at the end of its line, else the block of
``#`` lines right above it: the comments the code already keeps beside its defaults.
So the reference (``cai-ray config doc``) cannot drift from the code, and a test fails
when a field has none.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import io
import json
import sys
import tokenize
from typing import Any, Iterator

from omegaconf import MISSING


@functools.lru_cache(maxsize=None)
def _comments(path: str) -> dict[str, dict[str, str]]:
    """{class name: {field: description}} for every class in one source file."""
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    lines = source.splitlines()
    trailing, alone = {}, {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            text = tok.string.lstrip("#").strip()
            (alone if lines[row - 1].lstrip().startswith("#") else trailing)[row] = text
    out: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        docs = out.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            mine = [trailing[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in trailing]
            above, row = [], stmt.lineno - 1
            while row in alone:
                above.insert(0, alone[row])
                row -= 1
            docs[stmt.target.id] = " ".join(" ".join(mine or above).split())
    return out


def description(cls: type, name: str) -> str:
    """The comment beside field ``name`` of dataclass ``cls`` ("" when it has none)."""
    return _comments(sys.modules[cls.__module__].__file__).get(cls.__name__, {}).get(name, "")


def _element(f: dataclasses.Field) -> type | None:
    """The dataclass a ``list[SomeConfig]`` field holds, else None."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            return type(value[0])
    return None


def _shown(value: Any) -> str:
    if value == MISSING:
        return "(required)"
    if isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
        value = [dataclasses.asdict(v) for v in value]
    return json.dumps(value, default=str)


def entries(instance: Any, prefix: str = "") -> Iterator[tuple[str, str, str, str]]:
    """(key, type, default, description) for every key under ``instance``, in field order;
    nested sections are walked, list-of-section fields also show their entries' keys as ``key[]``."""
    cls = type(instance)
    for f in dataclasses.fields(cls):
        key, value = f"{prefix}{f.name}", getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            yield from entries(value, f"{key}.")
            continue
        yield key, str(f.type), _shown(value), description(cls, f.name)
        element = _element(f)
        if element is not None:
            yield from entries(element(), f"{key}[].")  # required keys show as (required)


def reference(section: str | None = None) -> str:
    """``key  type  default  description`` lines for the whole config or one section."""
    from cai_ray.config import Config, ConfigError

    rows = list(entries(Config()))
    if section:
        rows = [r for r in rows if r[0] == section or r[0].startswith(f"{section}.")]
        if not rows:
            sections = sorted({r[0].split(".")[0] for r in entries(Config())})
            raise ConfigError(f"config doc: no section {section!r}; use one of {', '.join(sections)}")
    # A long default (a list of sets) overflows its column rather than pushing every line right.
    widths = [min(max(len(r[i]) for r in rows), 24 if i == 2 else 80) for i in range(3)]
    return "\n".join(f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {text}".rstrip()
                     for k, t, d, text in rows) + "\n"
