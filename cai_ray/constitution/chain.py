"""The critique/revision chain, and plain helpful replies, for any engine.

Pure apart from the engine it is handed: a Ray Data actor, a benchmark and a
unit test with a fake engine all run the same code.  Each row runs its own
chain, awaiting ``engine.agenerate`` for one prompt per step, and all rows of a
call run concurrently.  How the rows share the engine is the engine's business:
vLLM batches them continuously (a row starts its next step as soon as its last
one ends, whatever the other rows are doing), and the hf engine gathers the
rows that wait at the same time into one ``generate`` call, which makes each
step one call over the batch (sharing the few-shot prefix) as before.

Every step of every row records how it finished: the engine's ``stop`` or
``length`` (cut at ``max_new_tokens``), ``empty`` (nothing left once cleaned:
EOS at once, or only a leaked role marker) or ``error`` (the message goes to
the row's ``error``).  A row whose step is empty or failed sits out the
remaining steps, since there is nothing to critique or revise; the others go
on.  A step cut at ``length`` still goes on: whether a cut text may be used is
decided later, from the recorded finishes (``pairs.screen``).
"""

from __future__ import annotations

import asyncio
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


async def _ask(engine, params, row: dict, prompt: str, step: str, round_: int) -> tuple[str | None, str]:
    """One step for one row: (cleaned text or None, finish); token counts and errors go to ``row``."""
    seed = row_seed(params.seed, row["id"], step, round_)
    out, = await engine.agenerate([prompt], params, seeds=[seed], stop=stops_for(step))
    row["prompt_tokens"] += out.prompt_tokens
    row["completion_tokens"] += out.completion_tokens
    if out.finish_reason == "error":
        row["error"] = f"{step} (round {round_}): {out.error}"
        return None, "error"
    text = clean(out.text)
    return text, out.finish_reason if text else "empty"


def _new_row(prompt: dict, purpose: str) -> dict:
    return {"id": prompt["id"], "prompt": prompt["prompt"], "purpose": purpose, "initial": None,
            "initial_finish": None, "rounds": [], "final": None, "error": None, "prompt_tokens": 0,
            "completion_tokens": 0}


async def _chain(engine, row: dict, constitution: Constitution, rounds: int, few_shot: int, params,
                 seed: int) -> None:
    """Initial reply, then ``rounds`` x (critique -> revision), written into ``row``."""
    text, finish = await _ask(engine, params, row, initial_prompt(row["prompt"], few_shot), "initial", 0)
    row["initial"], row["initial_finish"] = text, finish
    for r in range(1, rounds + 1):
        if finish not in GOES_ON:
            return
        principle = draw_principle(constitution, seed, row["id"], r)
        critique, finish = await _ask(engine, params, row, critique_prompt(
            row["prompt"], text, principle, few_shot), "critique", r)
        row["rounds"].append({"principle_id": principle.id, "critique": critique, "critique_finish": finish,
                              "revision": None, "revision_finish": None})
        if finish not in GOES_ON:
            return
        # Round r critiques the reply of round r-1, so every revision is kept.
        text, finish = await _ask(engine, params, row, revision_prompt(
            row["prompt"], text, principle, critique, few_shot), "revision", r)
        row["rounds"][-1].update(revision=text, revision_finish=finish)
    if finish in GOES_ON:
        row["final"] = text


async def run_chains_async(engine, prompts: Sequence[dict], constitution: Constitution, rounds: int,
                           few_shot: int, params, seed: int) -> list[dict]:
    """Initial reply, then ``rounds`` x (critique -> revision) for each ``{id, prompt}``.

    Returns one chain row per input: id, prompt, purpose ("harm"), initial and its finish,
    rounds (list of {principle_id, critique, critique_finish, revision, revision_finish}),
    final, error, token counts.  ``final`` is the last revision of a row that went through
    every step, else None.  An engine call that raises fails the whole call.
    """
    rows = [_new_row(p, "harm") for p in prompts]
    await asyncio.gather(*(_chain(engine, row, constitution, rounds, few_shot, params, seed) for row in rows))
    return rows


def run_chains(engine, prompts: Sequence[dict], constitution: Constitution, rounds: int,
               few_shot: int, params, seed: int) -> list[dict]:
    """``run_chains_async`` for callers without an event loop (benchmarks, estimate)."""
    return asyncio.run(run_chains_async(engine, prompts, constitution, rounds, few_shot, params, seed))


async def helpful_replies_async(engine, prompts: Sequence[dict], few_shot: int, params) -> list[dict]:
    """One plain reply per ``{id, prompt}`` after benign demonstrations; rows shaped as chains.

    ``initial`` and ``final`` both hold the reply (``final`` None when it is empty or failed);
    there are no rounds: helpful prompts get no critique.
    """
    rows = [_new_row(p, "helpful") for p in prompts]

    async def reply(row: dict) -> None:
        text, finish = await _ask(engine, params, row, helpful_prompt(row["prompt"], few_shot), "helpful", 0)
        row.update(initial=text, initial_finish=finish, final=text if finish in GOES_ON else None)

    await asyncio.gather(*(reply(row) for row in rows))
    return rows
