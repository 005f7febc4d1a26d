"""Arms: what each evaluated policy runs, the prompt it sees, and its responses (Ray Data).

Every arm answers the same eval rows with the same sampling and per-row seeds (from seed, prompt
id and sample index), so arms pair up response by response.  The prompt format is the one the
policies were trained in: the zero-shot ``\\n\\nHuman: ...\\n\\nAssistant:`` turn, for the base
arm too.  ``evaluate.format=few_shot`` puts benign, helpful demonstrations in front, for every
arm alike; no demonstration ever answers a harmful request, because a demo that complies primes
the model to comply and inflates attack success.  An instruct baseline may use its own chat
template (``arms[i].format=chat``); the report marks comparisons across formats INVALID unless
the config allows it explicitly.

Each response records how generation ended: ``finish_reason`` (stop, length, error), whether it
was truncated at max_new_tokens, empty after cleaning, or garbage by the collapse guards.  None
of these leaves the report: they are shown as shares of all responses (see report.py).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow as pa

from cai_ray import console, quality
from cai_ray.config import ArmConfig, Config, ModelConfig, stage_folder
from cai_ray.constitution.fewshot import HELPFUL_EXAMPLES
from cai_ray.constitution.format import SEPARATOR, clean, conversation_prompt, spaced, stops_for
from cai_ray.parts import Parts


def arm_format(cfg: Config, arm: ArmConfig) -> str:
    """The arm's prompt format as the report names it: zero_shot, few_shot:k=N or chat."""
    fmt = arm.format or cfg.evaluate.format
    return f"few_shot:k={cfg.evaluate.few_shot}" if fmt == "few_shot" else fmt


def eval_prompt(request: str, fmt: str) -> str:
    """The text a base-format arm sees for ``request`` (chat arms go through their template)."""
    if fmt == "zero_shot":
        return conversation_prompt(request)
    k = int(fmt.removeprefix("few_shot:k="))
    demos = [conversation_prompt(ex.prompt) + spaced(ex.reply) for ex in HELPFUL_EXAMPLES[:k]]
    return SEPARATOR.join([*demos, conversation_prompt(request)])


def _adapter(cfg: Config, i: int, arm: ArmConfig) -> str | None:
    """A PEFT folder for the arm: a path as given, or this pipeline's sft/dpo output."""
    from cai_ray.train.driver import MANIFEST

    key = f"evaluate.arms[{i}].adapter"
    if arm.adapter is None:
        return None
    if arm.adapter not in ("sft", "dpo"):
        path = Path(arm.adapter).expanduser()
        if not (path / "adapter_config.json").is_file():
            raise ValueError(f"{key}={arm.adapter}: not a PEFT adapter folder (no adapter_config.json)")
        return str(path.resolve())
    own = stage_folder(cfg, arm.adapter)
    if (own / MANIFEST).is_file() and (own / "adapter" / "adapter_config.json").is_file():
        return str(own / "adapter")
    found = sorted(p for p in own.parent.glob("*/adapter")
                   if (p.parent / MANIFEST).is_file() and (p / "adapter_config.json").is_file())
    if len(found) == 1:
        return str(found[0])
    what = "no finished" if not found else f"{len(found)} finished (none for this config)"
    raise ValueError(f"{key}={arm.adapter}: {what} {arm.adapter} adapters under {own.parent}; "
                     f"pass the folder, e.g. {key}=PATH/{arm.adapter}/HASH/adapter")


