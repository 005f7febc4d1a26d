"""Held-out guard: find evaluation prompts that also appear, exactly or nearly, in training prompts.

Rows are either `(id, text)` pairs or mappings with "id" and "prompt" keys (the loaders' row
shape); both may be mixed. Texts are compared after `normalize`. An eval prompt overlaps a
train prompt when their normalised texts are equal ("exact"), or when at least `threshold` of
the eval prompt's distinct word n-grams occur in that train prompt ("ngram"). Eval prompts
shorter than n words have no n-grams and are compared by exact text only.

The train side is indexed once (TrainIndex) as a sorted array of n-gram hashes with the owning
train row, so each eval prompt costs a few binary searches; candidates found through hashes are
then checked against the real n-grams, so a hash collision can never produce a reported overlap.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

_NOT_WORD = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class Overlap:
    eval_id: Any
    train_id: Any
    kind: str  # "exact" | "ngram"
    fraction: float  # share of the eval prompt's n-grams found in the train prompt; 1.0 for exact


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and symbols (anything neither word character nor space), and
    collapse whitespace. NFKC first, so full-width or ligature forms compare equal to plain ones."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_NOT_WORD.sub("", text).split())


def ngrams(text: str, n: int = 8) -> set[tuple[str, ...]]:
    """Distinct word n-grams of the normalised text; empty when it has fewer than n words."""
    words = normalize(text).split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _gram_key(gram: tuple[str, ...]) -> int:
    # Not hash(): string hashes are salted per process, and an index built in the driver may be
    # queried inside a Ray worker.
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode(), digest_size=8).digest(), "little", signed=True)


def _rows(rows: Iterable, name: str) -> list[tuple[Any, str]]:
    out = []
    for i, row in enumerate(rows):
        if isinstance(row, Mapping):
            if "id" not in row or "prompt" not in row:
                raise ValueError(f"{name}[{i}] needs 'id' and 'prompt' keys, got {sorted(row)}")
            ident, text = row["id"], row["prompt"]
        elif isinstance(row, (tuple, list)) and len(row) == 2:
            ident, text = row
        else:
            raise ValueError(f"{name}[{i}] must be an (id, text) pair or a dict with 'id' and 'prompt'")
        if not isinstance(text, str):
            raise ValueError(f"{name}[{i}] (id {ident!r}): text must be a str, got {type(text).__name__}")
        out.append((ident, text))
    return out


class TrainIndex:
    """Training prompts indexed once, then checked against any number of eval sets.

    N-gram hashes live in one sorted int64 array with the owning train row alongside: 160K
    prompts' worth of n-grams take tens of MB this way, where a dict of Python objects would
    take gigabytes, and a lookup is a pair of binary searches.
    """

    def __init__(self, train_rows: Iterable, n: int = 8):
        if isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        self.n = int(n)
        self.rows = _rows(train_rows, "train_rows")
        self.norm = [normalize(text) for _, text in self.rows]
        self.by_text: dict[str, list[int]] = defaultdict(list)
        for i, text in enumerate(self.norm):
            self.by_text[text].append(i)
        per_row = [np.fromiter((_gram_key(g) for g in ngrams(text, self.n)), dtype=np.int64) for text in self.norm]
        hashes = np.concatenate(per_row) if per_row else np.empty(0, np.int64)
        owners = np.repeat(np.arange(len(per_row)), [len(a) for a in per_row])
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.owners = hashes[order], owners[order]

    def overlaps(self, eval_rows: Iterable, threshold: float = 0.5) -> list[Overlap]:
        """All (eval, train) overlaps, in eval order; per eval prompt exact matches first, then
        n-gram matches by decreasing fraction. An exact pair is not reported again as n-gram."""
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
        found: list[Overlap] = []
        for eval_id, text in _rows(eval_rows, "eval_rows"):
            norm = normalize(text)
            if not norm:
                continue  # nothing left to leak; "???" and "!!" both normalise to ""
            exact = self.by_text.get(norm, [])
            found += [Overlap(eval_id, self.rows[i][0], "exact", 1.0) for i in exact]
            grams = ngrams(norm, self.n)
            if not grams:
                continue
            keys = np.fromiter((_gram_key(g) for g in grams), dtype=np.int64, count=len(grams))
            left = np.searchsorted(self.hashes, keys, "left")
            right = np.searchsorted(self.hashes, keys, "right")
            hits = [self.owners[a:b] for a, b in zip(left, right) if b > a]
            if not hits:
                continue
            rows, counts = np.unique(np.concatenate(hits), return_counts=True)
            near = []
            # Hash counts can only overstate the shared n-grams (collisions add matches), so this
            # filter loses nothing; the real n-grams then decide.
            for i in rows[counts / len(grams) >= threshold]:
                fraction = len(grams & ngrams(self.norm[i], self.n)) / len(grams)
                if fraction >= threshold and i not in exact:
                    near.append(Overlap(eval_id, self.rows[i][0], "ngram", fraction))
            found += sorted(near, key=lambda o: -o.fraction)
        return found


def find_overlaps(eval_rows: Iterable, train_rows: Iterable, n: int = 8, threshold: float = 0.5) -> list[Overlap]:
    """Overlaps of one eval set with the training prompts; see TrainIndex.overlaps. To check
    several eval sets, build one TrainIndex and call .overlaps on each."""
    return TrainIndex(train_rows, n).overlaps(eval_rows, threshold)


def format_overlaps(overlaps: list[Overlap], limit: int = 20) -> str:
    """One line for an error message: how many eval prompts overlap, then the first `limit` pairs."""
    if not overlaps:
        return "no eval prompt overlaps the training prompts"
    n_eval = len({o.eval_id for o in overlaps})
    n_exact = sum(o.kind == "exact" for o in overlaps)
    pairs = [
        f"eval {o.eval_id!r} = train {o.train_id!r}" if o.kind == "exact"
        else f"eval {o.eval_id!r} ~ train {o.train_id!r} ({o.fraction:.0%} of n-grams)"
        for o in overlaps[:limit]
    ]
    more = f"; ... and {len(overlaps) - limit} more" if len(overlaps) > limit else ""
    return (f"{n_eval} eval prompt(s) overlap training prompts ({n_exact} exact, "
            f"{len(overlaps) - n_exact} n-gram): " + "; ".join(pairs) + more)
