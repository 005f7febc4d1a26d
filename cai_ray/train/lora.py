"""Models for training: the base, the frozen SFT policy DPO starts from, and LoRA on top.

The DPO reference is the SFT policy: its adapter is merged into the base
weights, and the fresh DPO adapter sits on top of that merged model, so the
model with the adapter disabled *is* the SFT policy (never the raw base), and
it cannot move because its weights are not trainable.

A DPO adapter trained that way only means something on top of the SFT
weights, so for export it is concatenated with the SFT adapter into one LoRA of
rank r_sft + r_dpo (peft's "cat": exact, no approximation).  The result applies
to the plain base model, which lets one inference engine serve the base, SFT
and DPO policies as LoRA requests.  The concatenation reads the two adapters'
tensors and the base's config only (shapes are checked on a meta-device
skeleton): the driver never holds base weights.  Merging an adapter into the
base does, so it runs in a Ray task that asks for that memory (``merge_memory``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch

from cai_ray.config import LoraConfig, ModelConfig, TrainConfig

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# Room for the Python process, torch and transformers next to the weights in a merge task.
MERGE_OVERHEAD_BYTES = 2 * 1024 ** 3


def train_dtype(train: TrainConfig) -> torch.dtype:
    """The dtype DeepSpeed trains in (it casts the model to it and keeps float32 master weights)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision, torch.float32)


def load_tokenizer(model: ModelConfig, path: str):
    from cai_ray.engines.base import load_tokenizer as load

    tok = load(model, path)
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tok.pad_token = tok.eos_token
    return tok


def _skeleton(model: ModelConfig, path: str):
    """The model at ``path`` built on the meta device from its config alone: no weights load."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.path={model.path}: no usable model config "
                         f"({str(exc).strip().splitlines()[0]})") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)


def _linear_shapes(skeleton) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) features of every Linear (or GPT-2 Conv1D) module."""
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for name, module in skeleton.named_modules():
        if isinstance(module, torch.nn.Linear) and name:
            shapes[name] = (module.out_features, module.in_features)
        elif isinstance(module, Conv1D) and name:
            shapes[name] = (module.nf, module.weight.shape[0])
    return shapes


def check_targets(model: ModelConfig, path: str, targets: list[str]) -> None:
    """Fail with one line when a LoRA target names no Linear module of the model at ``path``."""
    # peft matches target_modules against the last component of module names.
    available = sorted({name.rsplit(".", 1)[-1] for name in _linear_shapes(_skeleton(model, path))})
    missing = [t for t in targets if t not in available]
    if missing:
        raise ValueError(f"train.lora.target_modules: {', '.join(missing)} not found in {path}; "
                         f"its Linear modules are: {', '.join(available[:12])}")


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def weights_sha256(folder: str | Path) -> str:
    """One hash over every ``*.safetensors`` file in ``folder`` (names and bytes, sorted by name)."""
    digest = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} holds no .safetensors weights")
    for file in files:
        digest.update(file.name.encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_policy(model: ModelConfig, path: str, lora: LoraConfig, start: Optional[str] = None,
                checkpointing: bool = False, dtype: torch.dtype = torch.float32):
    """The model a worker trains: base (or ``start``'s merged SFT policy) with a fresh LoRA adapter.

    ``start`` is a PEFT adapter folder (merged into the base) or a full model
    folder (loaded in place of the base, e.g. from full fine-tuning).  Weights
    load in ``dtype``, the training dtype (``train_dtype``): DeepSpeed casts the
    model to it anyway and keeps its own float32 master copy of what trains, so
    a float32 load would only cost host memory (~32 GB per rank for 8B).  peft
    keeps a fresh adapter in float32.  ``checkpointing`` turns on gradient
    checkpointing (it engages in train mode only).
    """
    from transformers import AutoModelForCausalLM

    source = start if start and not is_adapter(start) else path
    base = AutoModelForCausalLM.from_pretrained(source, dtype=dtype,
                                                revision=model.revision if source == path else None,
                                                trust_remote_code=model.trust_remote_code)
    if start and is_adapter(start):
        from peft import PeftModel

        base = PeftModel.from_pretrained(base, start).merge_and_unload()
    if checkpointing:
        # Non-reentrant: the reentrant variant gives no gradient to a layer whose inputs need
        # none, and under LoRA the frozen embeddings' output needs none.  transformers also
        # hooks the embeddings to require grad (enable_input_require_grads) for that case.
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not lora.enabled:
        return base.requires_grad_(True)  # a merged adapter leaves the base frozen
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    spec = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                          target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, spec)




# ---------------------------------------------------------------- export