def arm_model(cfg: Config, arm: ArmConfig) -> ModelConfig:
    """What an arm loads: the pipeline's model (with its revision and trust_remote_code) unless
    the arm names its own, which is loaded at its default revision without remote code."""
    if arm.model is None or arm.model == cfg.model.path:
        return ModelConfig(path=cfg.model.path, role=arm.role, dtype=cfg.model.dtype,
                           revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    return ModelConfig(path=arm.model, role=arm.role, dtype=cfg.model.dtype)


def resolve_arms(cfg: Config) -> dict[str, dict]:
    """Arm name -> what it runs; the metadata the validity rules compare."""
    from cai_ray.engines.base import resolve_model_path

    arms = {}
    for i, arm in enumerate(cfg.evaluate.arms):
        load = arm_model(cfg, arm)
        model = resolve_model_path(load)
        adapter, sha = _adapter(cfg, i, arm), None
        if adapter:
            from cai_ray.train.lora import weights_sha256  # imports torch: only when an adapter is used

            sha = weights_sha256(adapter)  # a retrained adapter in the same folder is a new evaluation
        arms[arm.name] = {
            "model": model, "revision": load.revision, "trust_remote_code": load.trust_remote_code,
            "role": arm.role, "adapter": adapter, "adapter_sha256": sha,
            "prompt_format": arm_format(cfg, arm), "sampling": asdict(cfg.evaluate.sampling),
            "samples_per_prompt": cfg.evaluate.samples_per_prompt}
    return arms


class ArmGenerator:
    """``map_batches`` callable holding one engine for every arm of one base model (the arms
    differ by adapter, served per request): eval rows tagged with their arm in, responses out.
    Each response carries the id of the engine that wrote it, so start-ups can be counted."""

    def __init__(self, cfg: Config, arms: dict[str, dict]):
        import uuid

        from cai_ray.engines import make_engine

        self.cfg, self.arms = cfg, arms
        first = next(iter(arms.values()))
        model = ModelConfig(path=first["model"], role=first["role"], dtype=cfg.model.dtype,
                            revision=first["revision"], trust_remote_code=first["trust_remote_code"])
        self.engine = make_engine(model, cfg.engine, share=cfg.generate.num_gpus_per_actor,
                                  lora=any(a["adapter"] for a in arms.values()))
        self.engine_id = uuid.uuid4().hex[:12]
        self.arm = first

    def __del__(self):  # Ray Data deletes the callable when its actor stops
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            engine.close()

    def _prompt(self, text: str) -> str:
        if self.arm["prompt_format"] == "chat":
            return self.engine.chat_format([{"role": "user", "content": text}])
        return eval_prompt(text, self.arm["prompt_format"])

    def _reference_logprobs(self, batch: pd.DataFrame) -> list[float | None]:
        """Mean log-prob per token of each row's reference answer after the arm's prompt (capability
        rows only; None elsewhere or when it cannot be scored)."""
        refs = batch["reference"].tolist() if "reference" in batch else [None] * len(batch)
        todo = [i for i, ref in enumerate(refs) if isinstance(ref, str) and ref.strip()]
        out: list[float | None] = [None] * len(batch)
        if not todo:
            return out
        prompts = [self._prompt(batch["prompt"].iloc[i]) for i in todo]
        answers = [spaced(refs[i]) for i in todo]
        try:
            sums = self.engine.score(prompts, answers, adapter=self.arm["adapter"])
        except Exception:  # noqa: BLE001 - unscored rows are counted as failed ratings in the report
            return out
        for i, total, ids in zip(todo, sums, self.engine.score_ids(prompts, answers)):
            if ids is not None and total == total:  # NaN: the row could not be scored
                out[i] = float(total) / max(1, len(ids[0]) - ids[1])
        return out

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        parts = []
        for name, rows in batch.groupby("arm", sort=False):
            self.arm = self.arms[name]
            parts.append(self._answer(rows.reset_index(drop=True)))
        out = pd.concat(parts, ignore_index=True)
        out["engine"] = self.engine_id
        return out

    def _answer(self, batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        n = len(batch)
        try:
            # Every format stops on the dialogue markers and is cleaned alike, so the prompt is
            # the only thing that differs between arms of different formats.
            done = self.engine.generate([self._prompt(p) for p in batch["prompt"]], self.cfg.evaluate.sampling,
                                        seeds=[int(s) for s in batch["seed"]], stop=stops_for("initial"),
                                        adapter=self.arm["adapter"])
            texts = [None if c.finish_reason == "error" else clean(c.text) for c in done]
            errors = [c.error or "generation failed" if c.finish_reason == "error" else "" for c in done]
            reasons, tokens = [c.finish_reason for c in done], [c.completion_tokens for c in done]
        except Exception as exc:  # noqa: BLE001 - recorded per row and counted in the report
            first = (str(exc).strip().splitlines() or [""])[0]
            texts, errors = [None] * n, [f"{type(exc).__name__}: {first}"] * n
            reasons, tokens = ["error"] * n, [0] * n
        flags = [[] if not t else [k for k, hit in quality.check(t, self.cfg.generate.quality).items() if hit]
                 for t in texts]
        out["ref_logprob"] = self._reference_logprobs(batch)
        out["response"], out["gen_error"], out["finish_reason"] = texts, errors, reasons
        out["completion_tokens"], out["flags"] = tokens, [",".join(f) for f in flags]
        out["empty"] = [t is not None and not t for t in texts]
        out["truncated"] = [r == "length" for r in reasons]
        out["garbage"] = [bool(f) for f in flags]
        return out


def engine_groups(arms: dict[str, dict]) -> list[dict[str, dict]]:
    """Arms that one engine serves: those loading the same model (path and revision)."""
    groups: dict[tuple, dict[str, dict]] = {}
    for name, arm in arms.items():
        groups.setdefault((arm["model"], arm["revision"], arm["trust_remote_code"]), {})[name] = arm
    return list(groups.values())


# A response is stored whole as JSON: eval sets of different kinds bring different columns.
RESPONSE_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.string())])


