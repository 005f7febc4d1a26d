"""What every inference backend shares: the result type, the protocol, the
tokenizer-side rules (prompt checks, stop strings, the scoring boundary), and the
async entry point of engines whose ``generate`` is one blocking batch call.

Both backends tokenize prompts here and hand token ids to the model, so a
prompt means the same tokens under hf and vLLM, and per-row failures (empty or
over-long prompts) are found before any batch runs.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Protocol, runtime_checkable

from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig

FINISH_REASONS = ("stop", "length", "error")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # one of FINISH_REASONS
    error: Optional[str] = None


@runtime_checkable
class Engine(Protocol):
    def generate(self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None,
                 stop: list[str] | None = None, adapter: str | None = None) -> list[Completion]: ...

    # The same contract, awaited; many calls may be in flight at once (one row each is fine).
    async def agenerate(self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None,
                        stop: list[str] | None = None, adapter: str | None = None) -> list[Completion]: ...

    def score(self, prompts: list[str], continuations: list[str],
              adapter: str | None = None) -> list[float]: ...

    def chat_format(self, messages: list[dict]) -> str: ...

    def close(self) -> None: ...


def resolve_model_path(model: ModelConfig) -> str:
    """A local folder (made absolute), a hub id, or a .gguf file (converted once to a cached folder);
    anything else fails with one line."""
    path = str(model.path or "")
    local = Path(path).expanduser()
    if path.endswith(".gguf"):
        from cai_ray.engines.gguf import convert_gguf

        return str(convert_gguf(local))
    if path and local.is_dir():
        return str(local.resolve())
    looks_local = path.startswith(("/", ".", "~")) or path.count("/") > 1 or not path
    if looks_local or local.exists():
        raise ValueError(f"model.path={path}: no such folder and not a hub id available offline")
    return path


def load_tokenizer(model: ModelConfig, path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, revision=model.revision,
                                             trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"model.path={model.path}: no such folder and not a hub id available "
                         f"offline ({reason})") from None


def read_adapter_config(adapter: str) -> dict:
    """The PEFT adapter_config.json of ``adapter``; a bad folder fails with one line."""
    cfg = Path(adapter).expanduser() / "adapter_config.json"
    if not cfg.is_file():
        raise ValueError(f"adapter={adapter}: not a PEFT adapter folder (no adapter_config.json)")
    return json.loads(cfg.read_text())


def row_seeds(seeds: list[int] | None, params: SamplingConfig, n: int) -> list[int]:
    """Callers that need batch-independent sampling pass one seed per row; without
    them a row's seed is its position in this call, offset by ``params.seed``."""
    if seeds is None:
        return [params.seed + i for i in range(n)]
    if len(seeds) != n:
        raise ValueError(f"seeds has {len(seeds)} entries for {n} prompts; give one seed per prompt")
    return [int(s) for s in seeds]


def find_stop(text: str, stop: list[str] | None, after: int = 0) -> int | None:
    """Where to cut ``text``: the start of the earliest stop string ending past
    character ``after``.  Occurrences ending earlier fall inside the first
    min_new_tokens tokens, where vLLM does not look for stop strings either."""
    best = None
    for s in stop or ():
        if not s:
            continue
        at = text.find(s, max(0, after - len(s) + 1))
        if at >= 0 and (best is None or at < best):
            best = at
    return best


def error_completion(reason: str, prompt_tokens: int = 0) -> Completion:
    return Completion(text="", prompt_tokens=prompt_tokens, completion_tokens=0,
                      finish_reason="error", error=reason)


