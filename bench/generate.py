"""Throughput of the generate stage against the same engine without Ray, and of vLLM paths.

Run (about 5-9 minutes on 2 idle cores; it builds the tiny model in a temp folder):

    . .venv/bin/activate && python bench/generate.py [--prompts 1024] [--batch-size 32] [--no-vllm]

One run, one tiny Llama, the same prompts (synthetic, >= 1,000) and the same sampling for every
variant: few_shot=1, 2 critique/revision rounds (5 engine calls per chain), temperature 0.9 with
per-row seeds, and min_new_tokens = max_new_tokens, so every completion has the same length and
no variant gets cheaper text by stopping early.  Measured, each as prompts/s and completion tokens/s:

  a2/a1  ``cai-ray generate`` in-process (``stages.generate.run(cfg, NullStore())``) with 2 or 1
         actors of 1 CPU.  "gen" is the stage's own clock (actor start-up included, Ray start-up
         not); "steady" leaves out the first part of every actor, read from the part files' names.
  b2/b1  the same HF engine and ``run_chains`` in this process over the same batches of
         generate.batch_size, with 2 or 1 torch threads.
  c      the predecessors' way: one prompt per call, one call per step (run_chains on batches of 1).
  d      (when ``import vllm`` works) the initial-step prompts only: our ``vllm`` backend called as
         the stage calls it, against ``ray.data.llm``'s vLLM processor, both on identical token ids.

Ratios printed: a2/b2 and a1/b1 (same CPU budget), a2/c, and ours/ray.data.llm for vLLM.
The 1-minute load average is printed with every row: other work on the cores skews the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from cai_ray.runtime import BASE_ENV, LOOPBACK_ENV

STEPS_PER_CHAIN = 5  # initial + 2 x (critique, revision)


def _config(root: Path, model: str, data: Path, args, *extra: str):
    from cai_ray.config import load_config

    return load_config(None, [
        f"model.path={model}", f"output_dir={root}", f"data.source={data}", "engine.device=cpu",
        f"engine.batch_size={args.batch_size}", f"generate.batch_size={args.batch_size}",
        "generate.few_shot=1", "generate.rounds=2", "generate.num_cpus_per_actor=1",
        "generate.sampling.temperature=0.9", f"generate.sampling.max_new_tokens={args.tokens}",
        f"generate.sampling.min_new_tokens={args.tokens}", "generate.max_error_rate=1.0",
        "evaluate.sets=[samples:red_team_eval]", "tracking.enabled=false", "runtime.num_cpus=2",
        "engine.max_lora_rank=0", *extra])


def _write_prompts(path: Path, n: int) -> Path:
    """n distinct prompts built from the shipped training samples (never from eval sets)."""
    from cai_ray.config import DataConfig
    from cai_ray.data.prompts import load_prompts

    base = [r["prompt"] for s in ("samples:red_team", "samples:helpful")
            for r in load_prompts(DataConfig(source=s))]
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"{base[i % len(base)]} (case {i})"}) + "\n")
    return path


def _steady(events: list[tuple[float, int]], skip: int) -> float:
    """Rows per second after the first ``skip`` completion events ((time, rows) pairs), so
    start-up and the first batch of every worker are left out the same way for every variant."""
    events = sorted(events)
    if len(events) <= skip:
        return float("nan")
    rows = sum(n for _, n in events[skip:])
    return rows / max(events[-1][0] - events[skip - 1][0], 1e-9)


def _row(name: str, budget: str, n: int, total: float, tokens: int, startup: float, steady: float,
         load: float) -> dict:
    """One table row; ``total`` is start-up + generation, tokens are completion tokens."""
    per_row = tokens / max(n, 1)
    return {"name": name, "budget": budget, "n": n, "startup": startup, "total": total,
            "pps": n / total, "tps": tokens / total, "steady_pps": steady,
            "steady_tps": steady * per_row, "load": load}


def start_ray(cfg) -> dict:
    """Ray start-up, the thread count Ray gives a 1-CPU worker, and one actor's start-up, each timed."""
    import ray

    from cai_ray.data.actors import RevisionActor
    from cai_ray.runtime import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    ray_start = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    omp = ray.get(ray.remote(num_cpus=1)(lambda: os.environ.get("OMP_NUM_THREADS", "unset")).remote())
    t0 = time.perf_counter()
    actor = ray.remote(num_cpus=1)(RevisionActor).remote(cfg)
    ray.get(actor.__ray_ready__.remote())
    actor_start = time.perf_counter() - t0
    ray.kill(actor)
    return {"ray_start": ray_start, "omp": omp, "actor_start": actor_start}


