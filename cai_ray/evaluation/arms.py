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

from dataclasses import asdict
from pathlib import Path

import pandas as pd

from cai_ray import console, quality
from cai_ray.config import ArmConfig, Config, ModelConfig
from cai_ray.constitution.fewshot import HELPFUL_EXAMPLES
from cai_ray.constitution.format import SEPARATOR, clean, conversation_prompt, spaced, stops_for


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
            "model": model, "role": arm.role, "adapter": adapter, "adapter_sha256": sha,
            "prompt_format": arm_format(cfg, arm), "sampling": asdict(cfg.evaluate.sampling),
            "samples_per_prompt": cfg.evaluate.samples_per_prompt}
    return arms


class ArmGenerator:
    """``map_batches`` callable holding one arm's engine: eval rows in, responses out."""

    def __init__(self, cfg: Config, arm: dict):
        from cai_ray.engines import make_engine

        self.cfg, self.arm = cfg, arm
        model = ModelConfig(path=arm["model"], role=arm["role"], dtype=cfg.model.dtype)
        self.engine = make_engine(model, cfg.engine)

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


def generate_arm(cfg: Config, name: str, arm: dict, items: list[dict]) -> list[dict]:
    """One arm's responses to ``items`` on an actor pool, in any order, each tagged with the arm."""
    import ray

    from cai_ray.evaluation.rating import plain
    from cai_ray.runtime import placement

    g = cfg.generate
    blocks = max(1, -(-len(items) // g.batch_size))
    actors = min(g.actors, blocks)
    ds = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ArmGenerator, fn_constructor_kwargs={"cfg": cfg, "arm": arm}, batch_size=g.batch_size,
        # Autoscaling from one actor: a judge kept up by a sweep may hold part of the resources.
        batch_format="pandas", compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        **placement("generate", g, count=actors).ray_options())
    rows: list[dict] = []
    with console.progress(f"evaluate: {name}", total=len(items), unit="responses") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
            rows += [{**plain(r), "arm": name} for r in batch.to_dict("records")]
            bar.advance(len(batch))
    if len(rows) != len(items):
        raise RuntimeError(f"evaluate: arm {name} returned {len(rows)} responses for {len(items)} prompts")
    return rows
