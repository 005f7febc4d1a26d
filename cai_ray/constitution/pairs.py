"""Turn finished chains into SFT rows and preference pairs.

A chain row (one line of chains.parquet) carries ``prompt`` (the raw human
request), ``initial`` (the first reply) and ``revisions`` (one reply per
critique/revision round, in order), plus its stable ``id``.  Output columns use
TRL's names: SFT rows ``prompt``/``completion``, pairs ``prompt``/``chosen``/
``rejected``.  Prompts go through ``conversation_prompt`` and completions
through ``spaced`` in both, so SFT and DPO see byte-identical formatting.
"""

from __future__ import annotations

from collections.abc import Mapping

from cai_ray.constitution.format import conversation_prompt, spaced


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
