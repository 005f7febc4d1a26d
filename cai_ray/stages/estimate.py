"""Tokens, device-hours and cost of generate, train and evaluate at the configured scale.

By default nothing runs a model: token counts come from the prompt builders and
the tokenizer, throughputs from ``estimate``, so a GPU config can be estimated
on a laptop.  With ``estimate.calibrate=true`` generation is measured instead:
one Ray task with the generation resources (on the cluster when attached, e.g.
via ``cai-ray submit --command estimate``) runs the real chain on one actor batch
(``generate.batch_size`` prompts), giving the tokens per prompt and the
throughput of one actor at the configured batch size.
"""

from __future__ import annotations

import time

from cai_ray.config import Config, DataConfig
from cai_ray.constitution import load_constitution
from cai_ray.constitution.chain import run_chains
from cai_ray.data.prompts import load_prompts
from cai_ray.tracking import Store

# A judge prompt is the rubric (about 400 tokens with the tiny tokenizer) plus the exchange.
JUDGE_PROMPT_TOKENS = 400


def _calibrate(cfg: Config, prompts: list[dict]) -> dict:
    """One Ray task placed like a generation actor runs the measurement."""
    import ray

    from cai_ray.runtime import init_ray, placement

    init_ray(cfg)
    options = placement("generate", cfg.generate, count=1).ray_options()
    n = cfg.estimate.calibration_prompts or cfg.generate.batch_size
    return ray.get(ray.remote(_measure).options(**options).remote(cfg, prompts[:n]))


def _measure(cfg: Config, sample: list[dict]) -> dict:
    """Run the chain on ``sample`` with the configured engine: tokens per prompt and speed."""
    from cai_ray.engines import make_engine

    # On a GPU the vLLM engine starts its core with spawn (engines/vllm.py): this is a Ray
    # task, not an actor, and CUDA has been asked for its devices by then.
    engine = make_engine(cfg.model, cfg.engine, lora=False, share=cfg.generate.num_gpus_per_actor)
    g = cfg.generate
    constitution = load_constitution(g.constitution)
    # warm-up: first-call costs are not throughput
    run_chains(engine, sample[:1], constitution, g.rounds, g.few_shot, g.sampling, cfg.seed)
    start = time.perf_counter()
    rows = run_chains(engine, sample, constitution, g.rounds, g.few_shot, g.sampling, cfg.seed)
    seconds = time.perf_counter() - start
    engine.close()
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    return {"prompt_tokens": sum(r["prompt_tokens"] for r in rows) / len(rows),
            "completion_tokens": sum(r["completion_tokens"] for r in rows) / len(rows),
            "tokens_per_s": tokens / seconds, "calibrated_on": len(rows)}


def _uncalibrated(cfg: Config, prompts: list[dict]) -> dict:
    """Upper-bound token counts from the prompt builders, without running a model."""
    from cai_ray.constitution import critique_prompt, initial_prompt, revision_prompt
    from cai_ray.engines.base import load_tokenizer, resolve_model_path

    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    g, n_new = cfg.generate, cfg.generate.sampling.max_new_tokens
    filler = " ".join(["word"] * n_new)  # a reply of max_new_tokens words stands in for the model's
    principle = load_constitution(g.constitution).principles[0]
    sample = prompts[:64]
    per_prompt = 0.0
    for row in sample:
        texts = [initial_prompt(row["prompt"], g.few_shot)]
        texts += [critique_prompt(row["prompt"], filler, principle, g.few_shot),
                  revision_prompt(row["prompt"], filler, principle, filler, g.few_shot)] * g.rounds
        per_prompt += sum(len(tok(t).input_ids) for t in texts)
    return {"prompt_tokens": per_prompt / len(sample), "completion_tokens": n_new * (1 + 2 * g.rounds),
            "tokens_per_s": cfg.estimate.generate_tokens_per_s, "calibrated_on": 0}


