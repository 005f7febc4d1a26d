"""Pure constitution logic: principles, base-model prompt format, pair building.

Imports no Ray, so generation actors, training and tests share it cheaply.
"""

from cai_ray.constitution.fewshot import EXAMPLES, HELPFUL_EXAMPLES, FewShotExample, HelpfulExample
from cai_ray.constitution.format import (
    SEPARATOR, STEPS, STOP, clean, conversation_prompt, critique_prompt, helpful_prompt,
    initial_prompt, revision_prompt, spaced, stops_for,
)
from cai_ray.constitution.pairs import build_pair, helpful_row, screen, sft_row
from cai_ray.constitution.principles import (
    CONSTITUTIONS_DIR, Comparison, Constitution, Principle, available_constitutions,
    draw_comparison, draw_principle, load_constitution,
)

__all__ = [
    "CONSTITUTIONS_DIR", "EXAMPLES", "HELPFUL_EXAMPLES", "SEPARATOR", "STEPS", "STOP", "Comparison",
    "Constitution", "FewShotExample", "HelpfulExample", "Principle", "available_constitutions",
    "build_pair", "clean", "conversation_prompt", "critique_prompt", "draw_comparison",
    "draw_principle", "helpful_prompt", "helpful_row", "initial_prompt", "load_constitution",
    "revision_prompt", "screen", "sft_row", "spaced", "stops_for",
]