def read_adapter(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a PEFT LoRA folder; a missing or corrupt one fails in one line."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        tensors = load_file(folder / ADAPTER_WEIGHTS)
    except (OSError, ValueError, SafetensorError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"adapter {folder}: not a readable PEFT adapter ({reason})") from None
    unsupported = [k for k in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern") if config.get(k)]
    if config.get("peft_type") != "LORA" or unsupported:
        raise ValueError(f"adapter {folder}: only plain LoRA adapters can be combined "
                         f"(peft_type={config.get('peft_type')}, {', '.join(unsupported) or 'no extras'})")
    return config, tensors


def _lora_pairs(folder: Path, config: dict, tensors: dict, shapes: dict) -> dict[str, tuple]:
    """Module name -> (scaled A, B) in float32, checked against the base's Linear shapes."""
    scaling = config["lora_alpha"] / (config["r"] ** 0.5 if config.get("use_rslora") else config["r"])
    pairs = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise ValueError(f"adapter {folder}: unexpected tensor {key} (only lora_A/lora_B combine)")
            continue
        name = key[:-len(".lora_A.weight")]
        b = tensors.get(f"{name}.lora_B.weight")
        module = name.removeprefix("base_model.model.")
        want = shapes.get(module)
        if b is None or want is None or b.shape != (want[0], a.shape[0]) or a.shape[1] != want[1]:
            raise ValueError(f"adapter {folder}: {key} does not fit the base model "
                             f"(A {tuple(a.shape)}, B {None if b is None else tuple(b.shape)}, "
                             f"module (out, in) {want})")
        pairs[name] = (a.float() * scaling, b.float())
    return pairs


def combine_adapters(model: ModelConfig, base_path: str, first: str, second: str, dest: Path,
                     dtype: torch.dtype = torch.float32) -> None:
    """Save at ``dest`` one adapter equal to applying ``first`` then ``second`` to the base.

    peft's "cat" combination computed from the two folders' tensors: rank r1 + r2,
    alpha = rank (scaling 1), A = [s1 A1; s2 A2], B = [B1 B2], a module only one
    adapter targets padded with zeros.  Saved in ``dtype``, the training dtype.
    """
    from safetensors.torch import save_file

    shapes = _linear_shapes(_skeleton(model, base_path))
    configs, pairs = [], []
    for folder in (Path(first), Path(second)):
        config, tensors = read_adapter(folder)
        configs.append(config)
        pairs.append(_lora_pairs(folder, config, tensors, shapes))
    ranks = [c["r"] for c in configs]
    out = {}
    for name in sorted(set(pairs[0]) | set(pairs[1])):
        out_f, in_f = shapes[name.removeprefix("base_model.model.")]
        parts = [p.get(name, (torch.zeros(r, in_f), torch.zeros(out_f, r))) for p, r in zip(pairs, ranks)]
        out[f"{name}.lora_A.weight"] = torch.cat([a for a, _ in parts], 0).to(dtype).contiguous()
        out[f"{name}.lora_B.weight"] = torch.cat([b for _, b in parts], 1).to(dtype).contiguous()
    targets = sorted(set(configs[0]["target_modules"]) | set(configs[1]["target_modules"]))
    config = {**configs[0], "r": sum(ranks), "lora_alpha": sum(ranks), "use_rslora": False,
              "target_modules": targets, "rank_pattern": {}, "alpha_pattern": {}}
    dest.mkdir(parents=True, exist_ok=True)
    save_file(out, dest / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (dest / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def merge_dtype(model: ModelConfig):
    return "auto" if model.dtype == "auto" else getattr(torch, model.dtype)


def merge_memory(model: ModelConfig, base_path: Optional[str] = None) -> int:
    """Bytes a merge task needs: the base's weights in ``model.dtype`` (counted on a meta
    skeleton) plus the process; "auto" counts 2 bytes a parameter (bf16, as hub models ship)."""
    skeleton = _skeleton(model, base_path or model.path)
    params = sum(p.numel() for p in skeleton.parameters())
    dtype = merge_dtype(model)
    size = 2 if dtype == "auto" else torch.finfo(dtype).bits // 8
    return int(params * size + MERGE_OVERHEAD_BYTES)


def merge_into_base(model: ModelConfig, base_path: str, adapter: str, dest: Path, tokenizer) -> None:
    """A plain Hugging Face model folder with ``adapter`` merged in, tokenizer included, in
    ``model.dtype``.  It holds the whole base: run it through ``merge_task``, not on the driver."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=merge_dtype(model), revision=model.revision,
                                                trust_remote_code=model.trust_remote_code)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


def merge_task(model: ModelConfig, base_path: str, adapter: str, dest: Path, tokenizer) -> None:
    """``merge_into_base`` in a Ray task that asks for the memory it needs (on whichever node has it;
    ``dest`` must be on storage that node sees, as the stage folders are)."""
    import ray

    need = merge_memory(model, base_path)
    task = ray.remote(num_cpus=1, memory=need, max_retries=0)(merge_into_base)
    ray.get(task.remote(model, base_path, adapter, dest, tokenizer))
