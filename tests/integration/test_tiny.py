import hashlib
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_cli_builds_a_model_that_loads_offline_and_generates(tmp_path):
    out = tmp_path / "tiny"
    done = subprocess.run([sys.executable, "-m", "cai_ray", "tiny-model", str(out)],
                          capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tok.padding_side == "left" and tok.pad_token and tok.eos_token
    assert model.config.hidden_size // model.config.num_attention_heads >= 32  # vLLM on CPU needs it
    assert tok.chat_template is None
    batch = tok(["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: a longer question here\n\nAssistant:"],
                return_tensors="pt", padding=True)
    with torch.inference_mode():
        ids = model.generate(**batch, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert ids.shape == (2, batch.input_ids.shape[1] + 5)


def test_build_is_deterministic_and_chat_flavour_has_template(tmp_path):
    from cai_ray.tiny import build_tiny

    a = build_tiny(tmp_path / "a", "chat")
    b = build_tiny(tmp_path / "b", "chat")
    assert _digest(a) == _digest(b)
    tok = AutoTokenizer.from_pretrained(a)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|user|>hello<|end|><|assistant|>"
    # Role markers are single tokens, so a judge prompt cannot be split mid-marker.
    assert len(tok("<|assistant|>", add_special_tokens=False).input_ids) == 1


def test_unknown_flavour_is_a_clean_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cai_ray", "tiny-model", str(tmp_path), "--flavour", "x"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice" in done.stderr
