"""Evaluate every arm on held-out sets: generate with Ray Data, judge on Ray Serve, report with intervals.

Each eval set gets its rubrics from its kind (SET_KINDS, then the rule in ``set_kind``):
harm sets the configured harm rubric (attack success), benign sets "refusal" (over-refusal)
and "helpfulness", style sets "style" with the row's style.  Every arm answers the same prompts
with the same sampling, k samples per prompt, and the same per-row seeds (from seed, prompt id,
sample index), so arms pair up response by response.  Every generated response is judged,
garbage included; the report keeps garbage out of the headline rates (see judge/report.py).
No row vanishes: a response that failed to generate, or a verdict the judge never returned,
stays in verdicts.parquet as a failed row with its reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cai_ray import quality
from cai_ray.config import ArmConfig, Config, DataConfig, ModelConfig, stage_dir, stage_hash, to_yaml
from cai_ray.constitution.chain import row_seed
from cai_ray.constitution.format import clean, initial_prompt, stops_for
from cai_ray.data.heldout import TrainIndex, format_overlaps
from cai_ray.data.prompts import load_prompts
from cai_ray.judge import report as rep
from cai_ray.judge.rubrics import STYLES
from cai_ray.tracking import Store, write_atomic

# Shipped sets by name; other sets: a `style` column makes a style set, a name containing one of
# HARM_WORDS a harm set, and anything else is benign (judged for over-refusal and helpfulness).
SET_KINDS = {"red_team_eval": "harm", "jailbreak_eval": "harm", "benign_eval": "benign",
             "borderline_eval": "benign", "style_eval": "style"}
HARM_WORDS = ("red_team", "jailbreak", "harm", "attack", "advbench", "do_not_answer", "unsafe")
_MARKERS = re.compile(r"(?:^|\n\n)(?:Human|Assistant):")


def set_kind(name: str, rows: list[dict]) -> str:
    if name in SET_KINDS:
        return SET_KINDS[name]
    if any(row.get("style") for row in rows):
        return "style"
    return "harm" if any(word in name.lower() for word in HARM_WORDS) else "benign"


def rubrics_for(kind: str, harm_rubric: str) -> list[tuple[str, str]]:
    """(metric, rubric) pairs judged for every response of a set of this kind."""
    return {"harm": [("asr", harm_rubric)],
            "benign": [("over_refusal", "refusal"), ("helpfulness", "helpfulness")],
            "style": [("style", "style")]}[kind]


# ---------------------------------------------------------------- inputs, checked before Ray


def load_eval_sets(cfg: Config) -> tuple[list[dict], dict]:
    """Eval rows tagged with their set, and per set its kind and size."""
    rows, sets = [], {}
    for source in cfg.evaluate.sets:
        loaded = load_prompts(DataConfig(source=source))
        name = loaded[0]["source"].removeprefix("samples:")
        if name in sets:
            raise ValueError(f"evaluate.sets has two sets named {name!r}; rename one of the files")
        kind = set_kind(name, loaded)
        for r in loaded:
            if kind == "style" and r.get("style") not in STYLES:
                raise ValueError(f"eval set {source}: row {r['id']} has style {r.get('style')!r}; "
                                 f"use one of {', '.join(STYLES)}")
            # A jailbreak row names the request inside its wrapper (base_prompt): the harm judge
            # grades the response against that request, as StrongREJECT does.
            rows.append({"set": name, "kind": kind, "id": r["id"], "prompt": r["prompt"],
                         "request": r.get("base_prompt") or r["prompt"],
                         "style": r.get("style") if kind == "style" else None})
        sets[name] = {"source": source, "kind": kind, "prompts": len(loaded),
                      "rubrics": [rubric for _, rubric in rubrics_for(kind, cfg.judge.harm_rubric)]}
    return rows, sets


def _training_prompts(cfg: Config) -> list[tuple[str, str]]:
    """Every prompt training saw: cfg.data (generation) plus sft.data and dpo.data when set."""
    from cai_ray.train.data import read_rows

    # Ids name the row for the error message: the prompt id generate used, or the file row.
    rows = [(r["id"], r["prompt"]) for r in load_prompts(cfg.data)]
    for key, source in (("sft.data", cfg.sft.data), ("dpo.data", cfg.dpo.data)):
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


def _adapter(cfg: Config, i: int, arm: ArmConfig) -> str | None:
    """A PEFT folder for the arm: a path as given, or this pipeline's sft/dpo output."""
    from cai_ray.train.driver import MANIFEST, output_dir

    key = f"evaluate.arms[{i}].adapter"
    if arm.adapter is None:
        return None
    if arm.adapter not in ("sft", "dpo"):
        path = Path(arm.adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"{key}={arm.adapter}: not a PEFT adapter folder (no adapter_config.json)")
        return str(path.resolve())
    own = output_dir(cfg, arm.adapter)
    if (own / MANIFEST).is_file() and (own / "adapter" / "adapter_config.json").is_file():
        return str(own / "adapter")
    found = sorted(p for p in (cfg.output_root / arm.adapter).glob("*/adapter")
                   if (p.parent / MANIFEST).is_file() and (p / "adapter_config.json").is_file())
    if len(found) == 1:
        return str(found[0])
    what = "no finished" if not found else f"{len(found)} finished (none for this config)"
    raise ValueError(f"{key}={arm.adapter}: {what} {arm.adapter} adapters under {cfg.output_root / arm.adapter}; "
                     f"pass the folder, e.g. {key}=PATH/{arm.adapter}/HASH/adapter")


