"""DPO training throughput: our per-step loop against TRL's DPOTrainer, and Ray Train's fixed start-up.

Same tiny model, same pairs, same LoRA (r, alpha, dropout, targets), batch size,
steps, learning rate and beta in both, in this one process, on CPU:

  ours (DeepSpeed ZeRO-N, 1 rank)  cai_ray.train.loops: reference log-probs once, then
                                   train_step per step, through a 1-rank DeepSpeed engine
  TRL DPOTrainer                   trl 1.16 with peft_config (reference = adapter disabled)

Both see every pair the same number of times (steps * batch is a multiple of the
pair count), so both process the same tokens; tokens/s = those tokens / wall
time of training (model loading and tokenisation excluded, our reference pass
included).  Rounds alternate ours/TRL to share the machine's noise; the best
round of each is reported.  Then a 2-worker Ray Train SFT run measures the time
from fit() to the end of the first step, and the whole run.

First, memory: DPO steps at max_length 1024 on the tiny Llama shape with Llama
3's 128,256-token vocabulary (random token ids, a quarter of each row prompt),
through the same 1-rank DeepSpeed path, each variant in a fresh process:

  per-row log-probs (before)   the implementation this project had before chunking,
                               copied here for comparison only
  chunked log-probs            cai_ray.train.losses.sequence_logps
  chunked + checkpointing      the same with train.gradient_checkpointing=true

Peak = the process's peak RSS (ru_maxrss); "step" = that peak minus the RSS
just before the reference pass (model and DeepSpeed engine loaded).  Losses and
the first step's gradient norm are compared with the per-row variant's.

Run:  python bench/train.py [--steps 40] [--batch 8] [--rounds 2] [--memory-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAIRS = [
    ("how do I boil an egg?", "Boil it for eight minutes, then cool it in cold water.", "No."),
    ("name a colour", "Blue is a colour, and so is green.", "I will not answer that question."),
    ("what is two plus two?", "Two plus two is four.", "Five, probably, or maybe seven."),
    ("say hello", "Hello there, friend! How can I help you today?", "Go away."),
]


def _rows(n: int) -> list[dict]:
    base = [{"prompt": f"\n\nHuman: {p}\n\nAssistant:", "chosen": f" {c}", "rejected": f" {r}"} for p, c, r in PAIRS]
    return (base * (n // len(base) + 1))[:n]


def _single_process_group() -> None:
    """A 1-rank gloo group for DeepSpeed, set up without RANK/WORLD_SIZE in the environment:
    with those set, accelerate would wrap TRL's model in DDP."""
    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def run_ours(cfg, model_path: str, rows: list[dict], steps: int) -> tuple[float, float, float]:
    """(seconds, tokens, mean loss) for the reference pass + ``steps`` optimizer steps of our loop."""
    import torch

    from cai_ray.train.data import Schedule, tokenize
    from cai_ray.train.deepspeed import start_engine
    from cai_ray.train.lora import load_policy, load_tokenizer
    from cai_ray.train.loops import Job, reference_logps, train_step

    tok = load_tokenizer(cfg.model, model_path)
    data = tokenize(tok, rows, "dpo", cfg.train.max_length)
    torch.manual_seed(cfg.seed)
    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed insists; left set, accelerate would make TRL use DDP
    try:
        engine = start_engine(load_policy(cfg.model, model_path, cfg.train.lora), cfg.train, cfg.dpo.lr, steps)
    finally:
        del os.environ["LOCAL_RANK"]
    job = Job(kind="dpo", cfg=cfg, model_path=model_path, data=None, total_steps=steps, pad_id=tok.pad_token_id,
              lr=cfg.dpo.lr, start=None, store=None, fail_once=None)
    schedule = Schedule(len(data), cfg.train.batch_size, 1, 1, cfg.seed)
    start = time.perf_counter()
    ref = reference_logps(engine, data, schedule, range(steps), 0, job)
    sums = [train_step(engine, data, schedule, s, 0, job, ref) for s in range(steps)]
    seconds = time.perf_counter() - start
    return seconds, sum(m["tokens"] for m in sums), sum(m["loss"] for m in sums) / steps


