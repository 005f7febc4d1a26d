"""Our hf decode loop against transformers' ``model.generate`` on the same prompts and model.

Run (about a minute on one quiet core; the tiny models are built in a temp folder):

    . .venv/bin/activate && python bench/hf_decode.py [--prompts 64] [--batch-size 16]
        [--tokens 32] [--min-tokens 0] [--repeats 3] [--threads 1]

Issue 22 item 5 asks whether ``generate`` with ``stop_strings`` and a reused prefix cache gives
the same tokens at a comparable speed.  One run, greedy everywhere, for each tiny model (``base``:
random replies that rarely end; ``terse``: EOS wins as soon as min_new_tokens lets it), the
generate stage's initial-step prompts (generate.few_shot=1, so every prompt starts with the same
few-shot dialogue) and stop strings (``stops_for("initial")``):

  ours        ``HFEngine.generate``: prompts sorted by length into chunks of --batch-size, the
              chunk's shared few-shot prefix run once and its KV repeated per row.
  hf          ``model.generate(stop_strings=..., tokenizer=..., do_sample=False)`` on the same
              chunks, left padded, no cache handed in.
  hf+prefix   as hf, with the prefix every prompt shares run once into a ``DynamicCache`` and a
              ``copy.deepcopy`` of it (repeated per row) handed in as ``past_key_values``: the
              "prefix caching" recipe of the transformers docs.  Rows are laid out as ours are:
              [shared prefix | left padding | own tokens].

A last check on the base model shows one thing generate does differently: for 8 prompts, one row
per call, the stop string is the row's own 2nd-3rd greedy tokens' text and min_new_tokens=8; ours
(like vLLM) looks for stop strings only past min_new_tokens, generate's ``StopStringCriteria`` from
the first token.  It prints how many rows each ended before 8 tokens.

The variants run back to back inside each repeat, so load from other work hits them alike; the
table gives the median of --repeats.  "same tokens" counts rows whose generated token ids equal
ours (generate's trailing pad after a row finished is ignored; any other extra token is a mismatch).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _prompts(n: int) -> list[str]:
    from cai_ray.config import DataConfig
    from cai_ray.constitution.format import initial_prompt
    from cai_ray.data.prompts import load_prompts

    base = [r["prompt"] for s in ("samples:red_team", "samples:helpful") for r in load_prompts(DataConfig(source=s))]
    return [initial_prompt(f"{base[i % len(base)]} (case {i})", 1) for i in range(n)]


def run_ours(engine, prompts: list[str], params, stop: list[str]) -> tuple[float, dict[str, list[int]]]:
    """(seconds, {prompt: generated ids incl. a final EOS}) of one ``HFEngine.generate`` call."""
    caught: dict[str, list[int]] = {}
    finish = type(engine)._finish

    def keep(rows, gen, lengths, params_, stop_):  # the ids behind the returned text
        for row, toks, n in zip(rows, gen, lengths):
            caught[tuple(row)] = toks[:n]
        return finish(engine, rows, gen, lengths, params_, stop_)

    engine._finish = keep
    try:
        start = time.perf_counter()
        engine.generate(prompts, params, stop=stop)
        seconds = time.perf_counter() - start
    finally:
        del engine._finish
    ids = engine.encode(prompts)
    return seconds, {p: caught[tuple(i)] for p, i in zip(prompts, ids)}


def run_hf(engine, prompts: list[str], params, batch: int, stop: list[str], prefix: bool) -> tuple[float, dict[str, list[int]]]:
    """(seconds, {prompt: generated ids}) of ``model.generate`` over the same length-sorted chunks."""
    from transformers import DynamicCache

    model, tok, pad = engine.model, engine.tokenizer, engine.pad_id
    ids = dict(zip(prompts, engine.encode(prompts)))
    order = sorted(prompts, key=lambda p: len(ids[p]))
    out: dict[str, list[int]] = {}
    start = time.perf_counter()
    with torch.inference_mode():
        head_ids, head = [], None
        if prefix:  # the docs' recipe: the shared prefix once, a deep copy per call
            head_ids = os.path.commonprefix([ids[p] for p in prompts])[:min(len(v) for v in ids.values()) - 1]
            head = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([head_ids]), past_key_values=head, use_cache=True)
        for at in range(0, len(order), batch):
            chunk = order[at:at + batch]
            tails = [ids[p][len(head_ids):] for p in chunk]
            width = max(len(t) for t in tails)
            rows = [head_ids + [pad] * (width - len(t)) + t for t in tails]
            mask = [[1] * len(head_ids) + [0] * (width - len(t)) + [1] * len(t) for t in tails]
            cache = None
            if head is not None:
                cache = copy.deepcopy(head)
                cache.batch_repeat_interleave(len(chunk))
            seq = model.generate(input_ids=torch.tensor(rows), attention_mask=torch.tensor(mask),
                                 past_key_values=cache, do_sample=False, max_new_tokens=params.max_new_tokens,
                                 min_new_tokens=params.min_new_tokens or None, stop_strings=stop, tokenizer=tok,
                                 pad_token_id=pad, eos_token_id=engine.eos)
            for p, row in zip(chunk, seq[:, len(rows[0]):].tolist()):
                out[p] = row
    return time.perf_counter() - start, out


def same(ours: list[int], theirs: list[int], pad: int) -> bool:
    n = len(ours)
    return theirs[:n] == ours and all(t == pad for t in theirs[n:])


def floor_check(engine, prompts: list[str], ours: dict[str, list[int]], floor: int = 8) -> tuple[int, int]:
    """Rows that end before ``floor`` tokens under (ours, generate) with ``min_new_tokens=floor`` and a
    stop string the row's own greedy reply holds within its first tokens (its 2nd and 3rd tokens'
    text): vLLM and ours look for stop strings only past min_new_tokens."""
    from cai_ray.config import SamplingConfig

    params = SamplingConfig(temperature=0.0, max_new_tokens=2 * floor, min_new_tokens=floor)
    early = [0, 0]
    for p in prompts:
        word = engine.tokenizer.decode(ours[p][1:3]).strip()
        if not word:
            continue
        mine = engine.generate([p], params, stop=[word])[0]
        _, theirs = run_hf(engine, [p], params, 1, [word], prefix=False)
        early[0] += mine.completion_tokens < floor
        early[1] += sum(t != engine.pad_id for t in theirs[p]) < floor
    return early[0], early[1]


def bench(flavour: str, root: Path, args, floor: int) -> list[dict]:
    from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig
    from cai_ray.constitution.format import stops_for
    from cai_ray.engines.hf import HFEngine
    from cai_ray.tiny import build_tiny

    path = str(build_tiny(root / f"tiny-{flavour}", flavour))
    engine = HFEngine(ModelConfig(path=path), EngineConfig(device="cpu", batch_size=args.batch_size))
    params = SamplingConfig(temperature=0.0, max_new_tokens=args.tokens, min_new_tokens=floor)
    prompts, stop = _prompts(args.prompts), stops_for("initial")
    times: dict[str, list[float]] = {"ours": [], "hf": [], "hf+prefix": []}
    results: dict[str, dict] = {}
    for _ in range(args.repeats):
        seconds, results["ours"] = run_ours(engine, prompts, params, stop)
        times["ours"].append(seconds)
        for name, prefix in (("hf", False), ("hf+prefix", True)):
            seconds, results[name] = run_hf(engine, prompts, params, args.batch_size, stop, prefix)
            times[name].append(seconds)
    ours = results["ours"]
    rows = []
    for name, secs in times.items():
        med = statistics.median(secs)
        tokens = sum(len(ours[p]) for p in prompts)  # the same work for every variant that matches
        match = sum(same(ours[p], results[name][p], engine.pad_id) for p in prompts)
        rows.append({"model": f"{flavour} (min {floor})", "name": name, "s": med, "rows_s": len(prompts) / med,
                     "tok_s": tokens / med, "same": match, "n": len(prompts),
                     "ratio": statistics.median(times["ours"]) / med})
    if flavour == "base":
        subset = prompts[:8]
        rows[0]["early"], rows[1]["early"] = floor_check(engine, subset, ours)
        rows[0]["early_n"] = len(subset)
    engine.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16, help="engine.batch_size, and generate's chunk")
    parser.add_argument("--tokens", type=int, default=32, help="max_new_tokens")
    parser.add_argument("--min-tokens", type=int, default=0, help="min_new_tokens on the base model")
    parser.add_argument("--terse-min-tokens", type=int, default=4,
                        help="min_new_tokens on the terse model (its replies end right there)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine's cores are shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="cai-hf-decode-"))
    load = os.getloadavg()[0]
    rows = bench("base", root, args, args.min_tokens) + bench("terse", root, args, args.terse_min_tokens)
    print(f"\n{args.prompts} initial-step prompts (few_shot=1), batch {args.batch_size}, greedy, "
          f"max_new_tokens {args.tokens}, {args.threads} torch thread(s), "
          f"median of {args.repeats}; load1 {load:.2f} -> {os.getloadavg()[0]:.2f}")
    head = f"{'model':<14} {'variant':<10} {'same tokens':>11} {'median s':>8} {'rows/s':>7} {'tok/s':>7} {'time/ours':>9}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['model']:<14} {r['name']:<10} {r['same']:>5}/{r['n']:<5} {r['s']:>8.2f} {r['rows_s']:>7.1f} "
              f"{r['tok_s']:>7.0f} {1 / r['ratio']:>9.2f}")
    print("time/ours: this variant's median seconds over ours (> 1: ours is faster)")
    base = rows[0]
    print(f"stop string inside min_new_tokens=8 (each row's own 2nd-3rd token text): rows ended before "
          f"8 tokens: ours {base['early']}/{base['early_n']}, generate {rows[1]['early']}/{base['early_n']}")


if __name__ == "__main__":
    main()
