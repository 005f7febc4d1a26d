"""Prompt data: loaders, stable ids and the shipped sample sets (``samples:NAME``)."""

from .prompts import DataError, hh_prompt, load_prompts, normalise, prompt_id, sample_names

__all__ = ["DataError", "hh_prompt", "load_prompts", "normalise", "prompt_id", "sample_names"]
