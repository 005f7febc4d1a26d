"""The critique/revision chain over a batch of prompts, for any engine.

Pure apart from the engine it is handed: a Ray Data actor, a benchmark and a
unit test with a fake engine all run the same code.  Each step is one
``engine.generate`` call over the whole batch (not one call per prompt), so
the engine can batch and share the few-shot prefix.  A row whose step fails
keeps its error and sits out the remaining steps; the others go on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cai_ray.constitution.format import (
    clean, critique_prompt, initial_prompt, revision_prompt, stops_for,
)
from cai_ray.constitution.principles import Constitution, draw_principle


def row_seed(seed: int, row_id: str, step: str, round_: int = 0) -> int:
    """A sampling seed fixed by (seed, id, step, round): independent of batching."""
    digest = hashlib.sha256(f"{seed}\x00{row_id}\x00{step}\x00{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _step(engine, params, rows: list[dict], live: list[int], prompts: list[str], step: str,
          round_: int) -> list[str | None]:
    """Run one step for the rows still alive; returns cleaned texts (None on error)."""
    seeds = [row_seed(params.seed, rows[i]["id"], step, round_) for i in live]
    outs = engine.generate(prompts, params, seeds=seeds, stop=stops_for(step))
    texts = []
    for i, out in zip(live, outs):
        rows[i]["prompt_tokens"] += out.prompt_tokens
        rows[i]["completion_tokens"] += out.completion_tokens
        if out.finish_reason == "error":
            rows[i]["error"] = f"{step} (round {round_}): {out.error}"
            texts.append(None)
        else:
            texts.append(clean(out.text))
    return texts


def run_chains(engine, prompts: Sequence[dict], constitution: Constitution, rounds: int,
               few_shot: int, params, seed: int) -> list[dict]:
    """Initial reply, then ``rounds`` x (critique -> revision) for each ``{id, prompt}``.

    Returns one chain row per input: id, prompt, initial, rounds (list of
    {principle_id, critique, revision}), final, error, token counts.  Round r
    critiques the reply of round r-1, so every revision is kept.
    """
    rows = [{"id": p["id"], "prompt": p["prompt"], "initial": None, "rounds": [], "final": None,
             "error": None, "prompt_tokens": 0, "completion_tokens": 0} for p in prompts]
    live = list(range(len(rows)))
    texts = _step(engine, params, rows, live, [initial_prompt(r["prompt"], few_shot) for r in rows],
                  "initial", 0)
    current = {}
    for i, text in zip(live, texts):
        rows[i]["initial"] = current[i] = text
    for r in range(1, rounds + 1):
        live = [i for i in live if rows[i]["error"] is None]
        principles = {i: draw_principle(constitution, seed, rows[i]["id"], r) for i in live}
        critiques = _step(engine, params, rows, live, [
            critique_prompt(rows[i]["prompt"], current[i], principles[i], few_shot) for i in live],
            "critique", r)
        live_c = [i for i, c in zip(live, critiques) if c is not None]
        critique_of = dict(zip(live, critiques))
        revisions = _step(engine, params, rows, live_c, [
            revision_prompt(rows[i]["prompt"], current[i], principles[i], critique_of[i], few_shot)
            for i in live_c], "revision", r)
        for i, text in zip(live_c, revisions):
            rows[i]["rounds"].append({"principle_id": principles[i].id, "critique": critique_of[i],
                                      "revision": text})
            if text is not None:
                current[i] = text
    for i, row in enumerate(rows):
        if row["error"] is None:
            row["final"] = current[i]
    return rows