def run_trl(cfg, model_path: str, rows: list[dict], steps: int, out: Path) -> tuple[float, float]:
    """(seconds, mean loss) of ``trainer.train()`` for the same run in TRL."""
    import datasets
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = cfg.train.lora
    args = trl.DPOConfig(output_dir=str(out), report_to="none", beta=cfg.dpo.beta, loss_type=cfg.dpo.loss,
                         learning_rate=cfg.dpo.lr, per_device_train_batch_size=cfg.train.batch_size,
                         max_steps=steps, max_length=cfg.train.max_length, lr_scheduler_type="linear",
                         save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, use_cpu=True,
                         bf16=False, seed=cfg.seed, dataloader_num_workers=0)
    torch.manual_seed(cfg.seed)
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), args=args,
        processing_class=AutoTokenizer.from_pretrained(model_path),
        train_dataset=datasets.Dataset.from_list(rows),
        peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=list(lora.target_modules), task_type="CAUSAL_LM"))
    start = time.perf_counter()
    loss = trainer.train().training_loss
    return time.perf_counter() - start, loss


VOCAB = 128_256  # Llama 3's vocabulary
VARIANTS = {"per-row log-probs (before)": (True, False), "chunked log-probs": (False, False),
            "chunked + checkpointing": (False, True)}


def _per_row_logps(logits, labels, ignore_index: int = -100):
    """sequence_logps as it was before chunking (comparison only): a float32 [seq, vocab] copy of
    each row is kept for backward, and backward stacks per-row gradients into more full-size tensors."""
    import torch

    targets = labels[:, 1:]
    mask = targets != ignore_index
    rows = []
    for row_logits, row_targets in zip(logits[:, :-1], targets.masked_fill(~mask, 0)):
        row = row_logits.float()
        rows.append(row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    per_token = torch.stack(rows)
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)


