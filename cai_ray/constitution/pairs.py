"""Turn finished chains into SFT rows, preference pairs and helpful rows, and decide which may.

A chain row (one line of chains.parquet) carries ``prompt`` (the raw human
request), ``initial`` (the first reply) and ``revisions`` (one reply per
critique/revision round, in order), plus its stable ``id``.  Output columns use
TRL's names: SFT rows ``prompt``/``completion``, pairs ``prompt``/``chosen``/
``rejected``.  Prompts go through ``conversation_prompt`` and completions
through ``spaced`` in both, so SFT and DPO see byte-identical formatting.

What a row may become (``screen``), from the finish recorded for each step:

* an ``empty`` step (or an engine error) ends the row: nothing to train on;
* the text that would be trained on -- the final revision, or a helpful reply -- cut at
  ``max_new_tokens`` (``truncated``) is never a target: training appends EOS, which would
  teach the model to stop mid-sentence;
* an initial reply cut short (``truncated_initial``) keeps the row's SFT target (the final
  revision, complete) but gives no pair: its rejected side would end in an EOS the model never
  wrote, so DPO could prefer the revision for being finished rather than for being harmless;
* a critique or an earlier revision cut short is counted per step but costs nothing: neither
  is ever trained on, and the final revision is screened on its own;
* the collapse guards' flags on the final text (and ``unrevised``) reject the row as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cai_ray.constitution.format import conversation_prompt, spaced

# Reasons that cost a row its training text (everything); the rest cost only its pair.
PAIR_ONLY = ("truncated_initial",)


def _field(row: Mapping, name: str) -> str:
    value = row.get(name)
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError(f"chain row id={row.get('id', '?')}: field '{name}' must be non-empty text")


def _final_revision(row: Mapping) -> str:
    revisions = row.get("revisions")
    if revisions is None or isinstance(revisions, str) or len(revisions) == 0:
        raise ValueError(f"chain row id={row.get('id', '?')}: field 'revisions' must be a non-empty list")
    final = revisions[-1]
    if not isinstance(final, str) or not final.strip():
        raise ValueError(f"chain row id={row.get('id', '?')}: field 'revisions' ends with an empty revision")
    return final


def _with_id(row: Mapping, out: dict) -> dict:
    # Every output row keeps the id it came from, so joins never guess.
    if "id" in row:
        out["id"] = row["id"]
    return out


def sft_row(row: Mapping) -> dict:
    """``{prompt, completion}``: the formatted request and its final revision."""
    return _with_id(row, {"prompt": conversation_prompt(_field(row, "prompt")),
                          "completion": spaced(_final_revision(row))})


def helpful_row(row: Mapping) -> dict:
    """``{prompt, completion}``: the formatted request and its plain helpful reply."""
    return _with_id(row, {"prompt": conversation_prompt(_field(row, "prompt")),
                          "completion": spaced(_field(row, "final"))})


def build_pair(row: Mapping) -> dict:
    """A preference pair: final revision chosen over the initial reply.

    ``label`` is the probability that ``chosen`` is better; a revision made to
    satisfy the constitution is taken as better by construction, hence 1.0.
    Pairs from AI feedback carry the judge's probability in the same column.
    """
    return _with_id(row, {"prompt": conversation_prompt(_field(row, "prompt")),
                          "chosen": spaced(_final_revision(row)),
                          "rejected": spaced(_field(row, "initial")),
                          "source": "revision",
                          "label": 1.0})


@dataclass(frozen=True)
class Verdict:
    reasons: tuple[str, ...]  # every reason that applies; empty: the row is used in full
    step: str | None          # the step an empty or cut text came from ("initial", "revision 2"...)
    keep: bool                # its SFT row (or helpful row) is written
    pair: bool                # its preference pair is written (harm rows only)


def step_finishes(row: Mapping) -> list[tuple[str, str | None]]:
    """(step name, finish) in the order the steps ran."""
    steps = [("helpful" if row.get("purpose") == "helpful" else "initial", row.get("initial_finish"))]
    for r, entry in enumerate(row.get("rounds") or (), start=1):
        steps.append((f"critique {r}", entry.get("critique_finish")))
        if entry.get("revision_finish") is not None:
            steps.append((f"revision {r}", entry["revision_finish"]))
    return steps


def screen(row: Mapping) -> Verdict:
    """What a chain row (with its collapse-guard ``flags``) may become; see the module notes."""
    helpful = row.get("purpose") == "helpful"
    if row.get("error"):
        return Verdict(("error",), None, False, False)
    steps = step_finishes(row)
    empty = next((name for name, finish in steps if finish == "empty"), None)
    if empty is not None:
        return Verdict(("empty",), empty, False, False)
    reasons, step = [], None
    last, last_finish = steps[-1]
    if last_finish == "length":
        reasons, step = ["truncated"], last
    reasons += list(row.get("flags") or ())
    if not helpful and steps[0][1] == "length":
        reasons.append("truncated_initial")
        step = step or steps[0][0]
    keep = all(r in PAIR_ONLY for r in reasons)
    return Verdict(tuple(reasons), step, keep, keep and not helpful and not reasons)
