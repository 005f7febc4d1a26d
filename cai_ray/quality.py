"""Collapse guards: cheap text measures that catch degenerate generations.

Generated critiques and revisions from a base model (and policies late in DPO)
can collapse into loops, emoji spam or leaked dialogue turns.  Each measure is
a pure function of the text; ``check`` turns them into flags using
``QualityConfig``, and callers count the flags instead of dropping rows
silently.  Thresholds are tuned so that ordinary structured answers (long
numbered lists, markdown) pass.
"""

from __future__ import annotations

import re
import string
import unicodedata
import zlib
from collections.abc import Iterable

from cai_ray.config import QualityConfig

FILTERS = ("too_short", "repeated_ngrams", "repeated_lines", "symbol_run", "role_leak", "compression")


def _words(text: str) -> list[str]:
    # Whitespace tokens (punctuation kept) so loops of "!!!" or emoji count too.
    return text.lower().split()


def _ngrams(words: list[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def repeated_ngram_frac(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier one (0 for fewer than one n-gram)."""
    grams = _ngrams(_words(text), n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def longest_line_run(text: str) -> int:
    """Longest run of identical consecutive lines; blank lines neither count nor break a run."""
    best, run, previous = 0, 0, None
    for line in (raw.strip() for raw in text.splitlines()):
        if not line:
            continue
        run = run + 1 if line == previous else 1
        best, previous = max(best, run), line
    return best


# Zero-width joiners, variation selectors and skin-tone modifiers glue the
# parts of one emoji together: they continue a run without lengthening it.
_GLUE = {"\u200d", "\ufe0e", "\ufe0f"} | {chr(c) for c in range(0x1F3FB, 0x1F400)}


def _is_symbol(ch: str) -> bool:
    return not (ch.isalnum() or ch.isspace() or ch in string.punctuation)


def longest_symbol_run(text: str) -> int:
    """Longest run of symbol characters (not letters, digits or ASCII punctuation).

    Whitespace between symbols does not break a run, so ``"🔥 🔥 🔥"`` counts as
    three; any letter, digit or ASCII punctuation does.
    """
    best = run = 0
    for ch in text:
        if ch in _GLUE or ch.isspace():
            continue
        run = run + 1 if _is_symbol(ch) else 0
        best = max(best, run)
    return best


def emoji_count(text: str) -> int:
    """Pictographic symbols (Unicode category So outside the glue characters)."""
    return sum(1 for ch in text if ch not in _GLUE and unicodedata.category(ch) == "So")


# Unambiguous dialogue markers count anywhere; "Critique:"/"Revision:" only at a
# line start, since the words are ordinary English mid-sentence.
_ROLE_ANYWHERE = re.compile(r"\b(?:Human|Assistant|CritiqueRequest|RevisionRequest)[ \t]*:")
_ROLE_LINE_START = re.compile(r"^[ \t]*(?:Critique|Revision)[ \t]*:", re.MULTILINE)


def role_marker_count(text: str) -> int:
    """Dialogue role markers inside a response: a sign the model wrote the next turn."""
    return len(_ROLE_ANYWHERE.findall(text)) + len(_ROLE_LINE_START.findall(text))


def compression_ratio(text: str) -> float:
    """Raw bytes over zlib-compressed bytes; repetitive text compresses far better than prose."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw, 9)) if raw else 0.0


def check(text: str, cfg: QualityConfig | None = None) -> dict[str, bool]:
    """Flags for ``text`` (True = flagged), one per name in ``FILTERS``.

    ``cfg`` may be a ``QualityConfig`` or any object with the same field
    names (e.g. the OmegaConf node mirroring it).
    """
    cfg = cfg or QualityConfig()
    long_enough = len(text) >= cfg.compression_min_chars
    return {
        "too_short": len(text.strip()) < cfg.min_chars,
        "repeated_ngrams": repeated_ngram_frac(text, cfg.ngram) > cfg.max_repeated_ngram_frac,
        "repeated_lines": longest_line_run(text) > cfg.max_repeated_line_run,
        "symbol_run": longest_symbol_run(text) > cfg.max_symbol_run,
        "role_leak": role_marker_count(text) > 0,
        "compression": long_enough and compression_ratio(text) > cfg.max_compression_ratio,
    }


def distinct_n(texts: Iterable[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams in ``texts`` (n-grams never span two texts).

    1.0 means no n-gram repeats anywhere in the set; near 0 means the outputs
    say the same thing over and over.  An empty set scores 0.0.
    """
    total, unique = 0, set()
    for text in texts:
        grams = _ngrams(_words(text), n)
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0
