"""The transformers backend: batched left-padded decoding with our own loop.

Why not ``model.generate`` (``python bench/hf_decode.py``, table in
docs/benchmarks.md): greedy, on the generate stage's few-shot prompts, generate
with ``stop_strings`` and a deep-copied prefix ``DynamicCache`` gives the same
token ids on every row, at our speed on long replies (0.95x-1.11x of our time
at 32-128 tokens, within noise) and 1.5x-1.8x our time when replies end after a
few tokens (its per-call set-up).  What it cannot do decides: per-row seeds whose
samples do not depend on which batch a row lands in (it draws from the global
torch RNG), and stop strings looked for only past ``min_new_tokens``, as vLLM
does (its StopStringCriteria stopped 8/8 rows inside min_new_tokens=8; ours 0/8).
The loop below is what ``generate`` does for a decoder with a KV cache, minus
the generality.

Sampling draws one uniform number per row and step from a NumPy generator
seeded with the row's seed, and picks the token by inverse CDF over the
(temperature-scaled, top-p-truncated) distribution.  A row's draws therefore
depend only on its seed and step, never on its neighbours.  The trade-off: the
same seed gives different text than vLLM's sampler (only greedy output is
comparable across backends), and top-p < 1 costs a vocabulary sort per step.
Rows are padded to the longest prompt of their chunk, and prompt tokens whose
keys and values are known (see ``_prefill``) are not run again, so logits
differ from an unbatched, uncached run by float rounding only; a sampled row
can flip only when its uniform lands within rounding distance of a CDF boundary.
"""

from __future__ import annotations

import gc
import math
import os
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig
from cai_ray.engines.base import (Completion, TokenizedEngine, cpu_only, find_stop,
                                  read_adapter_config, row_seeds)

# Below this many shared leading tokens a separate prefix pass is not worth its call.
MIN_SHARED_PREFIX = 16
# Most prompt KV kept from one generate call for the next (a chain step is one batch;
# a caller passing thousands of prompts at once gets reuse for the first chunks only).
KEEP_KV_BYTES = 2 << 30


