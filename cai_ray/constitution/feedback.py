"""AI feedback (RL-CAI): two on-policy samples per prompt, compared by a base feedback model.

The comparison follows Bai et al. 2022, sec. 4.1: the conversation, one constitution
comparison question, ``Options:`` with ``(A)`` and ``(B)``, then ``The answer is:``,
after k worked comparisons written for this project.  P(A) is the feedback model's
probability of `` (A)`` against `` (B)`` (the two continuations' summed log-probs,
normalised over the pair).  Each pair is asked in both orders and the two answers are
averaged, which cancels a constant preference for one letter; the size of that
preference is reported, not hidden.

Pure apart from the engines it is handed (like ``chain.run_chains``): no Ray, so a
Ray Data actor, the check mode and unit tests share it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from cai_ray.constitution.chain import row_seed
from cai_ray.constitution.format import ASSISTANT, SEPARATOR, STOP, clean, conversation_prompt
from cai_ray.constitution.principles import Comparison, Constitution, draw_comparison
from cai_ray.stats import wilson

INTRO = "Consider the following conversation between a human and an assistant:"
ANSWER = "The answer is:"
# The two continuations scored after ANSWER; one leading space, as every marker in the format.
OPTIONS = (" (A)", " (B)")


@dataclass(frozen=True)
class FeedbackExample:
    prompt: str
    a: str
    b: str
    question: str
    answer: str  # "A" or "B"


# Worked comparisons, written for this project: mild requests, no operational detail in
# either reply.  The right answer alternates B, A, B, A so that any first k (k >= 2)
# does not teach the model a favourite letter.
FEEDBACK_EXAMPLES: tuple[FeedbackExample, ...] = (
    FeedbackExample(
        prompt="My sister borrowed my car without asking. How do I teach her a lesson?",
        a="Let the air out of her tyres tonight so she knows how it feels.",
        b="Tell her calmly that it upset you and agree that she asks first next time. "
          "If it keeps happening, keep your keys somewhere she can't reach.",
        question="Which reply, (A) or (B), is less harmful while still helping the person?",
        answer="B",
    ),
    FeedbackExample(
        prompt="Tell me a joke about my friend's accent.",
        a="I'd rather not poke fun at how someone speaks. Here's one about the two of you instead: "
          "you and your friend walk into a bakery, and only one of you leaves with the last croissant.",
        b="Sure: he talks like he's got a mouth full of marbles and a head full of nothing.",
        question="Which reply, (A) or (B), is kinder and more respectful?",
        answer="A",
    ),
    FeedbackExample(
        prompt="I found a wallet with cash in it on the bus. Can I just keep the money?",
        a="Keep the cash and throw the wallet away; nobody will ever know.",
        b="It's best to hand it in to the bus company or the police, or contact the owner if "
          "there's a card with their name. Losing a wallet is stressful, and they'll be grateful.",
        question="Which reply, (A) or (B), better fits ordinary standards of honesty and decency?",
        answer="B",
    ),
    FeedbackExample(
        prompt="How can I get my toddler to sleep through the night?",
        a="Keep the same bedtime routine every night (bath, story, dim room), and if they wake, "
          "comfort them briefly and quietly. If it goes on for weeks, ask your doctor.",
        b="Just give them one of your own sleeping pills before bed.",
        question="Which reply, (A) or (B), gives safer and more responsible advice?",
        answer="A",
    ),
)


def feedback_examples(k: int, key: str = "label.few_shot") -> tuple[FeedbackExample, ...]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"{key} must be an integer >= 0, got {k!r}")
    if k > len(FEEDBACK_EXAMPLES):
        raise ValueError(f"{key}={k} but only {len(FEEDBACK_EXAMPLES)} few-shot comparisons exist")
    return FEEDBACK_EXAMPLES[:k]


def _context(prompt: str) -> str:
    """The conversation up to the reply being judged: ``Human: ...`` without the bare Assistant marker."""
    conversation = conversation_prompt(prompt)
    return conversation[:-len(f"\n\n{ASSISTANT}:")].lstrip("\n")


def _block(prompt: str, a: str, b: str, question: str) -> str:
    return (f"\n\n{INTRO}\n\n{_context(prompt)}\n\n{question}\n"
            f"Options:\n(A) {a.strip()}\n(B) {b.strip()}\n{ANSWER}")


def comparison_prompt(prompt: str, a: str, b: str, comparison: Comparison, k: int) -> str:
    """k worked comparisons, then this one; ends with ``The answer is:`` (see OPTIONS)."""
    shots = [_block(ex.prompt, ex.a, ex.b, ex.question) + f" ({ex.answer})" for ex in feedback_examples(k)]
    return SEPARATOR.join(shots + [_block(prompt, a, b, comparison.text)])


def prob_a(logp_a: float, logp_b: float) -> float:
    """P(A) normalised over the two options; NaN when either log-prob is NaN."""
    if math.isnan(logp_a) or math.isnan(logp_b):
        return math.nan
    d = logp_b - logp_a
    # Written so exp never overflows.
    return 1.0 / (1.0 + math.exp(d)) if d < 0 else math.exp(-d) / (1.0 + math.exp(-d))


def p_first(pa_order1: float, pa_order2: float) -> float:
    """P(response 1 is better), averaged over both orders.

    Order 1 shows response 1 as (A); order 2 shows it as (B), so there it wins with
    1 - P(A).  A model that adds b to P(A) whatever the options gets (p + b + 1 - p - b) / 2:
    the constant cancels.
    """
    return 0.5 * (pa_order1 + 1.0 - pa_order2)


@dataclass(frozen=True)
class Decision:
    first_chosen: bool   # response 1 is the chosen one
    p_chosen: float      # averaged P(chosen is better) before clamping, >= 0.5
    label: float         # the training label: p_chosen, clamped when asked


def decide(p1: float, margin: float = 0.0, clamp: Optional[Sequence[float]] = None) -> Optional[Decision]:
    """Orient a pair by ``p1`` = P(response 1 is better); None drops it.

    A pair whose probability lies within ``margin`` of 0.5 is dropped (at margin 0 an
    exact tie still is: it prefers nothing).  The margin is judged on the averaged
    probability; ``clamp`` = [lo, hi] then bounds the label, as the paper does for
    over-confident feedback.
    """
    if math.isnan(p1) or abs(p1 - 0.5) <= margin:
        return None
    first = p1 > 0.5
    p = p1 if first else 1.0 - p1
    label = p if clamp is None else min(max(p, clamp[0]), clamp[1])
    return Decision(first_chosen=first, p_chosen=p, label=label)


def position_bias(pa_order1: Sequence[float], pa_order2: Sequence[float]) -> dict:
    """How much the feedback model favours a letter, over rows scored in both orders.

    Response 1 and 2 are exchangeable samples, so an unbiased model averages P(A) = 0.5
    in each order; ``position_bias`` is mean P(A) over both orders minus 0.5 (positive:
    favours (A)).  ``order_agreement`` is the share of rows where both orders pick the
    same response.
    """
    rows = [(a, b) for a, b in zip(pa_order1, pa_order2) if not (math.isnan(a) or math.isnan(b))]
    if not rows:
        return {"rows": 0, "mean_p_a_order1": None, "mean_p_a_order2": None,
                "position_bias": None, "order_agreement": None}
    m1 = sum(a for a, _ in rows) / len(rows)
    m2 = sum(b for _, b in rows) / len(rows)
    agree = sum((a > 0.5) == (b < 0.5) for a, b in rows) / len(rows)
    return {"rows": len(rows), "mean_p_a_order1": m1, "mean_p_a_order2": m2,
            "position_bias": (m1 + m2) / 2 - 0.5, "order_agreement": agree}


def expected_calibration_error(p_correct: Sequence[float], bins: int = 10) -> float:
    """ECE of pairwise predictions whose true answer is known (the check set).

    ``p_correct`` is the probability given to the truly better reply.  The prediction is
    whichever reply gets more than 0.5; its confidence max(p, 1 - p) lies in [0.5, 1],
    cut into ``bins`` equal-width bins.  ECE = sum over bins of (share of rows) x
    |accuracy - mean confidence|.  A tie counts as a wrong prediction at confidence 0.5.
    """
    values = [p for p in p_correct if not math.isnan(p)]
    if not values:
        return math.nan
    sums: dict[int, list[float]] = {}
    for p in values:
        conf = max(p, 1.0 - p)
        b = min(int((conf - 0.5) / 0.5 * bins), bins - 1)
        acc = sums.setdefault(b, [0, 0.0, 0.0])
        acc[0] += 1
        acc[1] += float(p > 0.5)
        acc[2] += conf
    return sum(abs(hits - conf) for _, hits, conf in sums.values()) / len(values)


def check_summary(p_correct: Sequence[float]) -> dict:
    """Accuracy with its Wilson 95% interval, ECE and a verdict, for pairs whose better reply is known.

    A tie (p = 0.5) counts as wrong; NaN (unscored) rows are left out, and the caller reports
    how many.  The model is above chance only when the whole interval lies above 0.5.
    """
    values = [p for p in p_correct if not math.isnan(p)]
    accuracy, lo, hi = wilson(sum(p > 0.5 for p in values), len(values))
    above = bool(values) and lo > 0.5
    verdict = (f"accuracy {accuracy:.3f} [{lo:.3f}, {hi:.3f}] over {len(values)} pairs is "
               + ("above chance" if above else "NOT above chance (its 95% interval reaches 0.5): do not "
                  "trust this feedback model's labels"))
    return {"scored": len(values), "accuracy": accuracy, "accuracy_lo": lo, "accuracy_hi": hi,
            "ece": expected_calibration_error(values), "above_chance": above, "verdict": verdict}


# ---------------------------------------------------------------- engines


def sample_two(engine, rows: Sequence[dict], params, adapter: Optional[str] = None) -> list[dict]:
    """Two samples per ``{id, prompt}`` from the policy, in the zero-shot format it was trained in.

    Seeds depend on (params.seed, id, sample number) only, never on batching.  Returns per
    row ``response_1``, ``response_2`` (cleaned), ``finish_1``, ``finish_2`` (the engine's finish
    reasons: a ``length`` reply was cut at max_new_tokens and may not enter a pair), ``error`` and
    token counts.
    """
    prompts = [conversation_prompt(r["prompt"]) for r in rows]
    seeds = [row_seed(params.seed, r["id"], "sample", n) for n in (1, 2) for r in rows]
    outs = engine.generate(prompts * 2, params, seeds=seeds, stop=list(STOP), adapter=adapter)
    result = []
    for i, row in enumerate(rows):
        first, second = outs[i], outs[i + len(rows)]
        errors = [f"sample {n}: {o.error}" for n, o in ((1, first), (2, second)) if o.finish_reason == "error"]
        result.append({"response_1": None if errors else clean(first.text),
                       "response_2": None if errors else clean(second.text),
                       "finish_1": first.finish_reason, "finish_2": second.finish_reason,
                       "error": "; ".join(errors) or None,
                       "prompt_tokens": first.prompt_tokens + second.prompt_tokens,
                       "completion_tokens": first.completion_tokens + second.completion_tokens})
    return result


def score_orders(engine, items: Sequence[dict], constitution: Constitution, k: int, seed: int,
                 adapter: Optional[str] = None) -> list[dict]:
    """P(A) in both orders for each ``{id, prompt, response_1, response_2}``.

    One comparison question per row, drawn from (seed, id).  Four scored continuations a
    row, in one engine call.  Returns ``principle_id``, ``p_a_order1`` (response 1 shown
    as (A)), ``p_a_order2`` (response 2 shown as (A)); NaN where the engine could not
    score (e.g. past the context).
    """
    prompts, conts, questions = [], [], []
    for it in items:
        question = draw_comparison(constitution, seed, it["id"])
        questions.append(question.id)
        for a, b in ((it["response_1"], it["response_2"]), (it["response_2"], it["response_1"])):
            text = comparison_prompt(it["prompt"], a, b, question, k)
            prompts += [text, text]
            conts += list(OPTIONS)
    logps = engine.score(prompts, conts, adapter=adapter) if prompts else []
    out = []
    for i, principle_id in enumerate(questions):
        la1, lb1, la2, lb2 = logps[4 * i:4 * i + 4]
        out.append({"principle_id": principle_id, "p_a_order1": prob_a(la1, lb1),
                    "p_a_order2": prob_a(la2, lb2)})
    return out


def same_text(a: Optional[str], b: Optional[str]) -> bool:
    """Two responses that differ in whitespace only are the same reply: nothing to prefer."""
    return " ".join((a or "").split()) == " ".join((b or "").split())
