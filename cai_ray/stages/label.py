"""Preference labels from AI feedback (RL-CAI); ``--check`` measures the feedback model on known pairs.

For each harm prompt the SL-CAI policy (the DPO reference) samples two replies, and a base
feedback model compares them in both orders (cai_ray/constitution/feedback.py).  Like
generate: Ray Data actors, parts written atomically as they stream, a rerun resumes by the
ids already written, failed batches become error rows, manifest.json is written last.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from cai_ray.config import Config, ModelConfig, stage_folder, to_yaml
from cai_ray.constitution import load_constitution, spaced
from cai_ray.constitution.feedback import (
    check_summary, decide, feedback_examples, p_first, position_bias, same_text, sample_two, score_orders,
)
from cai_ray.constitution.format import conversation_prompt
from cai_ray.data.prompts import load_prompts, prompt_id
from cai_ray.evaluation.sets import check_training_prompts
from cai_ray.files import write_atomic
from cai_ray.locks import hold
from cai_ray.parts import Parts, check_error_rate, finished, write_manifest
from cai_ray.tracking import Store, stage_run
from cai_ray.train.sources import read_rows

S, F = pa.string(), pa.float64()
ROW_SCHEMA = pa.schema([
    ("id", S), ("prompt", S), ("response_1", S), ("response_2", S), ("principle_id", S),
    ("p_a_order1", F), ("p_a_order2", F), ("error", S), ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()), ("finish_1", S), ("finish_2", S),
])
PAIR_SCHEMA = pa.schema([
    ("prompt", S), ("chosen", S), ("rejected", S), ("source", S), ("label", F), ("id", S),
    ("principle_id", S), ("p_chosen", F), ("p_chosen_as_a", F), ("p_chosen_as_b", F),
])
REJECT_SCHEMA = pa.schema([("id", S), ("prompt", S), ("response_1", S), ("response_2", S), ("reason", S)])
CHECK_SET = "samples:feedback_check"
PROGRESS_EVERY = 256
Model = tuple[ModelConfig, Optional[str]]  # (model, PEFT adapter folder or None)


class LabelActor:
    """``map_batches`` callable: ``{id, prompt}`` rows in, both orders' P(A) out.

    Rows arriving with ``response_1``/``response_2`` (the check set) skip sampling.  A batch
    whose engine call raises becomes error rows, so one bad batch never stops the job.
    """

    def __init__(self, cfg: Config, policy: Optional[Model], feedback: Model):
        from cai_ray.engines import make_engine

        self.cfg, self.policy, self.feedback = cfg, policy, feedback
        self.constitution = load_constitution(cfg.label.constitution or cfg.generate.constitution)
        # A base feedback model and a base + adapter policy share one engine; distinct models
        # get one each, splitting the actor's GPU memory between them.
        models: dict[str, tuple[ModelConfig, bool]] = {}
        for model, adapter in filter(None, (policy, feedback)):
            known = models.get(model.path, (model, False))
            models[model.path] = (known[0], known[1] or adapter is not None)
        self.engines = {}
        for path, (model, lora) in models.items():
            self.engines[path] = make_engine(model, cfg.engine, lora=lora, share=cfg.label.num_gpus_per_actor,
                                             engines=len(models))

    def __del__(self):  # Ray Data deletes the callable when its actor stops
        engines, self.engines = getattr(self, "engines", {}), {}
        for engine in engines.values():
            engine.close()

    def __call__(self, batch):
        import pandas as pd

        rows = [{name: r.get(name) for name in ROW_SCHEMA.names} for r in batch.to_dict("records")]
        for row in rows:
            row.update(prompt_tokens=0, completion_tokens=0)
        try:
            self._label(rows)
        except Exception as exc:  # noqa: BLE001 - recorded per row, counted by the stage
            text = str(exc).strip()
            reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            for row in rows:
                row.update(p_a_order1=None, p_a_order2=None, error=f"batch failed: {reason}")
        return pd.DataFrame(rows, columns=ROW_SCHEMA.names)

    def _label(self, rows: list[dict]) -> None:
        label = self.cfg.label
        if self.policy is not None:
            model, adapter = self.policy
            for row, sampled in zip(rows, sample_two(self.engines[model.path], rows, label.sampling, adapter)):
                row.update(sampled)
        todo = [r for r in rows if r["error"] is None and r["response_1"] and r["response_2"]
                and not same_text(r["response_1"], r["response_2"]) and not _cut(r)]
        model, adapter = self.feedback
        scores = score_orders(self.engines[model.path], todo, self.constitution, label.few_shot,
                              self.cfg.seed, adapter)
        for row, score in zip(todo, scores):
            row.update(score)
            if math.isnan(score["p_a_order1"]) or math.isnan(score["p_a_order2"]):
                row["error"] = "feedback: the comparison could not be scored (prompt longer than the context?)"


# ---------------------------------------------------------------- inputs


def _folder_model(cfg: Config, folder: str, key: str) -> Model:
    """A PEFT adapter on model.path, or a full model folder (e.g. full fine-tuning)."""
    path = Path(folder).expanduser().resolve()
    if (path / "adapter_config.json").is_file():
        return cfg.model, str(path)
    if (path / "config.json").is_file():
        return ModelConfig(path=str(path), dtype=cfg.model.dtype,
                           trust_remote_code=cfg.model.trust_remote_code), None
    raise ValueError(f"{key}={folder}: not a PEFT adapter folder (adapter_config.json) "
                     f"nor a model folder (config.json)")


def _policy(cfg: Config) -> Model:
    """The SL-CAI policy: label.policy, else the DPO reference (dpo.sft_adapter or the sft output)."""
    for key, value in (("label.policy", cfg.label.policy), ("dpo.sft_adapter", cfg.dpo.sft_adapter)):
        if value:
            return _folder_model(cfg, value, key)
    sft = stage_folder(cfg, "sft")
    for name in ("adapter", "merged"):
        if (sft / name).is_dir():
            return _folder_model(cfg, str(sft / name), "sft output")
    raise ValueError(f"label.policy is unset and the sft stage has no output at {sft}; run `cai-ray sft` "
                     f"with this config first, or set label.policy=FOLDER")


def _models(cfg: Config, check: bool) -> tuple[Optional[Model], Model]:
    """(policy, feedback model); no policy in check mode, where replies are given."""
    from cai_ray.engines.base import resolve_model_path

    resolve_model_path(cfg.model)
    feedback = cfg.label.feedback
    policy = _policy(cfg) if not check or feedback == "sft" else None
    if feedback is None:
        chosen = (cfg.model, None)
    elif feedback == "sft":
        chosen = policy
    else:
        model = ModelConfig(path=feedback, role=cfg.label.feedback_role, dtype=cfg.model.dtype)
        resolve_model_path(model)
        chosen = (model, None)
    return (None if check else policy), chosen


def _constitution(cfg: Config):
    constitution = load_constitution(cfg.label.constitution or cfg.generate.constitution)
    if not constitution.comparisons:
        key = "label.constitution" if cfg.label.constitution else "generate.constitution"
        raise ValueError(f"{key}={constitution.name}: the constitution has no comparisons to label pairs "
                         f"with; add a 'comparisons' list or use another constitution")
    feedback_examples(cfg.label.few_shot)
    return constitution


def _harm_prompts(cfg: Config) -> tuple[list[dict], dict]:
    stats: dict = {}
    rows = load_prompts(cfg.data, stats=stats)
    harm = [r for r in rows if r.get("purpose", "harm") == "harm"]
    stats["not_harm"] = len(rows) - len(harm)
    if not harm:
        raise ValueError(f"data.source={cfg.data.source}: none of its {len(rows)} prompts has purpose "
                         f"'harm'; the label stage compares replies to harm prompts only")
    # The pairs train DPO: evaluation prompts must not be among them.
    check_training_prompts(cfg, harm, "label prompts", tuple(cfg.generate.heldout_sets))
    return [{"id": r["id"], "prompt": r["prompt"]} for r in harm], stats


# ---------------------------------------------------------------- Ray Data


def _stream(cfg: Config, rows: list[dict], models: tuple, store: Store, sink) -> dict:
    """Run the label actors over ``rows``, handing each finished batch (a pyarrow table) to ``sink``."""
    import ray

    from cai_ray.runtime import init_ray, placement

    init_ray(cfg)
    lab = cfg.label
    ds = ray.data.from_items(rows, override_num_blocks=max(1, -(-len(rows) // lab.batch_size)))
    ds = ds.map_batches(LabelActor, fn_constructor_kwargs={"cfg": cfg, "policy": models[0], "feedback": models[1]},
                        batch_size=lab.batch_size, batch_format="pandas",
                        compute=ray.data.ActorPoolStrategy(size=lab.actors),
                        **placement("label", lab).ray_options())
    start, done, last = time.time(), 0, 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        sink(batch.select(ROW_SCHEMA.names).cast(ROW_SCHEMA))
        done += batch.num_rows
        if done - last >= PROGRESS_EVERY or done == len(rows):
            store.log_metrics({"rows_done": done, "rows_per_s": done / max(time.time() - start, 1e-9)}, step=done)
            last = done
    return {"rows": done, "seconds": time.time() - start}


# ---------------------------------------------------------------- labels


def _pair(row: dict, decision) -> dict:
    first = decision.first_chosen
    chosen, rejected = (row["response_1"], row["response_2"]) if first else (row["response_2"], row["response_1"])
    # Both orders as P(chosen is better): shown as (A) it wins with P(A), shown as (B) with 1 - P(A).
    as_a, as_b = (row["p_a_order1"], 1 - row["p_a_order2"]) if first else (row["p_a_order2"], 1 - row["p_a_order1"])
    return {"prompt": conversation_prompt(row["prompt"]), "chosen": spaced(chosen), "rejected": spaced(rejected),
            "source": "feedback", "label": decision.label, "id": row["id"], "principle_id": row["principle_id"],
            "p_chosen": decision.p_chosen, "p_chosen_as_a": as_a, "p_chosen_as_b": as_b}


def _cut(row: dict) -> list[int]:
    """Which sampled replies stopped at max_new_tokens: never a pair side (DPO would append an EOS
    the policy never wrote, as generate's screening says for revisions)."""
    return [n for n in (1, 2) if row.get(f"finish_{n}") == "length"]


def _reason(row: dict, decision) -> Optional[str]:
    if row["error"]:
        return f"error: {row['error']}"
    if _cut(row):
        return "truncated"
    if not row["response_1"] or not row["response_2"]:
        return "empty"
    if same_text(row["response_1"], row["response_2"]):
        return "identical"
    return "margin" if decision is None else None


def _finalize(cfg: Config, out: Path, rows: list[dict]) -> dict:
    """Rows -> pairs.parquet and rejects.parquet; every dropped row is counted by reason."""
    pairs, rejects = [], []
    dropped = {"errors": 0, "truncated": 0, "empty": 0, "identical": 0, "margin": 0}
    for row in rows:
        scored = row["p_a_order1"] is not None and not row["error"]
        decision = decide(p_first(row["p_a_order1"], row["p_a_order2"]), cfg.label.margin,
                          cfg.label.clamp) if scored else None
        reason = _reason(row, decision)
        if reason is None:
            pairs.append(_pair(row, decision))
            continue
        dropped["errors" if reason.startswith("error") else reason] += 1
        if reason == "truncated":
            reason = (f"truncated: response {' and '.join(map(str, _cut(row)))} cut at "
                      f"label.sampling.max_new_tokens={cfg.label.sampling.max_new_tokens}")
        rejects.append({k: row[k] for k in ("id", "prompt", "response_1", "response_2")} | {"reason": reason})
    for name, data, schema in (("pairs", pairs, PAIR_SCHEMA), ("rejects", rejects, REJECT_SCHEMA)):
        tmp = out / f".{name}.parquet.tmp"
        pq.write_table(pa.Table.from_pylist(data, schema=schema), tmp)
        os.replace(tmp, out / f"{name}.parquet")
    scored = [r for r in rows if r["p_a_order1"] is not None and not r["error"]]
    labels = [p["label"] for p in pairs]
    return {"rows": len(rows), "pairs": len(pairs), "rejects": len(rejects), "dropped": dropped,
            "error_rate": dropped["errors"] / max(len(rows), 1),
            "label_mean": sum(labels) / len(labels) if labels else None,
            "position": position_bias([r["p_a_order1"] for r in scored], [r["p_a_order2"] for r in scored])}


def check(cfg: Config) -> None:
    """Input checks cheap enough to run before any MLflow run or output exists, valid for
    both `label` and `label --check`: the constitution, k, the feedback model, the check pairs."""
    _constitution(cfg)
    _models(cfg, check=True)
    _check_rows(cfg)


def run(cfg: Config, store: Store, check: bool = False) -> dict:
    """Label pairs (or, with ``check``, score the check set); a rerun resumes where it stopped."""
    if check:
        return run_check(cfg, store)
    constitution = _constitution(cfg)
    models = _models(cfg, check=False)
    rows, data_stats = _harm_prompts(cfg)
    check_rows = _check_rows(cfg) if cfg.label.check else []
    out = stage_folder(cfg, "label")
    if (done := finished(out)) is not None:
        return done
    with hold(out, cfg.runtime.lock_lease_s):
        return _label(cfg, store, out, constitution, models, rows, data_stats, check_rows)


def _label(cfg: Config, store: Store, out: Path, constitution, models: tuple, rows: list[dict], data_stats: dict,
           check_rows: list[dict]) -> dict:
    measured = None
    if check_rows:
        with stage_run(store, f"{cfg.name}-label-check", {"stage": "label-check"}) as child:
            measured = run_check(cfg, child, check_rows)
        store.set_tags({"check_verdict": measured["verdict"]})
    parts = Parts(out / "rows", ROW_SCHEMA)
    write_atomic(out / "config.yaml", to_yaml(cfg))
    done, unreadable = parts.done_ids()
    todo = [r for r in rows if r["id"] not in done]
    print(f"label: {len(rows)} harm prompts, {len(done)} already done, {len(todo)} to go -> {out}")
    stats = _stream(cfg, todo, models, store, parts.write) if todo else {"rows": 0, "seconds": 0.0}
    table, duplicates = parts.read(r["id"] for r in rows)
    summary = _finalize(cfg, out, table.to_pylist())
    summary.update(stage="label", output=str(out), config_hash=out.name, data=data_stats,
                   constitution_hash=constitution.hash, policy=_describe(models[0]),
                   feedback=_describe(models[1]), mlflow_run_id=store.run_id, resumed_rows=len(done),
                   unreadable_parts=unreadable, duplicate_rows=duplicates, labelled_rows=stats["rows"], seconds=round(stats["seconds"], 2), check=measured)
    _report(store, out, summary)
    check_error_rate(out, "label", summary["dropped"]["errors"], summary["rows"], summary["error_rate"],
                     cfg.label.max_error_rate)
    write_manifest(out, summary)
    return summary


def _describe(model: Optional[Model]) -> Optional[str]:
    return None if model is None else model[0].path + (f" + {model[1]}" if model[1] else "")


def _report(store: Store, out: Path, summary: dict) -> None:
    store.set_tags({"stage": "label", "config_hash": summary["config_hash"],
                    "constitution_hash": summary["constitution_hash"], "feedback_model": summary["feedback"]})
    metrics = {k: summary[k] for k in ("rows", "pairs", "rejects", "error_rate", "label_mean")}
    metrics.update({f"dropped/{k}": v for k, v in summary["dropped"].items()})
    metrics.update({f"position/{k}": v for k, v in summary["position"].items()})
    store.log_metrics(metrics)
    for name in ("pairs.parquet", "rejects.parquet", "config.yaml"):
        store.log_artifact(out / name, "label")


# ---------------------------------------------------------------- check


def _check_rows(cfg: Config) -> list[dict]:
    """The shipped check set and label.check_data: (prompt, chosen, rejected) with chosen truly better."""
    rows = []
    for i, source in enumerate([CHECK_SET, *cfg.label.check_data]):
        key = "label.check_data" if i else "check set"
        for n, row in enumerate(read_rows(source, ("prompt", "chosen", "rejected"), key=key)):
            if same_text(row["chosen"], row["rejected"]):
                raise ValueError(f"{key}: {source}: row {n}: 'chosen' and 'rejected' are the same reply; "
                                 f"a check pair needs two different responses")
            rows.append({"id": prompt_id("\x00".join((row["prompt"], row["chosen"], row["rejected"])), source),
                         "prompt": row["prompt"], "response_1": row["chosen"].strip(),
                         "response_2": row["rejected"].strip(), "set": source})
    return rows


def run_check(cfg: Config, store: Store, rows: Optional[list[dict]] = None) -> dict:
    """Accuracy (Wilson 95% interval) and ECE of the feedback model on pairs whose answer is known."""
    _constitution(cfg)
    models = _models(cfg, check=True)
    rows = [dict(r) for r in (rows or _check_rows(cfg))]
    sets = {r["id"]: r.pop("set") for r in rows}
    scored: list[dict] = []
    _stream(cfg, rows, models, store, lambda t: scored.extend(t.to_pylist()))
    ok = [r for r in scored if not r["error"]]
    # Response 1 is the truly better reply: P(it wins), averaged over both orders.
    p = {r["id"]: p_first(r["p_a_order1"], r["p_a_order2"]) for r in ok}
    report = {"stage": "label-check", "feedback": _describe(models[1]), "pairs": len(rows),
              "errors": len(scored) - len(ok), **check_summary(list(p.values())),
              # What "the longer reply is better" would score: a feedback model should beat it.
              "longer_wins": sum(len(r["response_1"]) > len(r["response_2"]) for r in ok) / len(ok) if ok else None,
              "per_set": {name: check_summary([x for i, x in p.items() if sets[i] == name])["accuracy"]
                          for name in dict.fromkeys(sets.values())},
              "position": position_bias([r["p_a_order1"] for r in ok], [r["p_a_order2"] for r in ok])}
    out = stage_folder(cfg, "label") / "check"
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=2))
    store.set_tags({"stage": "label-check", "feedback_model": report["feedback"], "verdict": report["verdict"],
                    "above_chance": str(report["above_chance"]).lower()})
    names = ("scored", "errors", "accuracy", "accuracy_lo", "accuracy_hi", "ece", "longer_wins")
    store.log_metrics({**{f"check/{k}": report[k] for k in names}, "check/above_chance": float(report["above_chance"]),
                       **{f"check/{k}": v for k, v in report["position"].items()}})
    store.log_artifact(out / "report.json", "label-check")
    return {"output": str(out), "pairs": len(rows), **{k: report[k] for k in (*names, "above_chance", "verdict")}}
