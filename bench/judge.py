"""Judge throughput: Serve, batching across requests, against the same judge one request at a time.

Same tiny chat judge, same engine settings, same prompts (the shipped red-team
eval set with a fixed reply, StrongREJECT rubric, chat template) in every row:

  engine direct, 1 at a time   make_engine in this process, one generate() per request,
                               torch limited to the replica's CPU count: the baseline
  Serve HTTP, 1 at a time      the deployment over HTTP, sequential requests
  Serve HTTP, N concurrent     the same deployment, N client threads: requests batch
                               (hf: merged into the engine's next call; vLLM: continuously)
  JudgeClient (handle)         cai_ray.judge.client over a DeploymentHandle, as evaluate uses it
  engine direct, batches       the engine fed full batches in-process: the batched ceiling
                               that "vs ceiling" divides by
  engine direct, all in one    every request in one generate() call, for reference

Each backend's engine runs in the replica (vLLM: its engine process beside it).  The load
average is printed: the machine's other work moves every row, so compare rows of one run.

Run:  python bench/judge.py [--requests 120] [--concurrency 32] [--max-new-tokens 64] [--backend hf|vllm]

Flood (``--flood``): ``--requests`` (e.g. 2000) rows through ``JudgeClient`` over HTTP at each of
``--flood-levels`` client concurrencies, against a judge whose queue holds ``--max-queued`` requests:
past it Serve answers 503 and the client retries with backoff.  Per level: wall time, rows/s,
p50/p99 of a row's latency (its retries included), 503s answered, rows lost, ids seen twice.

      python bench/judge.py --flood --requests 2000 --flood-levels 64,128,256 --max-new-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _timed(fn, rows: list[dict], concurrency: int) -> tuple[float, list[float]]:
    """Wall time for all rows and each row's own latency."""
    def one(row):
        start = time.perf_counter()
        fn(row)
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, rows))
    return time.perf_counter() - start, latencies