class BatchCalls:
    """``agenerate`` for an engine whose ``generate`` is one blocking batch call (hf).

    Concurrent calls that agree on sampling, stop strings and adapter become one ``generate``
    call in a worker thread, one call at a time.  A call takes the requests that arrived while
    the previous one ran, and all that arrive in the same pass of the event loop: the rows one
    call wakes ask for their next step together, so a chain step over a batch stays one call
    (whose rows share prompt KV) and its order is the rows' order.  A request never waits for
    company once the engine is free: under load the queue fills the next call by itself.

    ``generate`` runs ``call_chunk`` rows at a time, and a chunk of one row costs about as
    much as a full one, so when more than a chunk waits a call takes whole chunks and leaves
    the rest to open the next call: a judge under load runs full chunks back to back, and a
    chain batch no larger than a chunk (generate.batch_size <= engine.batch_size) is never split.
    """

    # Passes of the event loop a call waits while requests keep arriving; bounded so a
    # steady trickle cannot hold a call back.
    GATHER_PASSES = 8
    # Rows generate() runs at once (hf: engine.batch_size); 0: calls take every waiting row.
    call_chunk = 0

    async def agenerate(self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None,
                        stop: list[str] | None = None, adapter: str | None = None) -> list[Completion]:
        loop = asyncio.get_running_loop()
        if getattr(self, "_queue_loop", None) is not loop:  # queues belong to one event loop
            self._queue, self._queue_loop, self._drainer = [], loop, None
        reply = loop.create_future()
        # Seeds are fixed per request here: merged calls must not renumber positional seeds.
        self._queue.append((list(prompts), row_seeds(seeds, params, len(prompts)),
                            (params, tuple(stop or ()), adapter), reply))
        if self._drainer is None or self._drainer.done():
            self._drainer = loop.create_task(self._drain())
        return await reply

    async def _drain(self) -> None:
        while self._queue:
            for _ in range(self.GATHER_PASSES):
                seen = len(self._queue)
                await asyncio.sleep(0)
                if len(self._queue) == seen:
                    break
            self._queue = [r for r in self._queue if not r[3].done()]  # done: the caller gave up
            if not self._queue:
                break
            key = self._queue[0][2]
            same = [r for r in self._queue if r[2] == key]
            rows = sum(len(r[0]) for r in same)
            limit = rows // self.call_chunk * self.call_chunk if 0 < self.call_chunk < rows else rows
            group, used = [], 0
            for r in same:
                if group and used + len(r[0]) > limit:
                    break
                group.append(r)
                used += len(r[0])
            taken = {id(r) for r in group}
            self._queue = [r for r in self._queue if id(r) not in taken]
            params, stop, adapter = key
            try:
                outs = await asyncio.to_thread(self.generate, [p for r in group for p in r[0]], params,
                                               seeds=[s for r in group for s in r[1]],
                                               stop=list(stop) or None, adapter=adapter)
            except Exception as exc:  # noqa: BLE001 - every caller of the call gets it
                for r in group:
                    if not r[3].done():
                        r[3].set_exception(exc)
                continue
            start = 0
            for prompts, _, _, reply in group:
                if not reply.done():
                    reply.set_result(outs[start:start + len(prompts)])
                start += len(prompts)


class TokenizedEngine(BatchCalls):
    """Tokenizer-side behaviour shared by the backends; subclasses run the model."""

    def __init__(self, model: ModelConfig, engine: EngineConfig):
        self.model_cfg, self.engine_cfg = model, engine
        self.call_chunk = engine.batch_size
        self.path = resolve_model_path(model)
        self.tokenizer = load_tokenizer(model, self.path)
        with_special = self.tokenizer("x").input_ids
        bare = self.tokenizer("x", add_special_tokens=False).input_ids
        # Tokens the tokenizer puts before text (usually BOS); a prompt that
        # already starts with them (chat templates write BOS) does not get them twice.
        start = next((k for k in range(len(with_special)) if with_special[k:k + len(bare)] == bare), 0)
        self._prefix = with_special[:start]
        self._prefix_text = self.tokenizer.decode(self._prefix) if self._prefix else ""
        self.context = 0  # set by the subclass once the model config is known

    def encode(self, texts: list[str]) -> list[list[int]]:
        ids = self.tokenizer(list(texts), add_special_tokens=False, verbose=False).input_ids
        if not self._prefix:
            return ids
        return [row if t.startswith(self._prefix_text) else self._prefix + row for t, row in zip(texts, ids)]

    def prepare(self, prompts: list[str], params: SamplingConfig) -> tuple[list, dict[int, Completion]]:
        """Token ids per prompt, and error completions for rows that cannot run."""
        ids = self.encode(prompts)
        errors = {}
        for i, row in enumerate(ids):
            if not row:
                errors[i] = error_completion("prompt is empty (0 tokens)")
            elif len(row) + params.max_new_tokens > self.context:
                errors[i] = error_completion(
                    f"prompt has {len(row)} tokens; context is {self.context} "
                    f"and max_new_tokens is {params.max_new_tokens}", len(row))
        return ids, errors

    def score_ids(self, prompts: list[str], continuations: list[str]) -> list[tuple[list[int], int] | None]:
        """(ids of prompt+continuation, number of leading prompt ids) per row, None if unscorable.

        Boundary: trailing whitespace of the prompt moves to the continuation
        (" yes" is one token in most BPE vocabularies), the joint text is
        tokenized once, and every id past the prompt's own token count belongs
        to the continuation, as in lm-evaluation-harness.
        """
        if len(prompts) != len(continuations):
            raise ValueError(f"score got {len(prompts)} prompts and {len(continuations)} continuations")
        heads, tails = [], []
        for p, c in zip(prompts, continuations):
            cut = len(p.rstrip())
            heads.append(p[:cut])
            tails.append(p[cut:] + c)
        head_ids = self.encode(heads)
        full_ids = self.encode([h + t for h, t in zip(heads, tails)])
        out = []
        for h, f in zip(head_ids, full_ids):
            ok = len(h) > 0 and len(f) <= self.context
            out.append((f, min(len(h), len(f))) if ok else None)
        return out

    def chat_format(self, messages: list[dict]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"model.path={self.model_cfg.path} has no chat template; "
                             f"use it with role=base and the few-shot format")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def cpu_only(engine: EngineConfig) -> bool:
    import torch

    if engine.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("engine.device=cuda but CUDA is not available; set engine.device=auto or cpu")
    return engine.device == "cpu" or not torch.cuda.is_available()