def bench_stage(cfg, actors: int, actor_start: float) -> tuple[dict, dict]:
    """(a): the stage itself; returns the table row and {id: final} for the agreement check."""
    import pyarrow.parquet as pq

    from cai_ray.stages.generate import run
    from cai_ray.tracking import NullStore

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    summary = run(cfg, NullStore())
    wall = time.perf_counter() - t0
    chains = Path(summary["output"]) / "chains"
    # Part names carry their write time (ns): the stream's timeline with no hook in the stage.
    events = [(int(p.name.split("-")[1]) / 1e9, pq.read_metadata(p).num_rows)
              for p in chains.glob("part-*.parquet")]
    row = _row(f"a{actors}  cai-ray generate (stage)", f"{actors} actor{'s' if actors > 1 else ''} x 1 CPU",
               summary["generated_rows"], summary["seconds"], summary["completion_tokens"],
               actor_start, _steady(events, actors), load)
    row["note"] = f"stage wall {wall:.1f}s incl. prepare+finalize; start-up = one actor, measured alone"
    table = pq.read_table(chains, columns=["id", "final"]).to_pylist()
    return row, {r["id"]: r["final"] for r in table}


def bench_direct(cfg, rows: list[dict], batch: int, threads: int, name: str) -> tuple[dict, dict]:
    """(b) and (c): make_engine + run_chains in this process, batch after batch."""
    import torch

    from cai_ray.constitution import load_constitution
    from cai_ray.constitution.chain import run_chains
    from cai_ray.engines import make_engine

    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    engine = make_engine(cfg.model, cfg.engine)
    constitution = load_constitution(cfg.generate.constitution)
    startup = time.perf_counter() - t0
    g = cfg.generate
    finals, tokens, events = {}, 0, []
    for i in range(0, len(rows), batch):
        out = run_chains(engine, rows[i:i + batch], constitution, g.rounds, g.few_shot, g.sampling, cfg.seed)
        tokens += sum(r["completion_tokens"] for r in out)
        finals.update((r["id"], r["final"]) for r in out)
        events.append((time.perf_counter(), len(out)))
    engine.close()
    budget = f"1 process, {threads} torch thread{'s' if threads > 1 else ''}"
    row = _row(name, budget, len(rows), events[-1][0] - t0, tokens, startup, _steady(events, 1), load)
    return row, finals


def _vllm_inputs(cfg, rows: list[dict]) -> tuple[list[str], list[list[int]], list[int]]:
    """Initial-step prompts, their token ids as our engines make them, and per-row seeds."""
    from cai_ray.constitution import initial_prompt
    from cai_ray.constitution.chain import row_seed
    from cai_ray.engines.base import TokenizedEngine

    texts = [initial_prompt(r["prompt"], cfg.generate.few_shot) for r in rows]
    ids = TokenizedEngine(cfg.model, cfg.engine).encode(texts)
    seeds = [row_seed(cfg.generate.sampling.seed, r["id"], "initial") for r in rows]
    return texts, ids, seeds


