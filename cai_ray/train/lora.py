"""Models for training: the base, the frozen SFT policy DPO starts from, and LoRA on top.

The DPO reference is the SFT policy: its adapter is merged into the base
weights, and the fresh DPO adapter sits on top of that merged model, so the
model with the adapter disabled *is* the SFT policy (never the raw base), and
it cannot move because its weights are not trainable.

A DPO adapter trained that way only means something on top of the SFT
weights, so for export it is concatenated with the SFT adapter into one LoRA of
rank r_sft + r_dpo (peft's "cat": exact, no approximation).  The result applies
to the plain base model, which lets one inference engine serve the base, SFT
and DPO policies as LoRA requests.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import torch

from cai_ray.config import LoraConfig, ModelConfig


def load_tokenizer(model: ModelConfig, path: str):
    from cai_ray.engines.base import load_tokenizer as load

    tok = load(model, path)
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id will do.
        tok.pad_token = tok.eos_token
    return tok


def check_targets(model: ModelConfig, path: str, targets: list[str]) -> None:
    """Fail with one line when a LoRA target names no Linear module of the model at ``path``.

    The model is built on the meta device from its config alone: no weights load.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        config = AutoConfig.from_pretrained(path, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.path={model.path}: no usable model config "
                         f"({str(exc).strip().splitlines()[0]})") from None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    # peft matches target_modules against the last component of module names.
    available = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                        if isinstance(module, (torch.nn.Linear, Conv1D)) and name})
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
                checkpointing: bool = False):
    """The model a worker trains: base (or ``start``'s merged SFT policy) with a fresh LoRA adapter.

    ``start`` is a PEFT adapter folder (merged into the base) or a full model
    folder (loaded in place of the base, e.g. from full fine-tuning).  Weights
    stay float32: DeepSpeed keeps the master copy and casts for bf16 itself.
    ``checkpointing`` turns on gradient checkpointing (train mode only).
    """
    from transformers import AutoModelForCausalLM

    source = start if start and not is_adapter(start) else path
    base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32,
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


def combine_adapters(base_path: str, first: str, second: str, dest: Path) -> None:
    """Save at ``dest`` one adapter equal to applying ``first`` then ``second`` to the base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, first, adapter_name="first")
    model.load_adapter(second, adapter_name="second")
    model.add_weighted_adapter(["first", "second"], [1.0, 1.0], adapter_name="default", combination_type="cat")
    model.delete_adapter("first")
    model.delete_adapter("second")
    model.save_pretrained(dest, safe_serialization=True)


def merge_into_base(base_path: str, adapter: str, dest: Path, tokenizer) -> None:
    """A plain Hugging Face model folder with ``adapter`` merged in, tokenizer included."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    PeftModel.from_pretrained(base, adapter).merge_and_unload().save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