def build_wide_tiny(path: Path) -> str:
    """The tiny Llama of cai_ray.tiny with a 128,256-token vocabulary (no tokenizer: ids are random)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cai_ray.tiny import CONTEXT, MODEL_SHAPE

    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=CONTEXT, tie_word_embeddings=False,
                         pad_token_id=0, **MODEL_SHAPE)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return str(path)


def _random_pairs(pairs: int, length: int):
    import numpy as np

    from cai_ray.train.data import Sequences, TrainSet

    rng = np.random.default_rng(0)
    prompts = rng.integers(0, VOCAB, (pairs, length // 4))
    sides = [[np.concatenate([p, rng.integers(0, VOCAB, length - len(p))]).tolist() for p in prompts]
             for _ in ("chosen", "rejected")]
    split = [length // 4] * pairs
    return TrainSet("dpo", [Sequences.from_rows(rows, split) for rows in sides])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args) -> None:
    """One variant in this (fresh) process; prints one JSON line."""
    import resource

    import torch

    from cai_ray.config import load_config
    from cai_ray.train import loops
    from cai_ray.train.data import Schedule
    from cai_ray.train.deepspeed import start_engine
    from cai_ray.train.lora import load_policy

    torch.set_num_threads(args.threads)
    per_row, checkpointing = VARIANTS[args.memory_child]
    if per_row:
        loops.sequence_logps = _per_row_logps  # the bench's copy of the old code, this process only
    cfg = load_config(None, [f"model.path={args.model}", f"train.max_length={args.length}",
                             f"train.batch_size={args.mem_pairs}", f"train.precision={args.precision}",
                             f"train.gradient_checkpointing={checkpointing}", "train.lora.r=8",
                             "train.lora.alpha=16", "dpo.lr=1e-3"])
    data = _random_pairs(args.mem_pairs, args.length)
    _single_process_group()
    os.environ["LOCAL_RANK"] = "0"
    torch.manual_seed(cfg.seed)
    model = load_policy(cfg.model, args.model, cfg.train.lora, checkpointing=checkpointing)
    engine = start_engine(model, cfg.train, cfg.dpo.lr, args.mem_steps)
    job = loops.Job(kind="dpo", cfg=cfg, model_path=args.model, data=None, total_steps=args.mem_steps, pad_id=0,
                    lr=cfg.dpo.lr, start=None, store=None, fail_once=None)
    schedule = Schedule(len(data), args.mem_pairs, 1, 1, cfg.seed)
    loaded = _rss_bytes()
    ref = loops.reference_logps(engine, data, schedule, range(args.mem_steps), 0, job)
    started, steps = time.perf_counter(), []
    for step in range(args.mem_steps):
        sums = loops.train_step(engine, data, schedule, step, 0, job, ref)
        steps.append((sums["loss"], sums["tokens"], float(engine.get_global_grad_norm())))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak": peak, "loaded": loaded, "seconds": seconds, "losses": [s[0] for s in steps],
                      "tokens": sum(s[1] for s in steps), "grad_norm": steps[0][2]}))


def memory_table(args, root: Path) -> None:
    model = build_wide_tiny(root / "tiny-128k")
    results = {}
    for name in VARIANTS:
        command = [sys.executable, __file__, "--memory-child", name, "--model", model, "--length", str(args.length),
                   "--mem-pairs", str(args.mem_pairs), "--mem-steps", str(args.mem_steps),
                   "--precision", args.precision, "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    before = results[next(iter(VARIANTS))]
    gib = 1024 ** 3
    print(f"\nOne DPO step's memory: tiny Llama, vocab {VOCAB:,}, {args.mem_pairs} pair(s) = "
          f"{2 * args.mem_pairs} rows x {args.length} tokens, {args.precision}, LoRA r=8, DeepSpeed ZeRO-2, "
          f"1 rank, {args.mem_steps} steps, {args.threads} thread(s)")
    print(f"| {'variant':<28} | {'peak GiB':>8} | {'step GiB':>8} | {'tokens/s':>8} | {'losses':<17} | "
          f"{'max |dloss|':>11} | {'grad norm 1':>11} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 19}|{'-' * 13}|{'-' * 13}|")
    for name, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["losses"], before["losses"]))
        losses = " ".join(f"{v:.6f}" for v in r["losses"])
        print(f"| {name:<28} | {r['peak'] / gib:8.2f} | {(r['peak'] - r['loaded']) / gib:8.2f} | "
              f"{r['tokens'] / r['seconds']:8.0f} | {losses:<17} | {diff:11.1e} | {r['grad_norm']:11.6f} |")
    chunked, width = results["chunked log-probs"], 2 if args.precision == "bf16" else 4
    print(f"step memory, chunked / before: {(chunked['peak'] - chunked['loaded']) / (before['peak'] - before['loaded']):.2f}x"
          f"; the logits alone: {2 * args.mem_pairs * args.length * VOCAB * width / gib:.2f} GiB")


def ray_startup(root: Path, model_path: str) -> dict[str, float]:
    """A 2-worker SFT run on Ray Train: ray.init, fit() to the first step, and the whole run."""
    import json

    from cai_ray.config import load_config
    from cai_ray.runtime import init_ray
    from cai_ray.stages import sft
    from cai_ray.tracking import NullStore

    cfg = load_config(None, [f"model.path={model_path}", f"output_dir={root / 'ray'}", "runtime.num_cpus=2",
                             "tracking.enabled=false", "sft.data=samples:helpful_sft", "sft.max_steps=4",
                             "train.workers=2", "train.checkpoint_every=2", "train.log_every=2"])
    start = time.perf_counter()
    init_ray(cfg)
    ready = time.perf_counter()
    summary = sft.run(cfg, NullStore())
    manifest = json.loads((Path(summary["output"]) / "manifest.json").read_text())
    startup = manifest["startup_s"]
    return {"ray.init (local cluster start)": ready - start,
            "fit() -> loop starts on rank 0 (workers, imports)": startup["loop_entered"],
            "fit() -> DeepSpeed engine ready (model, init)": startup["engine_ready"],
            "fit() -> first step done": startup["first_step"],
            "sft.run whole (4 steps, 1 checkpoint, export)": time.perf_counter() - ready}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for both trainers (Ray Train gives each 1-CPU worker 1)")
    parser.add_argument("--length", type=int, default=1024, help="memory table: tokens per row")
    parser.add_argument("--mem-pairs", type=int, default=1, help="memory table: pairs per step")
    parser.add_argument("--mem-steps", type=int, default=2, help="memory table: DPO steps per variant")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp32"),
                        help="memory table (bf16, as configs/llama-3.2-3b.yaml trains)")
    parser.add_argument("--memory-only", action="store_true", help="print the memory table only")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    try:
        memory_table(args, root)
        if not args.memory_only:
            model = throughput_table(args, root)
            startup_table(root, model)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def throughput_table(args, root: Path) -> str:
    """Ours against TRL on the tiny model; returns the model's path."""
    import torch
    import torch.distributed as dist

    # More threads than free cores make OpenMP spin: on a busy 2-core machine one step
    # then takes seconds instead of ~0.1 s, for either trainer.
    torch.set_num_threads(args.threads)
    from cai_ray.config import load_config
    from cai_ray.tiny import build_tiny

    model = str(build_tiny(root / "tiny-base"))
    cfg = load_config(None, [f"model.path={model}", f"output_dir={root / 'out'}", f"train.batch_size={args.batch}",
                             f"train.zero_stage={args.zero_stage}", "train.lora.r=8", "train.lora.alpha=16",
                             "dpo.lr=1e-3", "train.max_length=256"])
    rows = _rows(args.batch * 4)  # every pair seen steps*batch/len(rows) times by both trainers
    _single_process_group()
    ours, theirs, tokens = [], [], 0.0
    for r in range(args.rounds):
        seconds, tokens, loss = run_ours(cfg, model, rows, args.steps)
        ours.append((seconds, loss))
        theirs.append(run_trl(cfg, model, rows, args.steps, root / f"trl{r}"))
    dist.destroy_process_group()
    (best_ours, our_loss), (best_trl, trl_loss) = min(ours), min(theirs)
    print(f"\nDPO, tiny Llama, LoRA r={cfg.train.lora.r} on {','.join(cfg.train.lora.target_modules)}, "
          f"batch {args.batch} pairs, {args.steps} steps, {tokens:.0f} tokens, best of {args.rounds} rounds")
    print(f"| {'trainer':<34} | {'seconds':>8} | {'tokens/s':>9} | {'mean loss':>9} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 11}|{'-' * 11}|")
    name = f"ours (DeepSpeed ZeRO-{args.zero_stage}, 1 rank)"
    print(f"| {name:<34} | {best_ours:8.2f} | {tokens / best_ours:9.0f} | {our_loss:9.4f} |")
    print(f"| {'TRL 1.16 DPOTrainer':<34} | {best_trl:8.2f} | {tokens / best_trl:9.0f} | {trl_loss:9.4f} |")
    print(f"| {'ratio ours / TRL':<34} | {'':>8} | {best_trl / best_ours:8.2f}x | {'':>9} |")
    return model


def startup_table(root: Path, model: str) -> None:
    import ray

    try:
        startup = ray_startup(root, model)
    finally:
        ray.shutdown()
    print("\nRay Train, 2 CPU workers (ZeRO-2, LoRA), tiny model")
    print(f"| {'phase':<50} | {'seconds':>8} |")
    print(f"|{'-' * 52}|{'-' * 10}|")
    for name, seconds in startup.items():
        print(f"| {name:<50} | {seconds:8.1f} |")

if __name__ == "__main__":
    main()
