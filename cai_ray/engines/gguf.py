"""A single-file GGUF model as a Hugging Face folder, converted once into a cache.

transformers reads GGUF (with the ``gguf`` package) but dequantises it on every load, and vLLM
does not read it on CPU; so ``model.path=FILE.gguf`` is converted once to a safetensors folder
that every backend loads as usual.  Cache: ``$CAI_RAY_CACHE`` or ``~/.cache/cai_ray``, one folder
per file content (its name, size and modification time), written under a temporary name and
renamed into place whole.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

SUFFIX = ".gguf"


def cache_root() -> Path:
    return Path(os.environ.get("CAI_RAY_CACHE") or Path.home() / ".cache" / "cai_ray").expanduser()


def converted_dir(gguf_file: Path) -> Path:
    stat = gguf_file.stat()
    tag = hashlib.sha256(f"{gguf_file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{gguf_file.stem}-{tag}"


def convert_gguf(gguf_file: str | Path, dtype: str = "bfloat16") -> Path:
    """The HF folder for ``gguf_file`` (converted now if the cache has none); one-line errors."""
    src = Path(gguf_file).expanduser().resolve()
    if not src.is_file():
        raise ValueError(f"model.path={gguf_file}: no such .gguf file")
    out = converted_dir(src)
    if (out / "config.json").is_file():
        return out
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError:
        raise ValueError(f"model.path={gguf_file}: reading a .gguf file needs the gguf package "
                         f"(pip install gguf)") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=getattr(torch, dtype))
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model.path={gguf_file}: transformers cannot read it "
                         f"({(str(exc).strip().splitlines() or [type(exc).__name__])[0]})") from None
    # The loaded model still says it is GGUF-quantised, and save_pretrained refuses such a model;
    # its weights are already dequantised, so the marker goes and the plain architecture is named.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
