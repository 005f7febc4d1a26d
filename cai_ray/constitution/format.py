"""Base-model prompt format for the critique/revision chain.

A conversation is ``\\n\\nHuman: {prompt}\\n\\nAssistant: {response}``; the chain
adds ``CritiqueRequest``/``Critique`` and ``RevisionRequest``/``Revision`` turns.
Few-shot examples come first, each a full chain, separated by ``SEPARATOR`` so
the model reads them as separate dialogues rather than earlier turns of the
current one.

Leading-space convention: a prompt always ends with the bare marker (e.g.
``Assistant:``) and the text that follows starts with exactly one space.  BPE
tokenizers fold that space into the first word's token, so a prompt ending in
a space would put the model at a boundary it rarely saw in training.  The model
therefore generates `` Sure, ...``; ``clean`` strips the space, and every
builder puts exactly one back, so training text and generated text match.
"""

from __future__ import annotations

import re

from cai_ray.constitution.fewshot import EXAMPLES, HELPFUL_EXAMPLES, FewShotExample
from cai_ray.constitution.principles import Principle

HUMAN, ASSISTANT = "Human", "Assistant"
CRITIQUE_REQUEST, CRITIQUE = "CritiqueRequest", "Critique"
REVISION_REQUEST, REVISION = "RevisionRequest", "Revision"
ROLES = (HUMAN, ASSISTANT, CRITIQUE_REQUEST, CRITIQUE, REVISION_REQUEST, REVISION)
SEPARATOR = "\n\n====="

# No marker can legitimately appear inside any step's output, so every step
# stops on all of them (and on the example separator).
STOP = tuple(f"\n\n{role}:" for role in ROLES) + (SEPARATOR,)
STEPS = ("initial", "critique", "revision", "helpful")

# A leak the stop strings miss: a marker at a line start after a single
# newline (or at the very start), or the separator line.
_LEAK = re.compile(r"^[ \t]*(?:(?:%s)[ \t]*:|=====)" % "|".join(ROLES), re.MULTILINE)


def stops_for(step: str) -> list[str]:
    if step not in STEPS:
        raise ValueError(f"unknown generation step {step!r}; expected one of {', '.join(STEPS)}")
    return list(STOP)


def clean(text: str) -> str:
    """Cut generated text at the first leaked role marker and strip whitespace."""
    match = _LEAK.search(text)
    return (text[: match.start()] if match else text).strip()


def spaced(text: str | None) -> str:
    """Text as it follows a marker: one leading space, or nothing if empty."""
    body = (text or "").strip()
    return f" {body}" if body else ""


def _turn(role: str, text: str | None = None) -> str:
    # An absent or empty text leaves the bare marker: the model writes next.
    return f"\n\n{role}:" + spaced(text)


def conversation_prompt(prompt: str) -> str:
    """``\\n\\nHuman: {prompt}\\n\\nAssistant:`` — the one prompt format for generation, SFT and pairs.

    A prompt that already is a formatted conversation prefix (hh-rlhf with
    ``data.hh_mode=prefix``) is kept as it is rather than wrapped twice.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be non-empty text")
    if prompt.startswith(f"\n\n{HUMAN}:") and prompt.endswith(f"\n\n{ASSISTANT}:"):
        return prompt
    return _turn(HUMAN, prompt) + _turn(ASSISTANT)


def _examples(k: int) -> tuple[FewShotExample, ...]:
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"generate.few_shot must be an integer >= 0, got {k!r}")
    if k > len(EXAMPLES):
        raise ValueError(f"generate.few_shot={k} but only {len(EXAMPLES)} few-shot examples exist")
    return EXAMPLES[:k]


def _dialogue(prompt: str, response: str | None) -> str:
    return conversation_prompt(prompt) + spaced(response)


def _chain(ex: FewShotExample) -> str:
    return (_dialogue(ex.prompt, ex.initial)
            + _turn(CRITIQUE_REQUEST, ex.critique_request) + _turn(CRITIQUE, ex.critique)
            + _turn(REVISION_REQUEST, ex.revision_request) + _turn(REVISION, ex.revision))


def _with_examples(blocks: list[str], current: str) -> str:
    return SEPARATOR.join(blocks + [current])


def initial_prompt(prompt: str, examples_k: int) -> str:
    """Few-shot Human/Assistant dialogues, then the prompt; ends with ``\\n\\nAssistant:``.

    The examples show their *initial* replies: they stand in for the helpful-only
    model of the paper, so the first reply is a plain attempt that the critique
    and revision then improve.
    """
    blocks = [_dialogue(ex.prompt, ex.initial) for ex in _examples(examples_k)]
    return _with_examples(blocks, conversation_prompt(prompt))


def helpful_prompt(prompt: str, examples_k: int) -> str:
    """``examples_k`` benign request/reply dialogues, then the prompt; ends with ``\n\nAssistant:``.

    For helpful-purpose prompts: a plain helpful reply, no critique.  The demonstrations are
    ``HELPFUL_EXAMPLES``, so no harmful request and no compliant reply to one is ever shown.
    """
    if not isinstance(examples_k, int) or not 0 <= examples_k <= len(HELPFUL_EXAMPLES):
        raise ValueError(f"generate.helpful_few_shot={examples_k!r} must lie in 0..{len(HELPFUL_EXAMPLES)} "
                         f"(the number of helpful examples)")
    blocks = [_dialogue(ex.prompt, ex.reply) for ex in HELPFUL_EXAMPLES[:examples_k]]
    return _with_examples(blocks, conversation_prompt(prompt))


def critique_prompt(prompt: str, response: str, principle: Principle, k: int) -> str:
    """Few-shot chains, the conversation, then the critique request; ends with ``\\n\\nCritique:``."""
    blocks = [_chain(ex) for ex in _examples(k)]
    current = (_dialogue(prompt, response)
               + _turn(CRITIQUE_REQUEST, principle.critique) + _turn(CRITIQUE))
    return _with_examples(blocks, current)


def revision_prompt(prompt: str, response: str, principle: Principle, critique: str, k: int) -> str:
    """As ``critique_prompt`` plus the critique and revision request; ends with ``\\n\\nRevision:``."""
    blocks = [_chain(ex) for ex in _examples(k)]
    current = (_dialogue(prompt, response)
               + _turn(CRITIQUE_REQUEST, principle.critique) + _turn(CRITIQUE, critique)
               + _turn(REVISION_REQUEST, principle.revision) + _turn(REVISION))
    return _with_examples(blocks, current)