def bench_vllm_ours(cfg, texts: list[str], seeds: list[int]) -> dict:
    """(d) ours: VLLMEngine.generate over batches of generate.batch_size, as an actor calls it."""
    from dataclasses import replace

    from cai_ray.constitution import STOP
    from cai_ray.engines import make_engine

    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    engine = make_engine(cfg.model, replace(cfg.engine, backend="vllm"))
    startup = time.perf_counter() - t0
    bs, tokens, events = cfg.generate.batch_size, 0, []
    for i in range(0, len(texts), bs):
        outs = engine.generate(texts[i:i + bs], cfg.generate.sampling, seeds=seeds[i:i + bs], stop=list(STOP))
        tokens += sum(o.completion_tokens for o in outs)
        events.append((time.perf_counter(), len(outs)))
    engine.close()
    return _row("d   our vllm backend (initial step)", "1 process: vLLM CPU", len(texts),
                events[-1][0] - t0, tokens, startup, _steady(events, 1), load)


def bench_ray_llm(cfg, ids: list[list[int]], seeds: list[int]) -> dict:
    """(d') ray.data.llm's vLLM processor on the same token ids and sampling parameters."""
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from cai_ray.constitution import STOP

    s = cfg.generate.sampling
    params = dict(temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens,
                  min_tokens=s.min_new_tokens, stop=list(STOP))
    config = vLLMEngineProcessorConfig(
        model_source=str(Path(cfg.model.path).resolve()), batch_size=cfg.generate.batch_size,
        concurrency=1, chat_template_stage=False, tokenize_stage=False, detokenize_stage=False,
        engine_kwargs=dict(dtype=cfg.model.dtype, enforce_eager=True, enable_prefix_caching=True,
                           max_model_len=2048, seed=0),
        placement_group_config={"bundles": [{"CPU": 1}], "strategy": "PACK"},
        runtime_env={"env_vars": {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1"}})
    processor = build_processor(
        config,
        preprocess=lambda row: dict(tokenized_prompt=row["ids"], sampling_params={**params, "seed": row["seed"]}),
        postprocess=lambda row: dict(n=row["num_generated_tokens"], t=time.time()))
    load = os.getloadavg()[0]
    t0 = time.time()
    ds = ray.data.from_items([{"ids": i, "seed": sd} for i, sd in zip(ids, seeds)])
    out = processor(ds).materialize().to_pandas()
    total = time.time() - t0
    # Rows finish one by one inside the actor; skipping the first batch's worth of rows
    # matches what "steady" leaves out for the other variants.
    bs = cfg.generate.batch_size
    times = sorted(out["t"])
    steady = (len(times) - bs) / max(times[-1] - times[bs - 1], 1e-9) if len(times) > bs else float("nan")
    row = _row("d'  ray.data.llm processor (initial step)", "actor, PG bundle {CPU: 1}", len(times),
               total, int(out["n"].sum()), times[bs - 1] - t0, steady, load)
    row["note"] = "start-up here = until the first batch's rows are out"
    return row


def _fmt(x, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def print_table(rows: list[dict], ratios: list[tuple[str, float, float]], notes: list[str]) -> None:
    head = (f"{'variant':<42} {'CPU budget':<28} {'prompts':>7} {'start s':>7} {'total s':>7} "
            f"{'prompts/s':>9} {'tok/s':>7} {'steady p/s':>10} {'steady tok/s':>12} {'load1':>5}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['name']:<42} {r['budget']:<28} {r['n']:>7} {_fmt(r['startup'], '.1f'):>7} "
              f"{r['total']:>7.1f} {r['pps']:>9.2f} {r['tps']:>7.0f} {_fmt(r['steady_pps'], '.2f'):>10} "
              f"{_fmt(r['steady_tps'], '.0f'):>12} {r['load']:>5.2f}")
    print("\nratio (prompts/s)                          total    steady   target")
    for name, total, steady in ratios:
        target = {"a2/b2": ">= 0.85", "a1/b1": ">= 0.85", "a2/c": ">= 5"}.get(name, "")
        print(f"  {name:<40} {_fmt(total, '6.2f')}   {_fmt(steady, '6.2f')}   {target}")
    for note in notes + [f"{r['name'].split()[0]}: {r['note']}" for r in rows if r.get("note")]:
        print(f"  * {note}")


def _ratio(rows: dict, a: str, b: str) -> tuple[str, float, float]:
    return f"{a}/{b}", rows[a]["pps"] / rows[b]["pps"], rows[a]["steady_pps"] / rows[b]["steady_pps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32, help="generate.batch_size = engine.batch_size")
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens = min_new_tokens")
    parser.add_argument("--c-prompts", type=int, default=None, help="prompts for (c); default: all")
    parser.add_argument("--no-vllm", action="store_true", help="skip (d) even if vllm imports")
    parser.add_argument("--workdir", default=None, help="keep outputs here (default: a temp folder)")
    args = parser.parse_args()
    for key, value in {**BASE_ENV, **LOOPBACK_ENV, "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    import ray

    from cai_ray.tiny import build_tiny

    root = Path(args.workdir or tempfile.mkdtemp(prefix="cai-bench-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model = str(build_tiny(root / "tiny-base", "base"))
    data = _write_prompts(root / "prompts.jsonl", args.prompts)
    cfg2 = _config(root / "a2", model, data, args, "generate.actors=2")
    cfg1 = _config(root / "a1", model, data, args, "generate.actors=1")
    from cai_ray.data.prompts import load_prompts

    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in load_prompts(cfg2.data)]
    print(f"bench: {len(rows)} prompts, batch {args.batch_size}, {args.tokens} tokens/step, "
          f"{STEPS_PER_CHAIN} steps/chain, load {os.getloadavg()} -> {root}", flush=True)
    ray_info = start_ray(cfg2)
    a2, finals_a = bench_stage(cfg2, 2, ray_info["actor_start"])
    a1, _ = bench_stage(cfg1, 1, ray_info["actor_start"])
    ray.shutdown()  # idle Ray daemons would otherwise share the cores with (b) and (c)
    b2, finals_b = bench_direct(cfg2, rows, args.batch_size, 2, "b2  engine direct, same batches")
    b1, _ = bench_direct(cfg2, rows, args.batch_size, 1, "b1  engine direct, same batches")
    c, _ = bench_direct(cfg2, rows[:args.c_prompts], 1, 1, "c   one prompt per call (predecessors)")
    table = {"a2": a2, "a1": a1, "b2": b2, "b1": b1, "c": c}
    ratios = [_ratio(table, "a2", "b2"), _ratio(table, "a1", "b1"), _ratio(table, "a2", "c"),
              _ratio(table, "b1", "c")]
    same = sum(1 for k, v in finals_b.items() if finals_a.get(k) == v)
    notes = [f"Ray start-up (ray.init, not in any row) {ray_info['ray_start']:.1f}s; "
             f"OMP_NUM_THREADS in a 1-CPU Ray worker: {ray_info['omp']}",
             f"a2 and b2 finals identical for {same}/{len(finals_b)} prompts (per-row seeds)",
             "steady = after each worker's first batch; start s = engine/actor start-up"]
    rows_out = [a2, a1, b2, b1, c]
    if not args.no_vllm and _vllm_available():
        from cai_ray.runtime import init_ray

        texts, ids, seeds = _vllm_inputs(cfg2, rows)
        d = bench_vllm_ours(cfg2, texts, seeds)
        init_ray(cfg2)
        d2 = bench_ray_llm(cfg2, ids, seeds)
        ray.shutdown()
        rows_out += [d, d2]
        ratios.append(("ours vllm / ray.data.llm", d["pps"] / d2["pps"], d["steady_pps"] / d2["steady_pps"]))
    else:
        notes.append("(d) skipped: " + ("--no-vllm" if args.no_vllm else "`import vllm` failed"))
    print_table(rows_out, ratios, notes)


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return False
    return True


if __name__ == "__main__":  # vLLM's worker processes re-import this module
    main()
