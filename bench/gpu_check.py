"""The GPU code paths on one machine with PyTorch, transformers and peft only (``bench/gpu_check.sh``).

No Ray, vLLM, DeepSpeed or MLflow needed, nothing downloaded: a random Llama is
built here.  What runs, through the project's own code:
- SFT and DPO steps of ``loops.run_worker`` under the plain ``LocalContext``, in
  bf16 with gradient checkpointing, over an NCCL process group of world size 1
  (gloo with --device cpu), with the plain torch engine; a forward pre-hook
  counts decoder layer 0's calls per step (2: checkpointing engaged);
- the same SFT under DeepSpeed ZeRO-2 if ``import deepspeed`` works (else: skipped);
- the chunked log-probs against a float32 log_softmax, values and peak memory;
- the export: SFT + DPO adapters combined (tensors + config only) and merged into the base;
- the hf engine generating and scoring on the device through the Engine interface.
Each part prints one line; peak memory is the device's (CUDA) or the process's RSS (CPU).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = {"tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=1),
          "small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                        num_key_value_heads=4)}
WORDS = "the model learns to answer every question kindly and with care about harm".split()


def peak(device: torch.device) -> str:
    if device.type == "cuda":
        value = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return f"peak GPU memory {value / 2**20:.0f} MiB"
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB"


def build_model(folder: Path, size: str) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cai_ray.tiny import build_tokenizer

    tok = build_tokenizer("base")
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, **SHAPES[size])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def rows(n: int, words: int) -> tuple[list[dict], list[dict]]:
    def text(i, k):
        return " ".join(WORDS[(i * 7 + j * k) % len(WORDS)] for j in range(words))
    sft = [{"prompt": f"question {i}: {text(i, 3)}?", "completion": text(i, 5) + "."} for i in range(n)]
    pairs = [{"prompt": f"\n\nHuman: question {i}: {text(i, 3)}?\n\nAssistant:", "chosen": " " + text(i, 5),
              "rejected": " " + text(i, 11)} for i in range(n)]
    return sft, pairs


def run_stage(kind, model, out: Path, device, make_engine, args, start=None, precision="bf16"):
    """One ``run_worker`` call; returns (final report, layer-0 calls in training mode per step)."""
    from cai_ray.config import load_config
    from cai_ray.tracking import NullStore
    from cai_ray.train.context import LocalContext
    from cai_ray.train.data import tokenize
    from cai_ray.train.lora import load_tokenizer
    from cai_ray.train.loops import Job, run_worker

    cfg = load_config(None, [f"model.path={model}", f"output_dir={out}", f"train.precision={precision}",
                             "train.gradient_checkpointing=true", f"train.batch_size={args.batch}",
                             "train.log_every=1", "train.checkpoint_every=1000", "train.zero_stage=2",
                             f"train.use_gpu={device.type == 'cuda'}", "train.lora.r=16", "train.lora.alpha=32"])
    tok = load_tokenizer(cfg.model, model)
    sft_rows, pairs = rows(args.batch * args.steps, args.words)
    data = tokenize(tok, sft_rows if kind == "sft" else pairs, kind, cfg.train.max_length)
    job = Job(kind=kind, cfg=cfg, model_path=model, data=None, total_steps=args.steps, pad_id=tok.pad_token_id,
              lr=1e-3, start=start, store=NullStore(), fail_once=None)
    calls = []

    def hooked(model_, *rest):
        layer = next(m for name, m in model_.named_modules() if name.endswith("layers.0"))
        layer.register_forward_pre_hook(lambda module, _: calls.append(module.training))
        return make_engine(model_, *rest)

    launcher = LocalContext(out / "checkpoints", device)
    run_worker(launcher.as_worker(), job, data, make_engine=hooked)
    return launcher.reports[-1], sum(calls) / args.steps


def check_training(model, root: Path, device, args) -> tuple[str, str]:
    from cai_ray.train.plain import start_torch_engine

    sft, per_step = run_stage("sft", model, root / "sft", device, start_torch_engine(device), args)
    sft_adapter = str(Path(sft["checkpoint"]) / "adapter")
    print(f"sft  bf16 torch engine: {args.steps} steps, loss {sft['loss']:.3f}, "
          f"{sft['attempt_tokens_per_s']:.0f} tokens/s, layer 0 ran {per_step:g}x per step "
          f"(2 = checkpointing engaged), {peak(device)}")
    dpo, per_step = run_stage("dpo", model, root / "dpo", device, start_torch_engine(device), args,
                              start=sft_adapter)
    print(f"dpo  bf16 torch engine: {args.steps} steps, last loss {dpo['loss']:.3f} (log 2 = "
          f"{math.log(2):.3f} at the start), {dpo['attempt_tokens_per_s']:.0f} tokens/s, layer 0 ran {per_step:g}x per "
          f"step, {peak(device)}")
    return sft_adapter, str(Path(dpo["checkpoint"]) / "adapter")


def check_deepspeed(model, root: Path, device, args) -> None:
    try:
        import deepspeed  # noqa: F401
    except Exception as exc:  # not installed, or installed without its build deps
        print(f"deepspeed ZeRO-2: skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
        return
    from cai_ray.train.deepspeed import start_engine

    sft, per_step = run_stage("sft", model, root / "ds-sft", device, start_engine, args)
    print(f"sft  bf16 DeepSpeed ZeRO-2: {args.steps} steps, loss {sft['loss']:.3f}, "
          f"{sft['attempt_tokens_per_s']:.0f} tokens/s, layer 0 ran {per_step:g}x per step, {peak(device)}")


def check_logps(device) -> None:
    from cai_ray.train.losses import sequence_logps

    gen = torch.Generator(device=device).manual_seed(0)
    vocab = 128256 if device.type == "cuda" else 32000
    logits = torch.randn(4, 512, vocab, device=device, dtype=torch.bfloat16, generator=gen)
    labels = torch.randint(0, vocab, (4, 512), device=device, generator=gen)
    peak(device)
    chunked = sequence_logps(logits, labels)
    chunked_peak = peak(device)
    full = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, labels[:, 1:, None]).squeeze(-1).sum(-1)
    full_peak = peak(device)
    err = (chunked - full).abs().max().item()
    print(f"chunked log-probs [4, 512, {vocab}] bf16: max |chunked - float32 log_softmax| = {err:.2e}; "
          f"chunked {chunked_peak}, full {full_peak}")
    assert err < 1e-2 * abs(full).max().item()


def check_export(model, sft_adapter, dpo_adapter, root: Path, device) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cai_ray.config import ModelConfig
    from cai_ray.train.lora import combine_adapters, load_tokenizer, merge_into_base

    cfg = ModelConfig(path=model, dtype="bfloat16")
    started = time.time()
    combine_adapters(cfg, model, sft_adapter, dpo_adapter, root / "combined", dtype=torch.bfloat16)
    merge_into_base(cfg, model, str(root / "combined"), root / "merged", load_tokenizer(cfg, model))
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]], device=device)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).to(device)
        a = PeftModel.from_pretrained(base, root / "combined").eval()(ids).logits.float()
        merged = AutoModelForCausalLM.from_pretrained(root / "merged", dtype=torch.bfloat16).to(device)
        b = merged.eval()(ids).logits.float()
    err = (a - b).abs().max().item()
    print(f"export: SFT+DPO combined (bf16) and merged in {time.time() - started:.1f}s; "
          f"max |base+adapter - merged| logits {err:.2e}")
    return str(root / "merged")


def check_hf_engine(merged: str, device) -> None:
    from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig
    from cai_ray.engines import make_engine

    engine = make_engine(ModelConfig(path=merged, dtype="bfloat16"),
                         EngineConfig(backend="hf", device=device.type))
    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(16)]
    started = time.time()
    out = engine.generate(prompts, SamplingConfig(temperature=1.0, max_new_tokens=64, min_new_tokens=64))
    seconds = time.time() - started
    tokens = sum(c.completion_tokens for c in out)
    scores = engine.score(prompts, [" yes"] * len(prompts))
    on = next(engine.model.parameters()).device
    engine.close()
    print(f"hf engine on {on}: {len(out)} prompts x 64 new tokens, {tokens / seconds:.0f} tokens/s; "
          f"{len(scores)} scores, all finite: {all(math.isfinite(s) for s in scores)}; {peak(device)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--size", choices=tuple(SHAPES), help="model shape (default: small on CUDA, tiny on CPU)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--words", type=int, default=None, help="words per prompt and completion")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    device = torch.device("cuda:0" if cuda else "cpu")
    args.size = args.size or ("small" if cuda else "tiny")
    args.steps, args.batch = args.steps or (20 if cuda else 3), args.batch or (8 if cuda else 2)
    args.words = args.words or (120 if cuda else 12)
    for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29511"}.items():
        os.environ.setdefault(key, value)
    for name in ("ray", "mlflow", "vllm", "deepspeed"):
        print(f"{name}: {'importable' if _importable(name) else 'absent'}")
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name(0) if cuda else 'cpu'}, "
          f"model {args.size} {SHAPES[args.size]}")
    import torch.distributed as dist

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{root / 'store'}", rank=0,
                                world_size=1, timeout=datetime.timedelta(seconds=120),
                                **({"device_id": device} if cuda else {}))
        print(f"process group: {dist.get_backend()} world size {dist.get_world_size()}")
        model = build_model(root / "base", args.size)
        started = time.time()
        sft_adapter, dpo_adapter = check_training(model, root, device, args)
        check_deepspeed(model, root, device, args)
        check_logps(device)
        merged = check_export(model, sft_adapter, dpo_adapter, root, device)
        check_hf_engine(merged, device)
        dist.destroy_process_group()
    print(f"gpu check: all parts ran in {time.time() - started:.0f}s")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
