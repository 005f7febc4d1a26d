"""Constitutional data generation: prompts -> critique/revision chains (harm prompts) and plain
replies (helpful prompts) -> SFT rows, preference pairs and helpful rows."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cai_ray import console, quality
from cai_ray.config import PURPOSES, Config, stage_folder, to_yaml
from cai_ray.constitution import (
    EXAMPLES, HELPFUL_EXAMPLES, STEPS, build_pair, helpful_row, load_constitution, screen, sft_row,
)
from cai_ray.constitution.pairs import step_finishes
from cai_ray.data.prompts import load_prompts
from cai_ray.evaluation.sets import check_training_prompts
from cai_ray.files import write_atomic
from cai_ray.locks import hold
from cai_ray.parts import Parts, check_error_rate, finished, write_manifest
from cai_ray.tracking import Store

# Each step keeps its finish: stop, length (cut at max_new_tokens), empty or error.  These
# columns came in with prompt purposes; parts without them are refused on resume (Parts.done_ids).
ROUND = pa.struct([("principle_id", pa.string()), ("critique", pa.string()), ("critique_finish", pa.string()),
                   ("revision", pa.string()), ("revision_finish", pa.string())])
CHAIN_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("purpose", pa.string()), ("initial", pa.string()),
    ("initial_finish", pa.string()), ("rounds", pa.list_(ROUND)), ("final", pa.string()),
    ("flags", pa.list_(pa.string())), ("error", pa.string()), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
])
FINISHES = ("stop", "length", "empty", "error")
REASONS = (*quality.FILTERS, "unrevised", "empty", "truncated", "truncated_initial")
# Parts are written as the pipeline streams; this many rows make one MLflow progress point.
PROGRESS_EVERY = 256


def _stream_chains(cfg: Config, todo: list[dict], chains: Parts, store: Store) -> dict:
    """Run the revision actors over ``todo`` with Ray Data, writing parts as they arrive."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from cai_ray.data.actors import RevisionActor, RowLedger
    from cai_ray.runtime import init_ray, placement

    bar = console.progress("generate", total=len(todo), unit="rows")  # from here: Ray and actors start slowly
    init_ray(cfg)
    g = cfg.generate
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ledger = ray.remote(RowLedger).options(num_cpus=0, scheduling_strategy=here).remote()
    # Blocks of at most batch_size rows, each one batch (batch_size=None): with batch_size set,
    # Ray Data bundles blocks up to batch_size rows, so a task ran two blocks (a full batch and
    # a ragged one) and a kill lost up to twice the rows in flight per actor.
    ds = ray.data.from_items(todo, override_num_blocks=max(1, -(-len(todo) // g.batch_size)))
    # The actor's __call__ is async: Ray Data runs up to batches_in_flight of its batches at once.
    pool = ray.data.ActorPoolStrategy(size=g.actors, max_concurrent_calls_per_actor=g.batches_in_flight)
    ds = ds.map_batches(RevisionActor, fn_constructor_kwargs={"cfg": cfg, "ledger": ledger}, batch_size=None,
                        batch_format="pandas", compute=pool, **placement("generate", g).ray_options())
    start, rows, tokens, last = time.time(), 0, 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        chains.write(batch)
        rows += batch.num_rows
        bar.advance(batch.num_rows)
        tokens += pa.compute.sum(batch.column("completion_tokens")).as_py() or 0
        if rows - last >= PROGRESS_EVERY or rows == len(todo):
            elapsed = max(time.time() - start, 1e-9)
            store.log_metrics({"rows_done": rows, "rows_per_s": rows / elapsed,
                               "completion_tokens_per_s": tokens / elapsed}, step=rows)
            last = rows
    bar.done()
    elapsed = time.time() - start
    redone = ray.get(ledger.total.remote()) - rows
    if redone:
        console.say(f"   {redone} rows were redone: their actor was lost (a node gone?) and Ray retried them")
    return {"rows": rows, "seconds": elapsed, "completion_tokens": tokens, "redone": redone}


def _finalize(cfg: Config, out: Path, table: pa.Table) -> dict:
    """chains -> sft, pairs, helpful, rejects; counts every step's finish and every dropped row."""
    chains = table.to_pylist()
    written = {name: [] for name in ("sft", "pairs", "helpful", "rejects")}
    reasons = dict.fromkeys(REASONS, 0)
    for row in chains:
        verdict = screen(row)
        for reason in verdict.reasons:
            if reason in reasons:  # errors are counted on their own below
                reasons[reason] += 1
        helpful = row["purpose"] == "helpful"
        if verdict.keep and helpful:
            written["helpful"].append(helpful_row(row))
        elif verdict.keep:
            chain = {"id": row["id"], "prompt": row["prompt"], "initial": row["initial"],
                     "revisions": [r["revision"] for r in row["rounds"]]}
            written["sft"].append(sft_row(chain))
            if verdict.pair:
                written["pairs"].append(build_pair(chain))
        if not (verdict.pair or (helpful and verdict.keep)):
            written["rejects"].append({
                "id": row["id"], "prompt": row["prompt"], "purpose": row["purpose"], "final": row["final"],
                "reason": f"error: {row['error']}" if row["error"] else ", ".join(verdict.reasons),
                "step": verdict.step, "lost": "helpful" if helpful else "pair" if verdict.keep else "sft+pair"})
    for name, rows in written.items():
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(rows, schema=_schema(name)), tmp)
        os.replace(tmp, out / f"{name}.parquet")
    errors = sum(1 for r in chains if r["error"])
    return {"chains": len(chains), "prompts": {p: sum(r["purpose"] == p for r in chains) for p in PURPOSES},
            "sft_rows": len(written["sft"]), "pairs": len(written["pairs"]),
            "helpful_rows": len(written["helpful"]), "rejects": len(written["rejects"]),
            "errors": errors, "error_rate": errors / max(len(chains), 1), "filters": reasons,
            "finish": _finish_counts(chains),
            "distinct_2": quality.distinct_n([r["final"] for r in chains
                                              if r["final"] and r["purpose"] == "harm"], 2)}


def _finish_counts(chains: list[dict]) -> dict:
    """How every step of every chain ended, per kind of step (a failed batch counts as an error)."""
    counts = {step: dict.fromkeys(FINISHES, 0) for step in STEPS}
    for row in chains:
        for name, finish in step_finishes(row):
            counts[name.split()[0]][finish or "error"] += 1
    return counts


def _schema(name: str) -> pa.Schema:
    s = pa.string()
    return {"sft": pa.schema([("prompt", s), ("completion", s), ("id", s)]),
            "helpful": pa.schema([("prompt", s), ("completion", s), ("id", s)]),
            "pairs": pa.schema([("prompt", s), ("chosen", s), ("rejected", s), ("source", s),
                                ("label", pa.float64()), ("id", s)]),
            "rejects": pa.schema([("id", s), ("prompt", s), ("purpose", s), ("final", s), ("reason", s),
                                  ("step", s), ("lost", s)])}[name]


def _prepare(cfg: Config) -> tuple[list[dict], dict, str]:
    """Everything that can fail on bad input, checked before Ray or any file write."""
    constitution = load_constitution(cfg.generate.constitution)
    if cfg.generate.few_shot > len(EXAMPLES):
        raise ValueError(f"generate.few_shot={cfg.generate.few_shot} but only {len(EXAMPLES)} "
                         f"few-shot examples exist")
    if cfg.generate.helpful_few_shot > len(HELPFUL_EXAMPLES):
        raise ValueError(f"generate.helpful_few_shot={cfg.generate.helpful_few_shot} but only "
                         f"{len(HELPFUL_EXAMPLES)} helpful examples exist")
    stats: dict = {}
    rows = load_prompts(cfg.data, stats=stats)
    stats["heldout_checked"] = check_training_prompts(cfg, rows, "generation prompts", tuple(cfg.generate.heldout_sets))
    return rows, stats, constitution.hash


def run(cfg: Config, store: Store) -> dict:
    """Generate chains, SFT rows, preference pairs and helpful rows; a rerun resumes where it stopped."""
    from cai_ray.engines.base import resolve_model_path

    resolve_model_path(cfg.model)  # a bad model path fails here, not inside an actor
    rows, data_stats, constitution_hash = _prepare(cfg)
    out = stage_folder(cfg, "generate")
    if (done := finished(out)) is not None:
        return done
    with hold(out, cfg.runtime.lock_lease_s):
        return _generate(cfg, store, out, rows, data_stats, constitution_hash)


def _generate(cfg: Config, store: Store, out: Path, rows: list[dict], data_stats: dict,
              constitution_hash: str) -> dict:
    if (finished_earlier := finished(out)) is not None:  # by a driver that held the lock just before us
        return finished_earlier
    chains = Parts(out / "chains", CHAIN_SCHEMA)
    write_atomic(out / "config.yaml", to_yaml(cfg))
    done, unreadable = chains.done_ids()
    todo = [{"id": r["id"], "prompt": r["prompt"], "purpose": r["purpose"]} for r in rows if r["id"] not in done]
    if done:
        console.say(f"   resuming: {len(done)} of {len(rows)} prompts done earlier, {len(todo)} to go")
    run_stats = _stream_chains(cfg, todo, chains, store) if todo else {"rows": 0, "seconds": 0.0,
                                                                        "completion_tokens": 0, "redone": 0}
    table, duplicates = chains.read(r["id"] for r in rows)
    summary = _finalize(cfg, out, table)
    summary.update(stage="generate", output=str(out), config_hash=out.name,
                   constitution_hash=constitution_hash, data=data_stats, mlflow_run_id=store.run_id,
                   resumed_rows=len(done), unreadable_parts=unreadable, duplicate_rows=duplicates,
                   generated_rows=run_stats["rows"], redone_rows=run_stats["redone"],
                   seconds=round(run_stats["seconds"], 2),
                   rows_per_s=round(run_stats["rows"] / max(run_stats["seconds"], 1e-9), 3),
                   completion_tokens=run_stats["completion_tokens"])
    _report(store, out, summary)
    check_error_rate(out, "generate", summary["errors"], summary["chains"], summary["error_rate"],
                     cfg.generate.max_error_rate)
    write_manifest(out, summary)
    return summary


def _report(store: Store, out: Path, summary: dict) -> None:
    store.set_tags({"stage": "generate", "config_hash": summary["config_hash"],
                    "constitution_hash": summary["constitution_hash"]})
    metrics = {k: summary[k] for k in ("chains", "sft_rows", "pairs", "helpful_rows", "rejects", "errors",
                                       "error_rate", "distinct_2", "rows_per_s")}
    metrics.update({f"prompts/{k}": v for k, v in summary["prompts"].items()})
    metrics.update({f"filter/{k}": v for k, v in summary["filters"].items()})
    metrics.update({f"finish/{step}/{k}": v for step, counts in summary["finish"].items() for k, v in counts.items()})
    store.log_metrics(metrics)
    for name in ("sft.parquet", "pairs.parquet", "helpful.parquet", "rejects.parquet", "config.yaml"):
        store.log_artifact(out / name, "generate")
