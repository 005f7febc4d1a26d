"""The critique/revision chain, and plain helpful replies, over a batch of prompts, for any engine.

Pure apart from the engine it is handed: a Ray Data actor, a benchmark and a
unit test with a fake engine all run the same code.  Each step is one
``engine.generate`` call over the whole batch (not one call per prompt), so
the engine can batch and share the few-shot prefix.

Every step of every row records how it finished: the engine's ``stop`` or
``length`` (cut at ``max_new_tokens``), ``empty`` (nothing left once cleaned:
EOS at once, or only a leaked role marker) or ``error`` (the message goes to
the row's ``error``).  A row whose step is empty or failed sits out the
remaining steps, since there is nothing to critique or revise; the others go
on.  A step cut at ``length`` still goes on: whether a cut text may be used is
decided later, from the recorded finishes (``pairs.screen``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cai_ray.constitution.format import (
    clean, critique_prompt, helpful_prompt, initial_prompt, revision_prompt, stops_for,
)
from cai_ray.constitution.principles import Constitution, draw_principle

# Finishes after which a row has text to work on.
GOES_ON = ("stop", "length")


def row_seed(seed: int, row_id: str, step: str, round_: int = 0) -> int:
    """A sampling seed fixed by (seed, id, step, round): independent of batching."""
    digest = hashlib.sha256(f"{seed}\x00{row_id}\x00{step}\x00{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _step(engine, params, rows: list[dict], live: list[int], prompts: list[str], step: str,
          round_: int) -> dict[int, tuple[str | None, str]]:
    """Run one step for the rows in ``live``: {row index: (cleaned text or None, finish)}."""
    if not live:
        return {}
    seeds = [row_seed(params.seed, rows[i]["id"], step, round_) for i in live]
    outs = engine.generate(prompts, params, seeds=seeds, stop=stops_for(step))
    results = {}
    for i, out in zip(live, outs):
        rows[i]["prompt_tokens"] += out.prompt_tokens
        rows[i]["completion_tokens"] += out.completion_tokens
        if out.finish_reason == "error":
            rows[i]["error"] = f"{step} (round {round_}): {out.error}"
            results[i] = (None, "error")
        else:
            text = clean(out.text)
            results[i] = (text, out.finish_reason if text else "empty")
    return results


def _new_row(prompt: dict, purpose: str) -> dict:
    return {"id": prompt["id"], "prompt": prompt["prompt"], "purpose": purpose, "initial": None,
            "initial_finish": None, "rounds": [], "final": None, "error": None, "prompt_tokens": 0,
            "completion_tokens": 0}


def run_chains(engine, prompts: Sequence[dict], constitution: Constitution, rounds: int,
               few_shot: int, params, seed: int) -> list[dict]:
    """Initial reply, then ``rounds`` x (critique -> revision) for each ``{id, prompt}``.

    Returns one chain row per input: id, prompt, purpose ("harm"), initial and its finish,
    rounds (list of {principle_id, critique, critique_finish, revision, revision_finish}),
    final, error, token counts.  Round r critiques the reply of round r-1, so every revision
    is kept.  ``final`` is the last revision of a row that went through every step, else None.
    """
    rows = [_new_row(p, "harm") for p in prompts]
    live = list(range(len(rows)))
    current = {}
    for i, (text, finish) in _step(engine, params, rows, live,
                                   [initial_prompt(r["prompt"], few_shot) for r in rows], "initial", 0).items():
        rows[i]["initial"], rows[i]["initial_finish"] = text, finish
        current[i] = text
    live = [i for i in live if rows[i]["initial_finish"] in GOES_ON]
    for r in range(1, rounds + 1):
        principles = {i: draw_principle(constitution, seed, rows[i]["id"], r) for i in live}
        critiques = _step(engine, params, rows, live, [
            critique_prompt(rows[i]["prompt"], current[i], principles[i], few_shot) for i in live],
            "critique", r)
        for i in live:
            rows[i]["rounds"].append({"principle_id": principles[i].id, "critique": critiques[i][0],
                                      "critique_finish": critiques[i][1], "revision": None,
                                      "revision_finish": None})
        live = [i for i in live if critiques[i][1] in GOES_ON]
        revisions = _step(engine, params, rows, live, [
            revision_prompt(rows[i]["prompt"], current[i], principles[i], critiques[i][0], few_shot)
            for i in live], "revision", r)
        for i, (text, finish) in revisions.items():
            rows[i]["rounds"][-1].update(revision=text, revision_finish=finish)
            current[i] = text
        live = [i for i in live if revisions[i][1] in GOES_ON]
    for i in live:
        rows[i]["final"] = current[i]
    return rows


def helpful_replies(engine, prompts: Sequence[dict], few_shot: int, params) -> list[dict]:
    """One plain reply per ``{id, prompt}`` after benign demonstrations; rows shaped as chains.

    ``initial`` and ``final`` both hold the reply (``final`` None when it is empty or failed);
    there are no rounds: helpful prompts get no critique.
    """
    rows = [_new_row(p, "helpful") for p in prompts]
    texts = _step(engine, params, rows, list(range(len(rows))),
                  [helpful_prompt(r["prompt"], few_shot) for r in rows], "helpful", 0)
    for i, (text, finish) in texts.items():
        rows[i].update(initial=text, initial_finish=finish, final=text if finish in GOES_ON else None)
    return rows