def _row_tokens(cfg: Config, prompts: list[dict], gen: dict) -> float:
    """Tokens of one training row: the formatted conversation (no few-shot prefix) and one reply."""
    from cai_ray.constitution import conversation_prompt
    from cai_ray.engines.base import load_tokenizer, resolve_model_path

    tok = load_tokenizer(cfg.model, resolve_model_path(cfg.model))
    sample = prompts[:64]
    prompt = sum(len(tok(conversation_prompt(r["prompt"])).input_ids) for r in sample) / len(sample)
    return prompt + gen["completion_tokens"] / (1 + 2 * cfg.generate.rounds)


def _rows(cfg: Config, gen: dict, n_prompts: int, eval_prompts: int, row_tokens: float) -> list[dict]:
    e, g = cfg.estimate, cfg.generate
    devices_per_actor = g.num_gpus_per_actor or g.num_cpus_per_actor
    gen_tokens = n_prompts * (gen["prompt_tokens"] + gen["completion_tokens"])
    # DPO reads chosen and rejected rows, plus one frozen reference pass: about 1.5x the
    # tokens of a policy pass over both.
    sft_tokens = n_prompts * row_tokens * cfg.sft.epochs
    dpo_tokens = n_prompts * 2 * row_tokens * 1.5 * cfg.dpo.epochs
    samples = eval_prompts * len(cfg.evaluate.arms) * cfg.evaluate.samples_per_prompt
    eval_tokens = samples * (row_tokens + JUDGE_PROMPT_TOKENS + cfg.judge.sampling.max_new_tokens)
    out = []
    for stage, tokens, speed, per_worker in (
            ("generate", gen_tokens, gen["tokens_per_s"], devices_per_actor),
            ("sft", sft_tokens, e.train_tokens_per_s, 1.0),
            ("dpo", dpo_tokens, e.train_tokens_per_s, 1.0),
            ("evaluate", eval_tokens, e.judge_tokens_per_s, 1.0)):
        hours = tokens / speed / 3600 * per_worker
        out.append({"stage": stage, "tokens": tokens, "tokens_per_s_per_device": speed,
                    "device_hours": hours, "cost": hours * e.device_hour_cost})
    return out


def _table(rows: list[dict], note: str) -> str:
    lines = [f"{'stage':<9} {'tokens':>14} {'tok/s/device':>13} {'device-h':>10} {'cost':>10}"]
    for r in rows:
        lines.append(f"{r['stage']:<9} {r['tokens']:>14,.0f} {r['tokens_per_s_per_device']:>13,.0f} "
                     f"{r['device_hours']:>10.2f} {r['cost']:>10.2f}")
    total_h, total_c = sum(r["device_hours"] for r in rows), sum(r["cost"] for r in rows)
    lines.append(f"{'total':<9} {sum(r['tokens'] for r in rows):>14,.0f} {'':>13} {total_h:>10.2f} {total_c:>10.2f}")
    return "\n".join(lines + [note])


def run(cfg: Config, store: Store) -> dict:
    prompts = load_prompts(cfg.data)
    n_prompts = cfg.estimate.prompts or len(prompts)
    eval_prompts = sum(len(load_prompts(DataConfig(source=s.source))) for s in cfg.evaluate.sets)
    gen = _calibrate(cfg, prompts) if cfg.estimate.calibrate else _uncalibrated(cfg, prompts)
    rows = _rows(cfg, gen, n_prompts, eval_prompts, _row_tokens(cfg, prompts, gen))
    how = (f"generation measured on {gen['calibrated_on']} prompts with engine.backend={cfg.engine.backend}"
           if gen["calibrated_on"] else "generation from estimate.generate_tokens_per_s (not measured)")
    print(_table(rows, f"{n_prompts:,} prompts, {cfg.generate.rounds} rounds, {eval_prompts} eval prompts; "
                       f"{how}; training and judging from estimate.*_tokens_per_s"))
    store.log_metrics({f"{r['stage']}/{k}": r[k] for r in rows for k in ("tokens", "device_hours", "cost")})
    store.log_table({k: [r[k] for r in rows] for k in rows[0]}, "estimate.json")
    return {"prompts": n_prompts, "device_hours": round(sum(r["device_hours"] for r in rows), 3),
            "cost": round(sum(r["cost"] for r in rows), 2), "generate_tokens_per_prompt":
                round(gen["prompt_tokens"] + gen["completion_tokens"], 1)}
