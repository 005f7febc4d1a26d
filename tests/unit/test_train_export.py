"""Adapter export without Ray: the concatenation equals peft's "cat", needs no base weights,
refuses bad folders in one line; the pinned revision reaches every load of the training path."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cai_ray.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
LLAMA_3_8B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=128256)


def _random_adapter(base, folder, targets, r, alpha, seed):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    with torch.no_grad():
        for key, p in peft.named_parameters():
            if "lora_" in key:
                p.normal_(0, 0.2)
    peft.save_pretrained(folder)


def test_combination_equals_peft_cat_and_saves_in_the_training_dtype(tmp_path, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cai_ray.train.lora import combine_adapters

    load = AutoModelForCausalLM.from_pretrained
    _random_adapter(load(tiny_base), tmp_path / "sft", ["q_proj", "v_proj"], 4, 8, 0)
    _random_adapter(load(tiny_base), tmp_path / "dpo", ["q_proj", "o_proj"], 2, 16, 1)
    peft = PeftModel.from_pretrained(load(tiny_base), tmp_path / "sft", adapter_name="first")
    peft.load_adapter(tmp_path / "dpo", adapter_name="second")
    peft.add_weighted_adapter(["first", "second"], [1.0, 1.0], adapter_name="default", combination_type="cat")
    peft.delete_adapter("first")
    peft.delete_adapter("second")
    peft.save_pretrained(tmp_path / "peft-cat")
    model = ModelConfig(path=tiny_base)
    combine_adapters(model, tiny_base, str(tmp_path / "sft"), str(tmp_path / "dpo"), tmp_path / "ours")
    want, got = load_file(tmp_path / "peft-cat" / "adapter_model.safetensors"), \
        load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(got) == sorted(want) and len(got) == 2 * 2 * 3  # 2 layers x (q, v, o) x (A, B)
    # The same delta B @ A per module (alpha = r: scaling 1).  Where only one adapter targets a
    # module, peft packs its block first and we keep it at its own rows: zero rows either way.
    for key in (k for k in want if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        torch.testing.assert_close(got[b_key] @ got[key], want[b_key] @ want[key], msg=key)
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft-cat"))
    assert (ours["r"], ours["lora_alpha"]) == (theirs["r"], theirs["lora_alpha"]) == (6, 6)
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    combine_adapters(model, tiny_base, str(tmp_path / "sft"), str(tmp_path / "dpo"), tmp_path / "bf16",
                     dtype=torch.bfloat16)
    bf16 = load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        a = PeftModel.from_pretrained(load(tiny_base), tmp_path / "ours").eval()(ids).logits
        b = peft.eval()(ids).logits
    torch.testing.assert_close(a, b)


def _lora_folder(folder: Path, shapes: dict[str, tuple[int, int]], r: int, layers: int) -> None:
    """A PEFT LoRA folder written directly: adapter_config.json and adapter_model.safetensors."""
    tensors = {}
    for layer in range(layers):
        for module, (out_f, in_f) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(r, in_f, dtype=torch.bfloat16)
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_f, r, dtype=torch.bfloat16)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": 2 * r,
         "target_modules": sorted(shapes), "lora_dropout": 0.0, "bias": "none"}))


def test_combining_adapters_of_an_8b_base_stays_under_1_gb_on_the_driver(tmp_path):
    """A config-only Llama-3-8B folder (no weights exist) and rank-16 + rank-8 adapters on q and v."""
    from transformers import LlamaConfig

    base = tmp_path / "llama-3-8b-config-only"
    LlamaConfig(**LLAMA_3_8B).save_pretrained(base)
    shapes = {"q_proj": (4096, 4096), "v_proj": (1024, 4096)}
    _lora_folder(tmp_path / "sft", shapes, 16, 32)
    _lora_folder(tmp_path / "dpo", shapes, 8, 32)
    script = textwrap.dedent(f"""
        import torch
        from cai_ray.config import ModelConfig
        from cai_ray.train.lora import combine_adapters, merge_memory
        model = ModelConfig(path={str(base)!r}, dtype="bfloat16")
        combine_adapters(model, model.path, {str(tmp_path / 'sft')!r}, {str(tmp_path / 'dpo')!r},
                         __import__("pathlib").Path({str(tmp_path / 'both')!r}), dtype=torch.bfloat16)
        peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
        print(peak * 1024, merge_memory(model))
    """)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    peak, merge_bytes = map(int, out.stdout.split()[-2:])
    print(f"combine on an 8B base: driver peak RSS {peak / 2**20:.0f} MiB; a merge task asks for "
          f"{merge_bytes / 2**30:.1f} GiB")
    assert merge_bytes - 2 * 2**30 > 8e9, "the base's bf16 weights alone need more than 8 GB"
    assert peak < 1e9
    both = load_file(tmp_path / "both" / "adapter_model.safetensors")
    q = "base_model.model.model.layers.31.self_attn.q_proj"
    assert both[f"{q}.lora_A.weight"].shape == (24, 4096) and both[f"{q}.lora_B.weight"].shape == (4096, 24)


def test_a_missing_corrupt_or_misfitting_adapter_is_one_line(tmp_path, tiny_base):
    from cai_ray.train.lora import combine_adapters

    model = ModelConfig(path=tiny_base)
    _lora_folder(tmp_path / "good", {"q_proj": (128, 128)}, 4, 2)
    _lora_folder(tmp_path / "wide", {"q_proj": (128, 256)}, 4, 2)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00not safetensors")
    cases = {"missing": "not a readable PEFT adapter", "corrupt": "not a readable PEFT adapter",
             "wide": "does not fit the base model"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            combine_adapters(model, tiny_base, str(tmp_path / "good"), str(tmp_path / name), tmp_path / "out")
        assert "\n" not in str(info.value) and name in str(info.value)
    assert not (tmp_path / "out").exists()


def test_the_pinned_revision_reaches_every_training_and_export_load(tmp_path, tiny_base):
    """The tiny model as a hub id in a local hub cache, offline, where only the revision "pinned"
    exists: each load succeeds with model.revision=pinned and fails without it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--local--tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in Path(tiny_base).iterdir():
        (snapshot / file.name).symlink_to(file)
    (repo / "refs").mkdir()
    (repo / "refs" / "pinned").write_text(commit)
    _lora_folder(tmp_path / "sft", {"q_proj": (128, 128)}, 4, 2)
    _lora_folder(tmp_path / "dpo", {"v_proj": (64, 128)}, 2, 2)
    script = textwrap.dedent(f"""
        import sys, torch
        from pathlib import Path
        from cai_ray.config import LoraConfig, ModelConfig
        from cai_ray.train import lora
        model = ModelConfig(path="local/tiny", revision=sys.argv[1] if len(sys.argv) > 1 else None)
        loads = {{
            "tokenizer": lambda: lora.load_tokenizer(model, model.path),
            "check_targets": lambda: lora.check_targets(model, model.path, ["q_proj"]),
            "load_policy": lambda: lora.load_policy(model, model.path, LoraConfig(r=2), dtype=torch.bfloat16),
            "combine_adapters": lambda: lora.combine_adapters(model, model.path, {str(tmp_path / 'sft')!r},
                                                              {str(tmp_path / 'dpo')!r}, Path({str(tmp_path / 'c')!r})),
            "merge_memory": lambda: lora.merge_memory(model),
            # In the stages this runs in a Ray task (merge_task), with the same model config.
            "merge_into_base": lambda: lora.merge_into_base(model, model.path, {str(tmp_path / 'sft')!r},
                                                            Path({str(tmp_path / 'm')!r}),
                                                            lora.load_tokenizer(model, model.path)),
        }}
        for name, load in loads.items():
            try:
                load()
                print(name, "ok")
            except Exception as exc:
                print(name, "failed:", str(exc).splitlines()[0][:120])
    """)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    runs = {rev: subprocess.run([sys.executable, "-c", script, *([rev] if rev else [])], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=300) for rev in ("pinned", None)}
    pinned, unpinned = ([line for line in runs[k].stdout.splitlines() if line.split(" ")[1:2] in (["ok"], ["failed:"])]
                        for k in ("pinned", None))
    assert pinned == [f"{name} ok" for name in
                      ("tokenizer", "check_targets", "load_policy", "combine_adapters", "merge_memory",
                       "merge_into_base")], runs["pinned"]
    assert len(unpinned) == 6 and all("failed" in line for line in unpinned), unpinned


def test_plan_counts_the_merge_task_memory(tiny_base):
    from cai_ray.config import load_config
    from cai_ray.plan import check, local_node, requests
    from cai_ray.train.lora import merge_memory

    cfg = load_config(None, [f"model.path={tiny_base}", "dpo.merge=true"])
    merge = [r for r in requests(cfg) if r.stage == "merge"]
    assert len(merge) == 1 and merge[0].memory == merge_memory(cfg.model) > 2 * 2**30
    assert check(merge[0], local_node(cfg)[1]) is None
    tight = local_node(cfg)[1]
    tight[0].resources["memory"] = 2 * 2**30
    assert "merge" in check(merge[0], tight) and "memory" in check(merge[0], tight)
    assert not [r for r in requests(load_config(None, [f"model.path={tiny_base}"])) if r.stage == "merge"]
