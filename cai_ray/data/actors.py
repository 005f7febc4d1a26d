"""Ray Data actors: one inference engine per actor, loaded once, fed batches.

``__call__`` is a coroutine, so Ray Data can hand one actor several batches at
once (``generate.batches_in_flight``): their rows share the actor's engine.
"""

from __future__ import annotations

import pandas as pd

from cai_ray import quality
from cai_ray.config import Config
from cai_ray.constitution import load_constitution
from cai_ray.constitution.chain import helpful_replies_async, run_chains_async
from cai_ray.engines import make_engine


class RowLedger:
    """Rows the generate actors started, counted on the driver's node.  Ray retries the batches of
    an actor whose node is lost on a new actor without telling the driver; started rows minus
    written rows is how many were redone."""

    def __init__(self):
        self.started = 0

    def add(self, rows: int) -> None:
        self.started += rows

    def total(self) -> int:
        return self.started


class RevisionActor:
    """``map_batches`` callable: prompts in, chains out -- critique/revision chains for
    ``harm`` prompts, one plain reply for ``helpful`` ones (a batch without a ``purpose``
    column is all harm).

    A batch whose engine call raises becomes error rows carrying the reason,
    so one bad batch never stops the job; the stage decides on the error rate.
    """

    def __init__(self, cfg: Config, ledger=None):
        self.cfg, self.ledger = cfg, ledger
        self.constitution = load_constitution(cfg.generate.constitution)
        # Chains run on the base model: no adapter, so vLLM starts without LoRA.
        self.engine = make_engine(cfg.model, cfg.engine, lora=False, share=cfg.generate.num_gpus_per_actor)

    def __del__(self):  # Ray Data deletes the callable when its actor stops
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    async def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        g = self.cfg.generate
        prompts = batch.to_dict("records")
        if self.ledger is not None:  # awaited: a batch started on a node that is then lost still counts
            await self.ledger.add.remote(len(prompts))
        harm = [p for p in prompts if p.get("purpose", "harm") != "helpful"]
        helpful = [p for p in prompts if p.get("purpose", "harm") == "helpful"]
        rows = []
        try:
            if harm:
                rows += await run_chains_async(self.engine, harm, self.constitution, g.rounds, g.few_shot,
                                               g.sampling, self.cfg.seed)
            if helpful:  # after the chains: one batch in flight never mixes two few-shot prefixes in an hf call
                rows += await helpful_replies_async(self.engine, helpful, g.helpful_few_shot, g.sampling)
        except Exception as exc:  # noqa: BLE001 - recorded per row, counted by the stage
            reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            rows = [{"id": p["id"], "prompt": p["prompt"], "purpose": p.get("purpose", "harm"),
                     "initial": None, "initial_finish": None, "rounds": [], "final": None,
                     "error": f"batch failed: {reason}", "prompt_tokens": 0, "completion_tokens": 0}
                    for p in prompts]
        for row in rows:
            row["flags"] = self._flags(row)
        return pd.DataFrame(rows)

    def _flags(self, row: dict) -> list[str]:
        """Names of the collapse guards the final text trips (none for rows without one)."""
        if row["final"] is None:
            return []
        fired = [name for name, hit in quality.check(row["final"], self.cfg.generate.quality).items() if hit]
        if row["rounds"] and row["final"].strip() == (row["initial"] or "").strip():
            fired.append("unrevised")
        return fired
