"""The chain over a batch, with a fake engine (pure prompt logic, no model)."""

import asyncio

from cai_ray.config import SamplingConfig
from cai_ray.constitution import HELPFUL_EXAMPLES, load_constitution
from cai_ray.constitution.chain import helpful_replies_async, row_seed, run_chains, run_chains_async
from cai_ray.engines import Completion
from cai_ray.engines.base import BatchCalls


class Echo(BatchCalls):
    """Answers each prompt with a tag naming the step it was asked for; fails on 'FAIL'.

    A prompt whose request contains 'SILENT@<marker>' gets an empty reply (EOS at once) at the
    step ending in that marker, 'LONG@<marker>' a reply cut at max_new_tokens."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, seeds=None, stop=None, adapter=None):
        self.calls.append((list(prompts), list(seeds)))
        out = []
        for p, s in zip(prompts, seeds):
            step = p.rsplit("\n\n", 1)[-1].rstrip(":")
            if "FAIL" in p and p.endswith("Critique:"):
                out.append(Completion("", 5, 0, "error", "prompt has 9999 tokens; context is 2048"))
            elif f"SILENT@{step}" in p:
                out.append(Completion("", 5, 1, "stop"))
            elif f"LONG@{step}" in p:
                out.append(Completion(f" {step} goes on and", 5, 4, "length"))
            else:
                out.append(Completion(f" {step} #{s % 1000}\n\nHuman: leaked", 5, 3, "stop"))
        return out


def test_one_generate_call_per_step_and_every_revision_kept():
    engine, const = Echo(), load_constitution("default")
    rows = run_chains(engine, [{"id": "a", "prompt": "p1"}, {"id": "b", "prompt": "p2"}], const,
                      rounds=2, few_shot=1, params=SamplingConfig(), seed=0)
    assert len(engine.calls) == 1 + 2 * 2          # batched: initial + 2 x (critique, revision)
    row = rows[0]
    assert row["initial"].startswith("Assistant #")  # cleaned: leaked turn cut, space stripped
    assert [r["revision"].split()[0] for r in row["rounds"]] == ["Revision", "Revision"]
    assert row["final"] == row["rounds"][-1]["revision"]
    assert row["completion_tokens"] == 5 * 3 and row["error"] is None
    # Round 2 critiques the round-1 revision, not the initial reply.
    round2_critique_prompt = engine.calls[3][0][0]
    assert row["rounds"][0]["revision"] in round2_critique_prompt.rsplit("=====", 1)[-1]


def test_failed_row_keeps_its_error_and_others_go_on():
    engine, const = Echo(), load_constitution("default")
    rows = run_chains(engine, [{"id": "a", "prompt": "FAIL"}, {"id": "b", "prompt": "ok"}], const,
                      rounds=1, few_shot=0, params=SamplingConfig(), seed=0)
    assert rows[0]["error"].startswith("critique (round 1): prompt has 9999 tokens")
    assert rows[0]["final"] is None
    assert [(r["critique_finish"], r["revision_finish"]) for r in rows[0]["rounds"]] == [("error", None)]
    assert rows[1]["error"] is None and rows[1]["final"]
    assert len(engine.calls[2][0]) == 1             # the failed row sat out the revision


def test_seeds_and_principles_depend_on_id_not_batch():
    const = Echo(), load_constitution("default")
    solo = run_chains(Echo(), [{"id": "b", "prompt": "p"}], const[1], 2, 0, SamplingConfig(), 7)
    pair = run_chains(Echo(), [{"id": "a", "prompt": "q"}, {"id": "b", "prompt": "p"}], const[1], 2, 0,
                      SamplingConfig(), 7)
    assert solo[0] == pair[1]
    assert row_seed(0, "b", "initial") != row_seed(0, "b", "critique", 1) != row_seed(1, "b", "critique", 1)


def test_every_step_records_its_finish():
    rows = run_chains(Echo(), [{"id": "a", "prompt": "ok"}, {"id": "b", "prompt": "LONG@Critique"}],
                      load_constitution("default"), rounds=2, few_shot=0, params=SamplingConfig(), seed=0)
    assert rows[0]["initial_finish"] == "stop" and rows[0]["purpose"] == "harm"
    assert [(r["critique_finish"], r["revision_finish"]) for r in rows[0]["rounds"]] == [("stop", "stop")] * 2
    # A cut critique still has text: the chain goes on, and the cut is on record.
    assert [(r["critique_finish"], r["revision_finish"]) for r in rows[1]["rounds"]] == [("length", "stop")] * 2
    assert rows[1]["final"] == rows[1]["rounds"][-1]["revision"]


def test_an_empty_step_ends_the_row_without_an_error():
    engine = Echo()
    prompts = [{"id": "a", "prompt": "SILENT@Assistant"}, {"id": "b", "prompt": "SILENT@Revision"},
               {"id": "c", "prompt": "fine"}]
    rows = run_chains(engine, prompts, load_constitution("default"), rounds=2, few_shot=0,
                      params=SamplingConfig(), seed=0)
    silent, no_revision, fine = rows
    assert (silent["initial"], silent["initial_finish"], silent["rounds"], silent["final"]) == ("", "empty", [], None)
    assert [(r["critique_finish"], r["revision_finish"]) for r in no_revision["rounds"]] == [("stop", "empty")]
    assert no_revision["final"] is None and no_revision["error"] is None and silent["error"] is None
    assert fine["final"] and len(fine["rounds"]) == 2
    # Ended rows are not sent to later steps.
    assert [len(prompts) for prompts, _ in engine.calls] == [3, 2, 2, 1, 1]


def test_helpful_replies_one_call_after_benign_demos():
    engine = Echo()
    rows = asyncio.run(helpful_replies_async(engine, [{"id": "h", "prompt": "How do I boil an egg?"},
                                                      {"id": "e", "prompt": "SILENT@Assistant"},
                                                      {"id": "l", "prompt": "LONG@Assistant"}], 1, SamplingConfig()))
    (prompts, seeds), = engine.calls
    assert prompts[0].startswith(f"\n\nHuman: {HELPFUL_EXAMPLES[0].prompt}") and "Critique" not in prompts[0]
    assert seeds[0] == row_seed(0, "h", "helpful")
    ok, empty, cut = rows
    assert ok["purpose"] == "helpful" and ok["rounds"] == [] and ok["final"] == ok["initial"] == "Assistant #" + \
        str(seeds[0] % 1000)
    assert (empty["initial_finish"], empty["final"]) == ("empty", None)
    assert cut["initial_finish"] == "length" and cut["final"] == "Assistant goes on and"


class Streaming:
    """A continuously batching fake: every row is its own request and ends after its own delay
    (rows whose prompt contains 'SLOW' take longer), as vLLM's async engine serves them."""

    def __init__(self):
        self.ended = []

    async def agenerate(self, prompts, params, seeds=None, stop=None, adapter=None):
        (prompt,) = prompts
        await asyncio.sleep(0.2 if "SLOW" in prompt else 0.001)
        out = Echo().generate(prompts, params, seeds, stop)
        self.ended.append(("SLOW" in prompt, prompt.rsplit("\n\n", 1)[-1]))
        return out


