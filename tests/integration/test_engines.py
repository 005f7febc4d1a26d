"""The hf and vLLM engines on the tiny offline Llama.

vLLM tests share one engine (start-up is 15-40 s on CPU, longer on a busy machine).  vLLM spawns
worker processes that re-import ``__main__``; under pytest that is harmless.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig
from cai_ray.engines import make_engine
from cai_ray.tiny import build_tiny

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16, min_new_tokens=16)
PROMPTS = ["hello there", "the answer is a long one because why not", "\n\nHuman: please explain", "x"]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("engines")
    base = build_tiny(root / "base")
    chat = build_tiny(root / "chat", "chat")
    # peft initialises lora_B to zero (a no-op adapter); random B makes it bite.
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.5)
    model.save_pretrained(root / "lora")
    return SimpleNamespace(base=str(base), chat=str(chat), adapter=str(root / "lora"))


@pytest.fixture(scope="module")
def hf(tiny):
    return make_engine(ModelConfig(path=tiny.base), EngineConfig(batch_size=4))


def _ascii_pair(text: str) -> str:
    """The first two adjacent ASCII letters after the start: a stop string the
    random model really produces."""
    for i in range(2, len(text) - 1):
        if text[i:i + 2].isascii() and text[i:i + 2].isalpha():
            return text[i:i + 2]
    pytest.fail(f"no ASCII letter pair in {text!r}")


def test_batched_greedy_matches_unbatched_and_transformers(tiny, hf):
    single = make_engine(ModelConfig(path=tiny.base), EngineConfig(batch_size=1))
    batched, alone = hf.generate(PROMPTS, GREEDY), single.generate(PROMPTS, GREEDY)
    assert [c.text for c in batched] == [c.text for c in alone]
    for prompt, c in zip(PROMPTS, batched):
        ids = hf.tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            ref = hf.model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        expected = hf.tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True).rstrip("\ufffd")
        assert (c.text, c.prompt_tokens, c.completion_tokens, c.finish_reason) == \
               (expected, ids.shape[1], 16, "length")


def test_stop_string_truncates_and_ends_early(hf):
    params = SamplingConfig(temperature=0.0, max_new_tokens=30)
    full = hf.generate(PROMPTS[:1], params)[0]
    stop = _ascii_pair(full.text)
    cut = hf.generate(PROMPTS[:1], params, stop=["<never>", stop])[0]
    assert cut.text == full.text[:full.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.completion_tokens < full.completion_tokens
    # Inside the first min_new_tokens tokens a stop string does not count.
    late = SamplingConfig(temperature=0.0, max_new_tokens=30, min_new_tokens=cut.completion_tokens + 1)
    kept = hf.generate(PROMPTS[:1], late, stop=[stop])[0]
    assert kept.text.startswith(full.text[:full.text.find(stop) + len(stop)])


def test_seeded_sampling_ignores_batch_composition(tiny, hf):
    params = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=24)
    first = hf.generate(PROMPTS, params, seeds=[11, 12, 13, 14])
    pairs = make_engine(ModelConfig(path=tiny.base), EngineConfig(batch_size=2))
    mixed = pairs.generate(["another prompt", PROMPTS[2], PROMPTS[0]], params, seeds=[99, 13, 11])
    assert [mixed[1].text, mixed[2].text] == [first[2].text, first[0].text]
    reseeded = hf.generate(PROMPTS, params, seeds=[21, 22, 23, 24])
    assert [c.text for c in reseeded] != [c.text for c in first]


# Few-shot style prompts: a long common head, then row-specific tails of different lengths
# (the last row is the head plus one character).
HEAD = "\n\nHuman: name a colour\n\nAssistant: Blue is one.\n\n-----\n\nHuman: "
SHARED = [HEAD + "and a fruit?", HEAD + "why is the sky blue on a clear day", HEAD + "x", HEAD + "a"]


def test_shared_prefix_runs_once_and_changes_no_output(tiny):
    # Own engines: loading the adapter changes hf.model, which later tests read directly.
    hf = make_engine(ModelConfig(path=tiny.base), EngineConfig(batch_size=4))
    calls = []
    hook = hf.model.register_forward_pre_hook(lambda _, args, kw: calls.append(tuple(kw["input_ids"].shape)),
                                              with_kwargs=True)
    sampled = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12, min_new_tokens=12)
    try:
        together = [hf.generate(SHARED, p, seeds=[1, 2, 3, 4]) for p in (GREEDY, sampled)]
        together.append(hf.generate(SHARED, GREEDY, adapter=tiny.adapter))
    finally:
        hook.remove()
    head = len(os.path.commonprefix(hf.encode(SHARED)))
    assert head > 16 and calls[0] == (1, head) and calls[1][0] == 4 and calls[1][1] < head
    single = make_engine(ModelConfig(path=tiny.base), EngineConfig(batch_size=1))
    alone = [single.generate(SHARED, p, seeds=[1, 2, 3, 4]) for p in (GREEDY, sampled)]
    alone.append(single.generate(SHARED, GREEDY, adapter=tiny.adapter))
    assert together == alone


def _first_logits(engine, calls: list) -> object:
    """A hook keeping (input shape, last-position logits) of every forward call."""
    def hook(_, args, kw, out):
        calls.append((tuple(kw["input_ids"].shape), out.logits[:, -1].clone()))
    return engine.model.register_forward_hook(hook, with_kwargs=True)


def test_prompts_extending_the_last_call_reuse_its_kv(tiny):
    # A chain's revision prompt is its critique prompt plus the critique: only the new
    # tokens run, with the logits and text of an engine that caches nothing.
    engines = {c: make_engine(ModelConfig(path=tiny.base), EngineConfig(batch_size=4, enable_prefix_caching=c))
               for c in (True, False)}
    first = [c.text for c in engines[False].generate(SHARED, GREEDY)]
    longer = [p + t + "\n\nRevisionRequest: shorter please" for p, t in zip(SHARED, first)]
    sampled = SamplingConfig(temperature=1.0, max_new_tokens=12, min_new_tokens=12)
    for adapter in (None, tiny.adapter):
        got, want = [], []
        engines[True].generate(SHARED, GREEDY)  # base weights, also before the adapter run
        for engine, calls in ((engines[True], got), (engines[False], want)):
            hook = _first_logits(engine, calls)
            try:
                texts = engine.generate(longer, sampled, seeds=[5, 6, 7, 8], adapter=adapter)
            finally:
                hook.remove()
            assert texts == engines[False].generate(longer, sampled, seeds=[5, 6, 7, 8], adapter=adapter)
        new_tokens = max(len(b) - len(a) for a, b in zip(engines[True].encode(SHARED),
                                                         engines[True].encode(longer)))
        if adapter is None:  # no prefix pass: every row continued its old prompt
            assert got[0][0] == (4, new_tokens) and want[0][0][1] > 3 * new_tokens
        else:  # KV from the base weights is not reused under an adapter
            assert got[0][0][0] == 1
        assert torch.allclose(got[-12][1], want[-12][1], atol=1e-5)


def test_overlong_prompt_becomes_error_row(hf):
    rows = hf.generate(["hello", "the " * 3000, "", "x"], GREEDY)
    assert [r.finish_reason for r in rows] == ["length", "error", "error", "length"]
    assert "3001 tokens; context is 2048" in rows[1].error and "empty" in rows[2].error
    assert [rows[0].text, rows[3].text] == [c.text for c in hf.generate(["hello", "x"], GREEDY)]


def test_score_equals_manual_log_probs(hf):
    prompts, conts = ["the answer is", "hello ", "Human: why"], [" yes", "there friend", "?"]
    got = hf.score(prompts, conts)
    for p, c, value in zip(prompts, conts, got):
        head = p.rstrip()  # documented boundary: trailing spaces belong to the continuation
        n_prompt = len(hf.tokenizer(head).input_ids)
        full = hf.tokenizer(head + p[len(head):] + c, return_tensors="pt").input_ids
        with torch.inference_mode():
            logp = hf.model(full).logits[0].log_softmax(-1)
        manual = sum(logp[j - 1, full[0, j]].item() for j in range(n_prompt, full.shape[1]))
        assert value == pytest.approx(manual, abs=1e-4)
    assert math.isnan(hf.score([""], ["x"])[0])


def test_bad_model_path_is_one_line_error(tmp_path):
    missing = tmp_path / "no_model"
    with pytest.raises(ValueError, match=f"model.path={missing}: no such folder") as err:
        make_engine(ModelConfig(path=str(missing)), EngineConfig())
    assert "\n" not in str(err.value)


def test_chat_format_needs_a_template(tiny, hf):
    chat = make_engine(ModelConfig(path=tiny.chat, role="instruct"), EngineConfig())
    text = chat.chat_format([{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}])
    assert text == "<|system|>be kind<|end|><|user|>hi<|end|><|assistant|>"
    with pytest.raises(ValueError, match="has no chat template"):
        hf.chat_format([{"role": "user", "content": "hi"}])


def test_lora_adapter_switches_on_and_off(tiny, hf):
    base = [c.text for c in hf.generate(PROMPTS, GREEDY)]
    tuned = [c.text for c in hf.generate(PROMPTS, GREEDY, adapter=tiny.adapter)]
    assert tuned != base
    assert [c.text for c in hf.generate(PROMPTS, GREEDY)] == base
    assert hf.score(["hello"], [" there"], adapter=tiny.adapter) != hf.score(["hello"], [" there"])
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        hf.generate(PROMPTS, GREEDY, adapter=tiny.base)


def test_engines_are_sized_for_the_unit_holding_them(tiny):
    # Two engines in an actor holding half a GPU: a quarter of gpu_memory_utilization each; no
    # adapter served: LoRA off (vLLM then starts without it).
    engine = make_engine(ModelConfig(path=tiny.base), EngineConfig(gpu_memory_utilization=0.8),
                         lora=False, share=0.5, engines=2)
    assert engine.engine_cfg.max_lora_rank == 0
    assert engine.engine_cfg.gpu_memory_utilization == pytest.approx(0.2)
    engine.close()
    assert engine.model is None


def test_hf_backend_never_imports_vllm(tiny):
    code = ("import sys; from cai_ray.config import *; from cai_ray.engines import make_engine; "
            f"make_engine(ModelConfig(path={tiny.base!r}), EngineConfig()); "
            "assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_pinned_revision_reaches_the_evaluate_arm_engine(tiny, tmp_path):
    """A hub id whose only snapshot is the revision ``v1`` (an offline hub cache built here):
    loading it needs model.revision, so an arm's engine that dropped it would fail to start."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--cai--tiny"
    shutil.copytree(tiny.base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text(commit)
    code = f"""
import pandas as pd
from cai_ray.config import EngineConfig, ModelConfig, load_config
from cai_ray.engines import make_engine
from cai_ray.evaluation.arms import ArmGenerator, resolve_arms
cfg = load_config(None, ["model.path=cai/tiny", "model.revision=v1", "output_dir={tmp_path / 'out'}",
                         "evaluate.sampling.max_new_tokens=4", "evaluate.arms=[{{name: base}}, {{name: other}}]"])
arms = resolve_arms(cfg)
assert arms["base"]["revision"] == "v1", arms
actor = ArmGenerator(cfg, arms)  # one engine for both arms of the pinned model
batch = pd.DataFrame({{"prompt": ["hi", "hello"], "seed": [1, 2], "arm": ["base", "other"]}})
out = actor(batch)
assert list(out["finish_reason"]) == ["length", "length"] and out["engine"].nunique() == 1, out
try:
    make_engine(ModelConfig(path="cai/tiny"), EngineConfig())
except ValueError as exc:
    print("unpinned:", exc)
"""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "unpinned: model.path=cai/tiny: no such folder and not a hub id available offline" in done.stdout


# -- vLLM ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine(tiny):
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install skips just like a missing one
        pytest.skip(f"vllm is not importable: {type(exc).__name__}: {exc}")
    engine = make_engine(ModelConfig(path=tiny.base),
                         EngineConfig(backend="vllm", max_lora_rank=8, enforce_eager=True))
    yield engine
    engine.close()


@pytest.mark.vllm
def test_vllm_greedy_matches_hf(hf, vllm_engine):
    free = SamplingConfig(temperature=0.0, max_new_tokens=30)
    prompts = PROMPTS + SHARED + ["the " * 3000]
    for params in (GREEDY, free):
        want = hf.generate(prompts, params)
        got = vllm_engine.generate(prompts, params)
        assert got[:-1] == want[:-1]
        assert got[-1].finish_reason == "error" and "3001 tokens" in got[-1].error
    stop = [_ascii_pair(want[0].text)]
    cut = hf.generate(PROMPTS, free, stop=stop)
    assert vllm_engine.generate(PROMPTS, free, stop=stop) == cut
    # Same rule for stop strings inside the first min_new_tokens tokens.
    late = SamplingConfig(temperature=0.0, max_new_tokens=30, min_new_tokens=cut[0].completion_tokens + 1)
    assert vllm_engine.generate(PROMPTS, late, stop=stop) == hf.generate(PROMPTS, late, stop=stop)


@pytest.mark.vllm
def test_vllm_score_matches_hf(hf, vllm_engine):
    prompts, conts = ["the answer is", "hello ", "Human: why"], [" yes", "there friend", "?"]
    want = hf.score(prompts, conts)
    for _ in range(2):  # the second pass meets a warm prefix cache
        assert vllm_engine.score(prompts, conts) == pytest.approx(want, abs=1e-3)


@pytest.mark.vllm
def test_vllm_lora_matches_hf(tiny, hf, vllm_engine):
    want = hf.generate(PROMPTS, GREEDY, adapter=tiny.adapter)
    assert vllm_engine.generate(PROMPTS, GREEDY, adapter=tiny.adapter) == want
    assert vllm_engine.generate(PROMPTS, GREEDY) == hf.generate(PROMPTS, GREEDY)
    prompts, conts = ["the answer is", "hello "], [" yes", "there friend"]
    assert vllm_engine.score(prompts, conts, adapter=tiny.adapter) == \
           pytest.approx(hf.score(prompts, conts, adapter=tiny.adapter), abs=1e-3)


# -- async entry point -------------------------------------------------------------

LONG, SHORT = (SamplingConfig(temperature=0.0, max_new_tokens=n, min_new_tokens=n) for n in (48, 2))


async def _finish_order(engine) -> list[str]:
    """A long request, then a short one, in flight together: which finished first."""
    order = []

    async def ask(name, params):
        await engine.agenerate(PROMPTS[:1], params)
        order.append(name)

    await asyncio.gather(ask("long", LONG), ask("short", SHORT))
    return order


def test_hf_agenerate_merges_concurrent_rows_into_one_call(hf):
    calls = []
    generate = hf.generate
    hf.generate = lambda prompts, *a, **kw: calls.append(len(prompts)) or generate(prompts, *a, **kw)
    try:
        async def rows():
            return await asyncio.gather(*(hf.agenerate([p], GREEDY) for p in PROMPTS))

        got = [c for (c,) in asyncio.run(rows())]
        order = asyncio.run(_finish_order(hf))
    finally:
        del hf.generate
    assert calls[0] == len(PROMPTS) and got == hf.generate(PROMPTS, GREEDY)
    # Calls run one at a time, in the order they were asked for.
    assert order == ["long", "short"] and calls[1:] == [1, 1]


@pytest.mark.vllm
def test_vllm_agenerate_rows_finish_on_their_own(hf, vllm_engine):
    sampled = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=12)

    async def rows():
        return await asyncio.gather(*(vllm_engine.agenerate([p], sampled, seeds=[7 + i])
                                      for i, p in enumerate(PROMPTS)))

    # One request per row gives what one batch call gives, sampled rows included (per-row seeds).
    assert [c for (c,) in asyncio.run(rows())] == vllm_engine.generate(PROMPTS, sampled, seeds=[7, 8, 9, 10])
    assert vllm_engine.generate(PROMPTS, GREEDY) == hf.generate(PROMPTS, GREEDY)
    # Continuous batching: the short request joined the long one's batch and left it first.
    assert asyncio.run(_finish_order(vllm_engine)) == ["short", "long"]


@pytest.mark.vllm
def test_vllm_feedback_scores_match_hf_to_1e4(tiny, hf, vllm_engine):
    """The label stage's multiple-choice scores: few-shot comparison prompts, `` (A)`` / `` (B)``,
    on the base weights and under a LoRA adapter (the SL-CAI feedback model)."""
    from cai_ray.constitution import load_constitution
    from cai_ray.constitution.feedback import OPTIONS, comparison_prompt

    questions = load_constitution("default").comparisons
    prompts = [comparison_prompt(f"How should I handle problem {i}?", f"Talk it through, step {i}.", "Go away.",
                                 questions[i], k) for i, k in enumerate((0, 1, 2, 4))]
    texts, options = [p for p in prompts for _ in OPTIONS], list(OPTIONS) * len(prompts)
    for adapter in (None, tiny.adapter):
        want = hf.score(texts, options, adapter=adapter)
        assert vllm_engine.score(texts, options, adapter=adapter) == pytest.approx(want, abs=1e-4)
