"""A tiny, deterministic Llama and byte-level BPE tokenizer, built offline.

Tests, benchmarks and the quickstart need a real model that loads through the
real ``from_pretrained`` path, but nothing may be downloaded.  We train the
tokenizer on a corpus generated here and initialise the model from a fixed
seed, so two builds with the same arguments are byte-identical.

Three flavours: ``base`` (no chat template, stands in for a base LM), ``chat``
(a chat template and role tokens, stands in for an instruct model such as a
judge or a baseline) and ``terse``: the base model with an EOS logit that wins
at every position, so every reply ends as soon as ``min_new_tokens`` lets it
(finish ``stop``).  The random base model almost never ends a short reply, and
cut replies never become training pairs; ``terse`` gives one pair per harm prompt.
"""

from __future__ import annotations

import random
from pathlib import Path

FLAVOURS = ("base", "chat", "terse")
EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TOKENS = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# head_dim = hidden / heads = 64: the CPU vLLM refuses head_dim 16.
MODEL_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1)
CONTEXT = 2048

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_WORDS = (
    "the a an of to and in is it you that he she they we for on with as was be at by this have from or "
    "one had not but what all were when your can said there use each which do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go "
    "see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part help safe harm answer question please explain why because however sorry cannot "
    "assist request response critique revision ethical legal dangerous kind honest helpful thank you sure "
    "here steps list first second third finally example code data model train learn"
).split()
_MARKERS = ["\n\nHuman:", "\n\nAssistant:", "CritiqueRequest:", "Critique:",
            "RevisionRequest:", "Revision:", "1.", "2.", "3.", "?", "!", ",", "."]


def _corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 24))]
        marker = rng.choice(_MARKERS)
        out.append(f"{marker} {' '.join(words)}{rng.choice(['.', '?', '!'])}")
    return out


def build_tokenizer(flavour: str = "base", seed: int = 0, vocab_size: int = 1024):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [EOS, PAD] + (CHAT_TOKENS if flavour == "chat" else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    # padding_side and model_max_length must go to the constructor to be saved.
    kwargs = dict(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                  unk_token=None, padding_side="left", model_max_length=CONTEXT)
    if flavour == "chat":
        kwargs.update(additional_special_tokens=CHAT_TOKENS, chat_template=CHAT_TEMPLATE)
    return PreTrainedTokenizerFast(**kwargs)


def build_tiny(path: str | Path, flavour: str = "base", seed: int = 0) -> Path:
    """Write a tiny Llama + tokenizer in Hugging Face layout (safetensors) to ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if flavour not in FLAVOURS:
        raise ValueError(f"tiny-model flavour {flavour!r} is unknown; choose one of {FLAVOURS}")
    path = Path(path)
    tokenizer = build_tokenizer("chat" if flavour == "chat" else "base", seed)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=CONTEXT,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
                         torch_dtype="float32", **MODEL_SHAPE)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    if flavour == "terse":
        with torch.no_grad():
            # Every token embedding gets a large first coordinate, which the small random layers
            # barely move, and the EOS row of the head reads only that coordinate.
            model.model.embed_tokens.weight[:, 0] = 5.0
            model.lm_head.weight[config.eos_token_id].zero_()
            model.lm_head.weight[config.eos_token_id, 0] = 100.0
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """``cai-ray tiny-model DIR [--flavour base|chat|terse] [--seed N]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="cai-ray tiny-model",
                                     description="Build the tiny offline Llama and tokenizer in DIR.")
    parser.add_argument("dir", help="output folder (Hugging Face layout)")
    parser.add_argument("--flavour", choices=FLAVOURS, default="base",
                        help="base: no chat template; chat: stands in for an instruct model; "
                             "terse: base whose replies end at min_new_tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny(args.dir, args.flavour, args.seed)
    print(f"tiny {args.flavour} model written to {out}")
    return 0