class HFEngine(TokenizedEngine):
    def __init__(self, model: ModelConfig, engine: EngineConfig):
        super().__init__(model, engine)
        from transformers import AutoModelForCausalLM

        self.device = torch.device("cpu" if cpu_only(engine) else "cuda")
        dtype = "auto" if model.dtype == "auto" else getattr(torch, model.dtype)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=dtype, revision=model.revision, trust_remote_code=model.trust_remote_code)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model.path={model.path}: cannot load the model "
                             f"({str(exc).strip().splitlines()[0]})") from None
        self.model.to(self.device).eval()
        limits = [getattr(self.model.config, "max_position_embeddings", None), engine.max_model_len]
        if self.tokenizer.model_max_length < 10**7:  # transformers' "unset" is a huge sentinel
            limits.append(self.tokenizer.model_max_length)
        if not any(limits):
            raise ValueError(f"model.path={model.path}: the model states no context length; "
                             f"set engine.max_model_len")
        self.context = min(x for x in limits if x)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        self.eos = sorted({i for i in eos + [tok.eos_token_id] if i is not None})
        self._eos_t = torch.tensor(self.eos, device=self.device, dtype=torch.long)
        self._peft = None
        self._adapters: dict[str, str] = {}  # resolved folder -> peft adapter name
        # Prompt KV of the last generate call, for prompts that extend one of them:
        # {prompt length: {prompt ids: (per-layer (keys, values), mask, row)}}, its adapter and bytes.
        # Like the active adapter, this is per engine: one generate call at a time (Serve's
        # batch handler and Ray Data actors call it that way).
        self._kept, self._kept_adapter, self._kept_bytes = {}, None, 0

    # -- public API ---------------------------------------------------------------

    def generate(self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None,
                 stop: list[str] | None = None, adapter: str | None = None) -> list[Completion]:
        ids, done = self.prepare(prompts, params)
        seeds = row_seeds(seeds, params, len(prompts))
        # Similar lengths share a chunk, so little compute goes to padding.
        todo = sorted((i for i in range(len(prompts)) if i not in done), key=lambda i: len(ids[i]))
        bs = self.engine_cfg.batch_size
        kept = self._kept if self._kept_adapter == adapter else {}
        self._kept, self._kept_adapter, self._kept_bytes = {}, adapter, 0
        with self._use_adapter(adapter), torch.inference_mode():
            for start in range(0, len(todo), bs):
                chunk = todo[start:start + bs]
                rows = self._decode([ids[i] for i in chunk], params, [seeds[i] for i in chunk], stop, kept)
                done.update(zip(chunk, rows))
        return [done[i] for i in range(len(prompts))]

    def score(self, prompts: list[str], continuations: list[str], adapter: str | None = None) -> list[float]:
        """Summed log-probs of each continuation given its prompt; NaN for a row
        that cannot be scored (empty prompt, or longer than the context)."""
        rows = self.score_ids(prompts, continuations)
        out = [math.nan] * len(rows)
        todo = sorted((i for i, r in enumerate(rows) if r is not None), key=lambda i: len(rows[i][0]))
        bs = self.engine_cfg.batch_size
        with self._use_adapter(adapter), torch.inference_mode():
            for start in range(0, len(todo), bs):
                chunk = todo[start:start + bs]
                for i, value in zip(chunk, self._score_batch([rows[i] for i in chunk])):
                    out[i] = value
        return out

    def close(self) -> None:
        self.model = self._peft = None
        self._kept = {}
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- internals ----------------------------------------------------------------

    def _left_pad(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        # Positions count real tokens only, so a padded row sees the same
        # positions as it would alone.
        return ids, mask, (mask.cumsum(-1) - 1).clamp_(min=0)

    def _decode(self, rows: list[list[int]], params: SamplingConfig, seeds: list[int],
                stop: list[str] | None, kept: dict) -> list[Completion]:
        # Kept over model.generate for the measured reasons in the module docstring.
        n, steps, floor = len(rows), params.max_new_tokens, params.min_new_tokens
        uniforms = None
        if params.temperature > 0:
            draws = [np.random.default_rng(s % 2**64).random(steps, dtype=np.float32) for s in seeds]
            uniforms = torch.from_numpy(np.stack(draws)).to(self.device)
        window = max((len(s.encode()) for s in stop or () if s), default=0) + 1
        gen = torch.full((n, steps), self.pad_id, dtype=torch.long, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        lengths = torch.full((n,), steps, dtype=torch.long, device=self.device)
        out, mask, pos = self._prefill(rows, kept)
        for step in range(steps):
            logits = out.logits[:, -1, :]
            if step < floor:
                logits = logits.index_fill(-1, self._eos_t, -math.inf)
            tok = self._pick(logits, params, None if uniforms is None else uniforms[:, step])
            gen[:, step] = tok
            if step + 1 >= floor:
                finished = torch.isin(tok, self._eos_t) & ~done
                if window > 1:
                    finished |= self._stop_hits(gen, step, done | finished, stop, window)
                lengths[finished] = step + 1
                done |= finished
                if bool(done.all()):
                    break
            if step + 1 == steps:
                break
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=out.past_key_values, use_cache=True)
        return self._finish(rows, gen.tolist(), lengths.tolist(), params, stop)

    def _prefill(self, rows: list[list[int]], kept: dict):
        """Run the prompts: output (last logits, KV cache), attention mask, positions.

        With engine.enable_prefix_caching, prompt tokens whose keys and values are
        already known are not run again; causal attention makes them the same up
        to float rounding.  If every row extends a prompt of the previous call (a
        revision prompt is its critique prompt plus the critique), the rows start
        from those prompts' kept KV.  Otherwise the leading tokens all rows share
        (the few-shot examples, about three quarters of a chain prompt) run once
        at batch size 1 and their KV is repeated per row.  Layout of a row:
        [known tokens, padded to the longest | left padding | its own tokens].
        """
        hits = [self._longest_kept(r, kept) for r in rows] if kept else [None]
        cache, mask, tails = self._from_kept(rows, hits) if all(hits) else self._from_shared(rows)
        ids, tail_mask, _ = self._left_pad(tails)
        mask = torch.cat([mask, tail_mask], dim=1)
        # Positions count real tokens only, so padding anywhere leaves them as in a lone run.
        pos = (mask.cumsum(-1) - 1).clamp_(min=0)[:, -ids.shape[1]:]
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        self._keep(rows, out.past_key_values, mask)
        return out, mask, pos

    def _from_shared(self, rows: list[list[int]]):
        """(cache, mask, own tokens) after running the rows' common leading tokens once."""
        n = len(rows)
        shared = len(os.path.commonprefix(rows)) if n > 1 and self.engine_cfg.enable_prefix_caching else 0
        shared = min(shared, min(len(r) for r in rows) - 1)  # each row keeps a token for its logits
        if shared < MIN_SHARED_PREFIX:
            return None, torch.ones(n, 0, dtype=torch.long, device=self.device), rows
        head = torch.tensor([rows[0][:shared]], device=self.device)
        cache = self.model(input_ids=head, use_cache=True, logits_to_keep=1).past_key_values
        cache.batch_repeat_interleave(n)
        return cache, torch.ones(n, shared, dtype=torch.long, device=self.device), [r[shared:] for r in rows]

    def _from_kept(self, rows: list[list[int]], hits: list[tuple]):
        """(cache, mask, own tokens) starting from kept prompts, each left-padded to the widest."""
        width = max(m.shape[1] for _, m, _, _ in hits)
        layers = []
        for layer in range(len(hits[0][0])):
            keys = [F.pad(kv[layer][0][j], (0, 0, width - m.shape[1], 0)) for kv, m, j, _ in hits]
            values = [F.pad(kv[layer][1][j], (0, 0, width - m.shape[1], 0)) for kv, m, j, _ in hits]
            layers.append((torch.stack(keys), torch.stack(values)))
        mask = torch.stack([F.pad(m[j], (width - m.shape[1], 0)) for _, m, j, _ in hits])
        cache = DynamicCache(layers, config=self.model.config)
        return cache, mask, [r[n:] for r, (_, _, _, n) in zip(rows, hits)]

    @staticmethod
    def _longest_kept(row: list[int], kept: dict) -> tuple | None:
        """The longest kept prompt that ``row`` strictly extends: (kv, mask, row, length)."""
        for n in sorted(kept, reverse=True):
            hit = kept[n].get(tuple(row[:n])) if MIN_SHARED_PREFIX <= n < len(row) else None
            if hit is not None:
                return (*hit, n)
        return None

    def _keep(self, rows: list[list[int]], cache, mask: torch.Tensor) -> None:
        """Remember this chunk's prompt KV for the next call.  Decoding appends to the
        cache by concatenation, so the tensors taken here stay the prompt's."""
        layers = getattr(cache, "layers", None)
        if not self.engine_cfg.enable_prefix_caching or not layers \
                or any(type(layer) is not DynamicLayer for layer in layers):
            return  # sliding-window and other special caches are not reused
        kv = [(layer.keys, layer.values) for layer in layers]
        size = sum(t.numel() * t.element_size() for pair in kv for t in pair)
        if self._kept_bytes + size > KEEP_KV_BYTES:
            return
        self._kept_bytes += size
        for j, row in enumerate(rows):
            self._kept.setdefault(len(row), {})[tuple(row)] = (kv, mask, j)

    @staticmethod
    def _pick(logits: torch.Tensor, params: SamplingConfig, uniform: torch.Tensor | None) -> torch.Tensor:
        if uniform is None:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / params.temperature, dim=-1)
        order = None
        if params.top_p < 1:
            probs, order = probs.sort(dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always).
            probs = probs * ((probs.cumsum(-1) - probs) < params.top_p)
        cdf = probs.cumsum(-1)
        pick = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True)
        pick = pick.clamp_(max=cdf.shape[-1] - 1)
        return (pick if order is None else order.gather(-1, pick)).squeeze(-1)

    def _stop_hits(self, gen: torch.Tensor, step: int, skip: torch.Tensor, stop: list[str],
                   window: int) -> torch.Tensor:
        """Rows whose newest token completes a stop string.  Only a short tail is
        decoded: a stop string of b bytes spans at most b byte-level tokens."""
        hits = torch.zeros_like(skip)
        active = (~skip).nonzero().flatten().tolist()
        if not active:
            return hits
        tails = gen[active, max(0, step + 1 - window):step + 1].tolist()
        cur = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        prev = self.tokenizer.batch_decode([t[:-1] for t in tails], skip_special_tokens=True)
        for row, before, now in zip(active, prev, cur):
            # A dangling partial UTF-8 character decodes as U+FFFD and is not text yet.
            if find_stop(now, stop, len(before.rstrip("\ufffd"))) is not None:
                hits[row] = True
        return hits

    def _finish(self, rows, gen, lengths, params, stop) -> list[Completion]:
        eos = set(self.eos)
        bodies, ended = [], []
        for toks, n in zip(gen, lengths):
            hit_eos = n > 0 and toks[n - 1] in eos
            ended.append(hit_eos)
            bodies.append(toks[:n - 1] if hit_eos else toks[:n])
        texts = self.tokenizer.batch_decode(bodies, skip_special_tokens=True)
        floors = [0] * len(rows)
        if stop and params.min_new_tokens > 1:
            heads = [toks[:params.min_new_tokens - 1] for toks in gen]
            floors = [len(t) for t in self.tokenizer.batch_decode(heads, skip_special_tokens=True)]
        out = []
        for row, text, n, hit_eos, floor in zip(rows, texts, lengths, ended, floors):
            cut = find_stop(text, stop, floor)
            # Without a cut, drop a trailing partial UTF-8 character as vLLM's
            # incremental detokenizer does, so both backends return the same text.
            text = text[:cut] if cut is not None else text.rstrip("\ufffd")
            reason = "stop" if hit_eos or cut is not None else "length"
            out.append(Completion(text=text, prompt_tokens=len(row), completion_tokens=n, finish_reason=reason))
        return out

    def _score_batch(self, rows: list[tuple[list[int], int]]) -> list[float]:
        ids, mask, pos = self._left_pad([full for full, _ in rows])
        cont = torch.tensor([len(full) - n_prompt for full, n_prompt in rows], device=self.device)
        keep = int(cont.max()) + 1
        # Left padding puts every continuation at the end, so only the last
        # ``keep`` positions' logits are needed.
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                            logits_to_keep=keep).logits.float()
        logp = logits[:, :-1].log_softmax(-1)
        targets = ids[:, ids.shape[1] - keep + 1:]
        token_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        in_cont = torch.arange(keep - 1, device=self.device)[None, :] >= (keep - 1 - cont)[:, None]
        return torch.where(in_cont, token_lp, 0.0).sum(-1).tolist()

    def _use_adapter(self, adapter: str | None):
        """Activate ``adapter`` (a PEFT folder, loaded once) or the base weights."""
        if adapter is None:
            return self._peft.disable_adapter() if self._peft is not None else nullcontext()
        key = str(Path(adapter).expanduser().resolve())
        if key not in self._adapters:
            from peft import PeftModel

            read_adapter_config(adapter)
            name = f"adapter{len(self._adapters)}"  # module keys may not contain dots
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self.model, key, adapter_name=name).eval()
            else:
                self._peft.load_adapter(key, adapter_name=name)
            self._adapters[key] = name
        self._peft.set_adapter(self._adapters[key])
        return nullcontext()