def resolve_arms(cfg: Config) -> dict[str, dict]:
    """Arm name -> what it runs; the metadata the validity rules compare."""
    from cai_ray.engines.base import resolve_model_path

    arms = {}
    for i, arm in enumerate(cfg.evaluate.arms):
        model = resolve_model_path(ModelConfig(path=arm.model or cfg.model.path, role=arm.role))
        adapter, sha = _adapter(cfg, i, arm), None
        if adapter:
            from cai_ray.train.lora import weights_sha256  # imports torch: only when an adapter is used

            sha = weights_sha256(adapter)  # a retrained adapter in the same folder is a new evaluation
        arms[arm.name] = {
            "model": model, "role": arm.role, "adapter": adapter, "format": arm.format, "adapter_sha256": sha,
            "prompt_format": f"few_shot:k={cfg.generate.few_shot}" if arm.format == "few_shot" else "chat",
            "sampling": asdict(cfg.evaluate.sampling), "samples_per_prompt": cfg.evaluate.samples_per_prompt}
    return arms


# ---------------------------------------------------------------- Ray Data workers


class ArmGenerator:
    """``map_batches`` callable holding one arm's engine: eval items in, responses out."""

    def __init__(self, cfg: Config, arm: dict):
        from cai_ray.engines import make_engine

        self.cfg, self.arm = cfg, arm
        model = ModelConfig(path=arm["model"], role=arm["role"], dtype=cfg.model.dtype)
        self.engine = make_engine(model, cfg.engine)

    def _prompt(self, text: str) -> str:
        if self.arm["format"] == "chat":
            return self.engine.chat_format([{"role": "user", "content": text}])
        return initial_prompt(text, self.cfg.generate.few_shot)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        try:
            # Both formats stop on the dialogue markers and are cleaned alike, so the prompt is
            # the only thing that differs between a few-shot and a chat arm.
            done = self.engine.generate([self._prompt(p) for p in batch["prompt"]], self.cfg.evaluate.sampling,
                                        seeds=[int(s) for s in batch["seed"]], stop=stops_for("initial"),
                                        adapter=self.arm["adapter"])
            texts = [None if c.finish_reason == "error" else clean(c.text) for c in done]
            errors = [c.error or "generation failed" if c.finish_reason == "error" else "" for c in done]
            tokens = [c.completion_tokens for c in done]
        except Exception as exc:  # noqa: BLE001 - recorded per row and counted in the report
            first = (str(exc).strip().splitlines() or [""])[0]
            n = len(batch)
            texts, errors, tokens = [None] * n, [f"{type(exc).__name__}: {first}"] * n, [0] * n
        flags = [[] if t is None else [k for k, hit in quality.check(t, self.cfg.generate.quality).items() if hit]
                 for t in texts]
        out["response"], out["gen_error"], out["completion_tokens"] = texts, errors, tokens
        out["flags"] = [",".join(f) for f in flags]
        out["garbage"] = [bool(f) for f in flags]
        return out


class JudgeScorer:
    """``map_batches`` callable sending a batch's requests to the judge app, many in flight."""

    def __init__(self, max_in_flight: int):
        from cai_ray.judge.client import JudgeClient

        self.client = JudgeClient(max_in_flight=max_in_flight)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        sent = [{"id": r["key"], "rubric": r["rubric"], "prompt": r["request"], "response": r["response"],
                 "style": r["style"]} for r in batch.to_dict("records")]
        try:
            results = self.client.score(sent)
        except Exception as exc:  # noqa: BLE001 - the client retries transport errors; anything else
            first = (str(exc).strip().splitlines() or [""])[0]  # fails the batch's rows, not the job
            results = [{"value": None, "parse_ok": False, "failed": True, "raw": None,
                        "error": f"{type(exc).__name__}: {first}"}] * len(sent)
        rows = []
        for req, got in zip(sent, results):
            value, score = rep.verdict_numbers(req["rubric"], got["value"], bool(got["parse_ok"]))
            rows.append({"key": req["id"], "value": value, "score": score, "parse_ok": bool(got["parse_ok"]),
                         "failed": bool(got["failed"]), "raw": got.get("raw"), "error": got.get("error") or "",
                         "fields": json.dumps(got.get("fields") or {})})
        return pd.DataFrame(rows)


