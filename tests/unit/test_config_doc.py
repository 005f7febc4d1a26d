"""The configuration reference comes from the dataclasses' own comments, so every field needs one."""

import dataclasses

from cai_ray.cli import main
from cai_ray.config import Config, TrainConfig
from cai_ray.config.doc import description, entries


def _classes(cls, seen):
    """Every config dataclass reachable from ``cls``: nested sections and list entries."""
    if cls in seen:
        return seen
    seen.add(cls)
    for f in dataclasses.fields(cls):
        value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(value):
            _classes(type(value), seen)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            _classes(type(value[0]), seen)
    return seen


def test_every_config_field_has_a_description():
    classes = _classes(Config, set())
    missing = [f"{cls.__name__}.{f.name}" for cls in classes for f in dataclasses.fields(cls)
               if not dataclasses.is_dataclass(getattr(cls(), f.name, None)) and not description(cls, f.name)]
    assert len(classes) >= 15 and missing == []


def test_entries_walk_nested_sections_and_list_entries():
    keys = [key for key, *_ in entries(Config())]
    assert {"train.lora.r", "generate.sampling.temperature", "evaluate.arms[].adapter", "seed"} <= set(keys)
    assert "train.lora" not in keys  # a section is its keys, not a key


def test_config_doc_train_prints_workers_with_its_default(capsys):
    assert main(["config", "doc", "train"]) == 0
    lines = capsys.readouterr().out.splitlines()
    workers = next(line for line in lines if line.startswith("train.workers "))
    assert workers.split()[:3] == ["train.workers", "int", str(TrainConfig().workers)]
    assert "Ray Train workers" in workers
    assert all(line.startswith("train.") for line in lines)


def test_config_doc_unknown_section_is_one_line(capsys):
    assert main(["config", "doc", "trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no section 'trian'" in err and "train" in err