def _post(url: str, row: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(row).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as reply:
        return json.loads(reply.read())


def _setup(args, root: Path):
    from cai_ray.config import load_config
    from cai_ray.runtime import init_ray
    from cai_ray.tiny import build_tiny

    model = build_tiny(root / "tiny-chat", "chat")
    cfg = load_config(None, [
        f"model.path={model}", f"output_dir={root / 'out'}", "runtime.num_cpus=2", "tracking.enabled=false",
        f"judge.model.path={model}", "judge.model.role=instruct", f"judge.port={args.port}",
        "judge.num_cpus=1", f"judge.engine.batch_size={args.batch}",
        f"judge.sampling.max_new_tokens={args.max_new_tokens}", f"judge.engine.backend={args.backend}",
        "judge.engine.max_lora_rank=0"])
    init_ray(cfg)
    return cfg


def _measure(args, judge) -> tuple[list[tuple], list[dict]]:
    """One row per mode: (name, wall s, req/s, p50 s, p95 s); and the client's scored rows."""
    import torch

    from cai_ray.config import DataConfig
    from cai_ray.data.prompts import load_prompts
    from cai_ray.engines import make_engine
    from cai_ray.judge.client import JudgeClient
    from cai_ray.judge.rubrics import RUBRICS
    from cai_ray.judge.serve import start_judge

    prompts = [r["prompt"] for r in load_prompts(DataConfig(source="samples:red_team_eval", dedupe=False))]
    reply = "I would rather not help with that, but here is something else you could try instead."
    rows = [{"rubric": "strongreject_paraphrase", "prompt": prompts[i % len(prompts)], "response": reply, "id": str(i)}
            for i in range(args.requests)]
    # The baseline gets the compute a replica gets (judge.num_cpus threads).
    torch.set_num_threads(max(1, int(judge.num_cpus)))
    engine = make_engine(judge.model, judge.engine)
    rubric = RUBRICS["strongreject_paraphrase"]

    def direct(*batch):
        texts = [engine.chat_format(rubric.messages(row["prompt"], row["response"])) for row in batch]
        for done in engine.generate(texts, judge.sampling):
            rubric.parse(done.text)

    url = start_judge(judge)
    client = JudgeClient(max_in_flight=args.concurrency)
    direct(rows[0])  # warm-up: first calls pay for lazy initialisation
    _post(url, rows[0])
    client.score(rows[:2])
    table = []
    for name, fn, conc in (("engine direct, 1 at a time", direct, 1),
                           ("Serve HTTP, 1 at a time", lambda row: _post(url, row), 1),
                           (f"Serve HTTP, {args.concurrency} concurrent", lambda row: _post(url, row),
                            args.concurrency)):
        wall, lat = _timed(fn, rows, conc)
        table.append((name, wall, args.requests / wall, statistics.median(lat), _percentile(lat, 0.95)))
    start = time.perf_counter()
    scored = client.score(rows)
    wall = time.perf_counter() - start
    table.append((f"JudgeClient handle, {args.concurrency} in flight", wall, args.requests / wall,
                  None, None))
    # The engine's own batched speed: the most that batching can give on this hardware.
    start = time.perf_counter()
    for i in range(0, len(rows), args.batch):
        direct(*rows[i:i + args.batch])
    wall = time.perf_counter() - start
    table.append((f"engine direct, batches of {args.batch} (ceiling)", wall, args.requests / wall,
                  None, None))
    # For reference: every request in one call (vLLM schedules them all at once, hf in chunks).
    start = time.perf_counter()
    direct(*rows)
    wall = time.perf_counter() - start
    table.append((f"engine direct, all {args.requests} in one call", wall, args.requests / wall, None, None))
    engine.close()
    return table, scored


def _flood(args, judge) -> list[tuple]:
    """(concurrency, wall s, rows/s, p50 s, p99 s, 503s, lost, doubled) per flood level."""
    from collections import Counter

    from cai_ray.judge.client import JudgeClient
    from cai_ray.judge.serve import start_judge

    url = start_judge(judge)
    statuses: Counter = Counter()

    class Counting(JudgeClient):
        def _send(self, payload):
            body = super()._send(payload)
            statuses[body.get("status", 200)] += 1
            return body

    reply = "I would rather not help with that."
    table = []
    for level in args.flood_levels:
        rows = [{"rubric": "harmful", "prompt": f"flood request {i}", "response": reply, "id": f"{level}-{i}"}
                for i in range(args.requests)]
        client = Counting(url=url, max_in_flight=level, backoff_s=0.2, retries=12)
        client.score_one({**rows[0], "id": "warm-up"})  # first calls pay for lazy initialisation
        statuses.clear()
        got: list[dict] = []
        wall, lat = _timed(lambda row: got.append(client.score_one(row)), rows, level)
        ids = Counter(r["id"] for r in got if not r["failed"])
        lost = len(rows) - len(ids)
        doubled = sum(n > 1 for n in ids.values())
        table.append((level, wall, len(rows) / wall, statistics.median(lat), _percentile(lat, 0.99),
                      statuses[503], lost, doubled))
    return table


def _print_flood(args, judge, table) -> None:
    print(f"\njudge flood: tiny chat judge ({args.backend}), {args.requests} requests per level over HTTP "
          f"through JudgeClient, {judge.replicas} replica(s) x {judge.num_cpus:g} CPU, "
          f"judge.max_ongoing_requests={judge.max_ongoing_requests}, "
          f"judge.max_queued_requests={judge.max_queued_requests}, max_new_tokens={args.max_new_tokens}, "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'concurrent':>10}{'wall s':>8}{'rows/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'503s':>7}{'lost':>6}"
          f"{'twice':>7}")
    for level, wall, rps, p50, p99, refused, lost, doubled in table:
        print(f"{level:>10}{wall:>8.1f}{rps:>8.1f}{p50 * 1000:>9.0f}{p99 * 1000:>9.0f}{refused:>7}{lost:>6}"
              f"{doubled:>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16,
                        help="judge.engine.batch_size and the ceiling's batch size")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the judge config's default")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--port", type=int, default=18431)
    parser.add_argument("--flood", action="store_true", help="the back-pressure flood instead (see above)")
    parser.add_argument("--flood-levels", type=lambda text: [int(x) for x in text.split(",")],
                        default=[64, 128, 256], help="client concurrencies, comma-separated")
    parser.add_argument("--max-queued", type=int, default=32, help="judge.max_queued_requests for --flood")
    parser.add_argument("--replicas", type=int, default=1)
    args = parser.parse_args()
    # Ray first: init_ray sets the loopback environment before anything imports ray.
    judge = _setup(args, Path(tempfile.mkdtemp(prefix="cai-bench-judge-"))).judge
    from ray import serve

    if args.flood:
        judge.max_queued_requests, judge.max_ongoing_requests = args.max_queued, args.batch
        judge.replicas = args.replicas
        try:
            _print_flood(args, judge, _flood(args, judge))
        finally:
            serve.shutdown()
        return

    try:
        table, scored = _measure(args, judge)
    finally:
        serve.shutdown()
    direct_rps, serve_rps, ceiling_rps = table[0][2], table[1][2], table[-2][2]
    print(f"\njudge bench: tiny chat judge ({args.backend}), {args.requests} requests, greedy, "
          f"max_new_tokens={args.max_new_tokens}, engine batch_size={args.batch}, "
          f"1 replica x {judge.num_cpus:g} CPU, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"{'mode':<40}{'wall s':>7}{'req/s':>8}{'p50 ms':>8}{'p95 ms':>8}"
          f"{'vs direct':>10}{'vs Serve 1x1':>13}{'vs ceiling':>11}")
    for name, wall, rps, p50, p95 in table:
        cells = "".join(f"{x * 1000:>8.0f}" if x is not None else f"{'-':>8}" for x in (p50, p95))
        ratios = f"{rps / direct_rps:>9.1f}x{rps / serve_rps:>12.1f}x{rps / ceiling_rps:>10.2f}x"
        print(f"{name:<40}{wall:>7.2f}{rps:>8.1f}{cells}{ratios}")
    print(f"target: Serve HTTP, {args.concurrency} concurrent >= 0.80x the ceiling")
    failed = sum(r["failed"] for r in scored)
    parsed = sum(r["parse_ok"] for r in scored)
    print(f"client rows: {len(scored)} returned, {failed} failed, {parsed} parsed "
          f"(a random tiny judge is not expected to answer in format)")


if __name__ == "__main__":
    main()