def test_rows_move_through_the_steps_without_waiting_for_the_batch():
    prompts = [{"id": "s", "prompt": "SLOW one"}, {"id": "f", "prompt": "fast one"},
               {"id": "g", "prompt": "fast two"}]
    const, params = load_constitution("default"), SamplingConfig()
    engine = Streaming()
    rows = asyncio.run(run_chains_async(engine, prompts, const, 2, 1, params, 3))
    # Both fast rows ran all five steps while the slow row was still in its first.
    first_slow = next(k for k, (slow, _) in enumerate(engine.ended) if slow)
    assert first_slow == 10 and [step for _, step in engine.ended[:10]].count("Revision:") == 4
    # The same rows, field for field, as one batch call per step.
    assert rows == run_chains(Echo(), prompts, const, 2, 1, params, 3)


def test_batch_calls_merge_concurrent_requests_that_agree():
    engine, greedy = Echo(), SamplingConfig(temperature=0.0)

    async def main():
        return await asyncio.gather(
            engine.agenerate(["a\n\nX:"], SamplingConfig(seed=5)),           # positional seed 5
            engine.agenerate(["b\n\nX:", "c\n\nX:"], SamplingConfig(seed=5)),  # seeds 5 and 6, not 6 and 7
            engine.agenerate(["d\n\nX:"], greedy),                             # other sampling: own call
            engine.agenerate(["e\n\nX:"], SamplingConfig(seed=5), stop=["!"]))  # other stop: own call

    a, bc, d, e = asyncio.run(main())
    assert engine.calls == [(["a\n\nX:", "b\n\nX:", "c\n\nX:"], [5, 5, 6]), (["d\n\nX:"], [0]),
                            (["e\n\nX:"], [5])]
    assert [c.text for c in a + bc + d + e] == [" X #5\n\nHuman: leaked", " X #5\n\nHuman: leaked",
                                                " X #6\n\nHuman: leaked", " X #0\n\nHuman: leaked",
                                                " X #5\n\nHuman: leaked"]


def test_a_failed_batch_call_fails_its_callers_only():
    class Broken(Echo):
        def generate(self, prompts, params, seeds=None, stop=None, adapter=None):
            if any("boom" in p for p in prompts):
                raise RuntimeError("engine fell over")
            return super().generate(prompts, params, seeds, stop, adapter)

    engine = Broken()

    async def main():
        return await asyncio.gather(engine.agenerate(["boom\n\nX:"], SamplingConfig()),
                                    engine.agenerate(["fine\n\nX:"], SamplingConfig(), stop=["!"]),
                                    return_exceptions=True)

    failed, ok = asyncio.run(main())
    assert isinstance(failed, RuntimeError) and ok[0].finish_reason == "stop"
    # A later call on a fresh event loop starts from an empty queue.
    assert asyncio.run(engine.agenerate(["again\n\nX:"], SamplingConfig()))[0].text.startswith(" X #")


def test_batch_calls_take_whole_chunks_and_leave_the_rest_for_the_next_call():
    engine = Echo()
    engine.call_chunk = 2  # generate() runs 2 rows at a time: 5 waiting rows go as 4, then 1

    async def main():
        return await asyncio.gather(*(engine.agenerate([f"{i}\n\nX:"], SamplingConfig(), seeds=[i]) for i in range(5)))

    outs = asyncio.run(main())
    assert [prompts for prompts, _ in engine.calls] == [[f"{i}\n\nX:" for i in range(4)], ["4\n\nX:"]]
    assert [c.text for (c,) in outs] == [f" X #{i}\n\nHuman: leaked" for i in range(5)]