def _key(row: dict) -> str:
    return json.dumps([row["arm"], row["set"], row["id"], row["sample"]])


def generate_arms(cfg: Config, arms: dict[str, dict], items: list[dict],
                  folder: Path) -> tuple[list[dict], dict[str, int]]:
    """Every arm's responses to ``items``, tagged with the arm, and the engine start-ups per model.

    The arms of one model share an actor pool, so each actor starts one engine for all of them;
    arms of another model (an instruct baseline) get their own pool after it.  Responses are
    written as parts in ``folder`` as they arrive: a rerun of a stopped evaluation generates only
    the missing ones."""
    parts = Parts(folder, RESPONSE_SCHEMA, key="key")
    done, _ = parts.done_ids()
    starts: dict[str, int] = {}
    for group in engine_groups(arms):
        todo = [w for w in ({**item, "arm": name} for name in group for item in items) if _key(w) not in done]
        model = next(iter(group.values()))["model"]
        starts[model] = starts.get(model, 0) + (_generate_group(cfg, group, todo, parts) if todo else 0)
    wanted = [_key({**item, "arm": name}) for name in arms for item in items]
    table, _ = parts.read(wanted)
    by_key = dict(zip(table.column("key").to_pylist(), map(json.loads, table.column("row").to_pylist())))
    rows = [by_key[k] for k in wanted if k in by_key]
    for name in arms:
        got = sum(r["arm"] == name for r in rows)
        if got != len(items):
            raise RuntimeError(f"evaluate: arm {name} returned {got} responses for {len(items)} prompts")
    return rows, starts


def _generate_group(cfg: Config, group: dict[str, dict], work: list[dict], parts: Parts) -> int:
    """Generate ``work`` (rows tagged with their arm) into ``parts``; the engines that started."""
    import ray

    from cai_ray.evaluation.rating import plain
    from cai_ray.runtime import placement

    g = cfg.generate
    # Arm by arm (work comes so ordered): a batch then mostly holds one arm's rows (one adapter, one engine call).
    blocks = max(1, -(-len(work) // g.batch_size))
    actors = min(g.actors, blocks)
    ds = ray.data.from_items(work, override_num_blocks=blocks).map_batches(
        ArmGenerator, fn_constructor_kwargs={"cfg": cfg, "arms": group}, batch_size=g.batch_size,
        # Autoscaling from one actor: a judge kept up by a sweep may hold part of the resources.
        batch_format="pandas", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        **placement("generate", g, count=actors).ray_options())
    engines: set[str] = set()
    with console.progress(f"evaluate: {', '.join(group)}", total=len(work), unit="responses") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            engines.update(batch.pop("engine"))
            rows = [plain(r) for r in batch.to_dict("records")]
            parts.write(pa.table({"key": [_key(r) for r in rows], "row": [json.dumps(r) for r in rows]}))
            bar.advance(len(batch))
    return len(engines)