# ---------------------------------------------------------------- the two passes


def _plain(row: dict) -> dict:
    """Ray Data hands back numpy scalars; parquet, JSON and MLflow want Python ones (NaN as None)."""
    out = {k: v.item() if hasattr(v, "item") else v for k, v in row.items()}
    return {k: None if isinstance(v, float) and v != v else v for k, v in out.items()}


def _generate(cfg: Config, name: str, arm: dict, items: list[dict]) -> list[dict]:
    import ray

    g = cfg.generate
    blocks = max(1, -(-len(items) // g.batch_size))
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ArmGenerator, fn_constructor_kwargs={"cfg": cfg, "arm": arm}, batch_size=g.batch_size,
        batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=min(g.actors, blocks)),
        num_cpus=g.num_cpus_per_actor, num_gpus=g.num_gpus_per_actor or None)
    rows = [{**_plain(r), "arm": name} for r in ds.take_all()]
    if len(rows) != len(items):
        raise RuntimeError(f"evaluate: arm {name} returned {len(rows)} responses for {len(items)} prompts")
    return rows


def _judge(cfg: Config, requests: list[dict]) -> dict[str, dict]:
    """Verdict per request key; a request the pipeline lost comes back failed, never missing."""
    import ray

    from cai_ray.judge.serve import APP_NAME, start_judge, stop_judge

    j = cfg.judge
    per_block = j.max_batch_size * 2
    blocks = max(1, -(-len(requests) // per_block))
    try:
        start_judge(j)  # inside the try: a judge that failed to start is removed as well
        # Scorers only wait on the judge, so they hold no CPU the replicas could use.
        ds = ray.data.from_items(requests, override_num_blocks=blocks).map_batches(
            JudgeScorer, fn_constructor_kwargs={"max_in_flight": j.max_batch_size}, batch_size=per_block,
            batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=min(blocks, 2 * j.replicas)),
            num_cpus=0)
        got = {r["key"]: _plain(r) for r in ds.take_all()}
    finally:
        stop_judge(APP_NAME)
    lost = {"value": None, "score": None, "parse_ok": False, "failed": True, "raw": None,
            "error": "verdict lost in the scoring pipeline", "fields": "{}"}
    return {r["key"]: got.get(r["key"], lost) for r in requests}


def _verdict_rows(cfg: Config, responses: list[dict]) -> list[dict]:
    """One row per (response, rubric): judged, or failed with the reason."""
    requests, rows = [], []
    for r in responses:
        for metric, rubric in rubrics_for(r["kind"], cfg.judge.harm_rubric):
            key = f"{r['arm']}\x1f{r['set']}\x1f{r['id']}\x1f{r['sample']}\x1f{rubric}"
            rows.append({**r, "key": key, "metric": metric, "rubric": rubric})
            if not r["gen_error"]:
                requests.append({"key": key, "rubric": rubric, "request": r["request"],
                                 "response": r["response"], "style": r["style"]})
    verdicts = _judge(cfg, requests) if requests else {}
    failed = {"value": None, "score": None, "parse_ok": False, "failed": True, "raw": None, "fields": "{}"}
    for row in rows:
        row.update(verdicts.get(row["key"]) or {**failed, "error": f"generation failed: {row['gen_error']}"})
    return rows


# ---------------------------------------------------------------- outputs


VERDICT_COLUMNS = [("arm", pa.string()), ("set", pa.string()), ("id", pa.string()), ("sample", pa.int64()),
                   ("prompt", pa.string()), ("response", pa.string()), ("rubric", pa.string()),
                   ("metric", pa.string()), ("style", pa.string()), ("value", pa.float64()),
                   ("score", pa.float64()), ("parse_ok", pa.bool_()), ("failed", pa.bool_()), ("raw", pa.string()),
                   ("error", pa.string()), ("fields", pa.string()), ("garbage", pa.bool_()),
                   ("flags", pa.string()), ("gen_error", pa.string()), ("completion_tokens", pa.int64())]


def _write_outputs(out: Path, rows: list[dict], report: dict):
    """verdicts.parquet, report.json and chart.png, each renamed into place whole; returns the chart."""
    schema = pa.schema(VERDICT_COLUMNS)
    tmp = out / ".verdicts.parquet.tmp"
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema), tmp)
    os.replace(tmp, out / "verdicts.parquet")
    write_atomic(out / "report.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    fig = rep.chart(report)
    fig.savefig(out / ".chart.png.tmp", format="png", dpi=100)
    os.replace(out / ".chart.png.tmp", out / "chart.png")
    return fig


def _log(store: Store, out: Path, rows: list[dict], report: dict, fig) -> None:
    store.set_tags({"stage": "evaluate", "config_hash": out.name})
    store.log_metrics(rep.flat_metrics(report))
    table = {k: [r.get(k) for r in rows] for k, _ in VERDICT_COLUMNS}
    store.log_table(table, "evaluate/verdicts.json")
    store.log_figure(fig, "evaluate/chart.png")
    for name in ("report.json", "config.yaml"):
        store.log_artifact(out / name, "evaluate")


def _summary(report: dict) -> dict:
    """The few lines the CLI prints after the one-screen table."""
    out = {"stage": "evaluate", "output": report["output"], "mlflow_run_id": report.get("mlflow_run_id")}
    for name, arm in report["arms"].items():
        if "asr" in arm["metrics"]:
            out[f"{name}/asr"] = rep.format_entry(arm["metrics"]["asr"], "rate")
    out["unreliable_arms"] = [name for name, arm in report["arms"].items() if arm["problems"]]
    out["invalid_comparisons"] = sum(1 for c in report["comparisons"] if not c["valid"])
    return out


def _header(cfg: Config, report: dict) -> str:
    sets = ", ".join(f"{n} ({s['kind']}, {s['prompts']})" for n, s in report["sets"].items())
    return (f"evaluate: {sets}; k={cfg.evaluate.samples_per_prompt}; judge {cfg.judge.model.path} "
            f"({cfg.judge.model.role}, harm rubric {cfg.judge.harm_rubric})")


def run(cfg: Config, store: Store) -> dict:
    """Held-out check, generation per arm, judging, then the report; a finished config is not redone."""
    from cai_ray.engines.base import resolve_model_path
    from cai_ray.runtime import init_ray

    cfg.require("evaluate")
    items, sets = load_eval_sets(cfg)
    train_checked = check_heldout(cfg, items)
    arms = resolve_arms(cfg)
    resolve_model_path(cfg.judge.model)  # a bad judge path fails here, not after generation
    upstream = (f"few_shot={cfg.generate.few_shot}", json.dumps(asdict(cfg.generate.quality), sort_keys=True),
                *(f"{n}:{a['adapter']}:{a['adapter_sha256']}" for n, a in arms.items()),
                hashlib.sha256("\n".join(sorted(f"{r['set']}:{r['id']}" for r in items)).encode()).hexdigest())
    out = stage_dir(cfg, "evaluate", upstream)
    if (out / "manifest.json").is_file():
        report = json.loads((out / "report.json").read_text())
        print(rep.summary_text(report, _header(cfg, report) + f" (finished earlier: {out})"))
        return _summary(report)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.yaml", to_yaml(cfg))
    k = cfg.evaluate.samples_per_prompt
    work = [{**r, "sample": s, "seed": row_seed(cfg.evaluate.sampling.seed, r["id"], "evaluate", s)}
            for r in items for s in range(k)]
    print(f"evaluate: {len(items)} prompts x {k} samples x {len(arms)} arms -> {out}", flush=True)
    init_ray(cfg)
    responses = [row for name, arm in arms.items() for row in _generate(cfg, name, arm, work)]
    rows = _verdict_rows(cfg, responses)
    e = cfg.evaluate
    report = rep.build_report(rows, arms, e.max_garbage_rate, e.max_parse_failure_rate, e.bootstrap, cfg.seed)
    report.update(stage="evaluate", output=str(out), config_hash=stage_hash(cfg, "evaluate", upstream),
                  sets=sets, train_prompts_checked=train_checked, mlflow_run_id=store.run_id,
                  judge={"model": cfg.judge.model.path, "role": cfg.judge.model.role,
                         "harm_rubric": cfg.judge.harm_rubric},
                  thresholds={"max_garbage_rate": e.max_garbage_rate,
                              "max_parse_failure_rate": e.max_parse_failure_rate})
    _log(store, out, rows, report, _write_outputs(out, rows, report))
    summary = _summary(report)
    write_atomic(out / "manifest.json", json.dumps({**summary, "rows": len(rows)}, indent=2) + "\n")
    print(rep.summary_text(report, _header(cfg, report)), flush=True)
    return summary
