"""Training rows as tokens and batches: text format, tokenisation, the batch schedule.

Workers only receive the tokenised arrays and the deterministic batch schedule.

Text: a prompt that is already a conversation (``"\\n\\nHuman: ...\\n\\nAssistant:"``,
as the generate stage writes it) is used as it is and the completion is appended
untouched; a bare request (as in ``samples:helpful_sft``) is wrapped in the same
conversation format and its completion gets the one leading space the format
uses, so both kinds of row train the model on the text it sees at inference.

Tokenisation follows TRL 1.16 (see the notes in ``losses.py`` and
``tests/integration/test_dpo_vs_trl.py``): EOS is appended to the completion as
text, ``prompt`` and ``prompt + completion`` are tokenised as whole strings,
and the completion starts where the two token lists first differ (for DPO, the
earlier of the chosen and rejected split points).  Rows are cut to
``train.max_length`` from the end (keeping the prompt); a row left with no
completion token is dropped and counted, since it has nothing to learn from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from cai_ray.config import TrainConfig
from cai_ray.constitution.format import HUMAN, conversation_prompt, spaced

IGNORE_INDEX = -100
# Rows tokenised at once (see tokenize).
TOKENIZE_CHUNK = 1024
_CONVERSATION_START = f"\n\n{HUMAN}:"


def as_text(prompt: str, completion: str) -> tuple[str, str]:
    """(prompt, completion) in the conversation format; see the module notes."""
    if prompt.startswith(_CONVERSATION_START):
        return prompt, completion
    return conversation_prompt(prompt.strip()), spaced(completion)


# ---------------------------------------------------------------- tokens


@dataclass
class Sequences:
    """Token rows stored flat (cheap to pickle and to share through the object store):
    row ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` and its first ``split[i]`` tokens are prompt."""

    ids: np.ndarray
    offsets: np.ndarray
    split: np.ndarray

    @classmethod
    def from_rows(cls, rows: list[list[int]], split: list[int]) -> "Sequences":
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        ids = np.fromiter((t for r in rows for t in r), dtype=np.int32, count=int(offsets[-1]))
        return cls(ids, offsets, np.asarray(split, dtype=np.int32))

    @classmethod
    def concat(cls, parts: list["Sequences"]) -> "Sequences":
        lengths = np.concatenate([np.diff(p.offsets) for p in parts])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return cls(np.concatenate([p.ids for p in parts]), offsets, np.concatenate([p.split for p in parts]))

    def __len__(self) -> int:
        return len(self.split)

    def row(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]


@dataclass
class TrainSet:
    """What the workers train on: one ``Sequences`` for SFT, [chosen, rejected] for DPO."""

    kind: str
    seqs: list[Sequences]
    labels: Optional[np.ndarray] = None
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.seqs[0])

    def label_tokens(self, indices: np.ndarray) -> int:
        """Tokens the loss scores in these examples (first sequence): all after the prompt,
        and never position 0, which no logit predicts."""
        seqs = self.seqs[0]
        lengths = seqs.offsets[indices + 1] - seqs.offsets[indices]
        return int((lengths - np.maximum(seqs.split[indices], 1)).sum())


def _split_point(prompt_ids: list[int], fulls: list[list[int]]) -> int:
    if all(f[:len(prompt_ids)] == prompt_ids for f in fulls):
        return len(prompt_ids)  # the usual case, compared in C; the loop below costs ~1 us a token
    n = 0
    while n < len(prompt_ids) and all(n < len(f) and f[n] == prompt_ids[n] for f in fulls):
        n += 1
    return n


def _encode(tok, prompts: list[str], completions: list[list[str]], max_length: int):
    """Per row: (full token lists cut to max_length, split point) or None when nothing is left to learn.

    One split point serves every completion of a row (the earliest), as TRL does for a pair."""
    eos = tok.eos_token
    prompt_ids = tok(prompts).input_ids
    # EOS appended as text unless already there, as TRL does.
    sides = [tok([p + c[k] + ("" if c[k].endswith(eos) else eos) for p, c in zip(prompts, completions)]).input_ids
             for k in range(len(completions[0]))]
    out = []
    for i, p_ids in enumerate(prompt_ids):
        fulls = [side[i][:max_length] for side in sides]
        split = _split_point(p_ids, [side[i] for side in sides])
        out.append((fulls, split) if all(len(f) > split for f in fulls) else None)
    return out


def tokenize(tok, rows: list[dict[str, Any]], kind: str, max_length: int) -> TrainSet:
    """Tokenise SFT (``prompt``, ``completion``) or DPO (``prompt``, ``chosen``, ``rejected``) rows."""
    if tok.eos_token is None:
        raise ValueError("model tokenizer has no eos_token; set one so completions can end")
    names = ("completion",) if kind == "sft" else ("chosen", "rejected")
    parts: list[list[Sequences]] = [[] for _ in names]
    labels: list[float] = []
    # A chunk at a time: Python token lists cost ~36 bytes a token, so 161K pairs of 300 tokens
    # held at once took gigabytes of driver memory; the int32 arrays kept take 4 bytes a token.
    for start in range(0, len(rows), TOKENIZE_CHUNK):
        chunk = rows[start:start + TOKENIZE_CHUNK]
        prompts, completions = [], []
        for row in chunk:
            texts = [as_text(row["prompt"], row[n]) for n in names]
            prompts.append(texts[0][0])
            completions.append([t[1] for t in texts])
        encoded = _encode(tok, prompts, completions, max_length)
        kept = [i for i, e in enumerate(encoded) if e is not None]
        for k, side in enumerate(parts):
            side.append(Sequences.from_rows([encoded[i][0][k] for i in kept], [encoded[i][1] for i in kept]))
        if kind == "dpo" and "label" in rows[0]:
            labels += [float(chunk[i]["label"]) for i in kept]
    seqs = [Sequences.concat(side) for side in parts]
    if not len(seqs[0]):
        raise ValueError(f"train.max_length={max_length} leaves no completion token in any of the "
                         f"{len(rows)} rows; raise train.max_length")
    stats = {"rows": len(rows), "examples": len(seqs[0]), "dropped_too_long": len(rows) - len(seqs[0]),
             "completion_tokens": int(sum((s.offsets[1:] - s.offsets[:-1] - s.split).sum() for s in seqs))}
    return TrainSet(kind, seqs, np.array(labels, dtype=np.float32) if labels else None, stats)


# ---------------------------------------------------------------- batches


def total_steps(n_examples: int, train: TrainConfig, world: int, epochs: int, max_steps: int) -> int:
    """Optimizer steps: ``max_steps`` if set, else enough to see every example ``epochs`` times."""
    if max_steps > 0:
        return max_steps
    global_batch = train.batch_size * train.grad_accum * world
    return max(1, math.ceil(epochs * n_examples / global_batch))


class Schedule:
    """Which examples each rank sees at each step, as a pure function of (step, rank).

    Examples form an endless stream of seeded per-epoch permutations; step ``s``
    takes the next ``batch_size * grad_accum * world`` stream positions, micro-batch
    ``m`` of rank ``r`` a fixed slice of them.  Every rank thus runs the same
    number of micro-batches (collectives never wait on a rank that ran out), and a
    run restored at step ``s`` continues with exactly the batches it would have seen.
    """

    def __init__(self, n_examples: int, batch_size: int, grad_accum: int, world: int, seed: int):
        self.n, self.batch_size, self.grad_accum, self.world, self.seed = \
            n_examples, batch_size, grad_accum, world, seed
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def _examples(self, start: int, count: int) -> np.ndarray:
        return np.array([self._perm(p // self.n)[p % self.n] for p in range(start, start + count)],
                        dtype=np.int64)

    def micro_batch(self, step: int, micro: int, rank: int) -> np.ndarray:
        return self._examples(((step * self.grad_accum + micro) * self.world + rank) * self.batch_size,
                              self.batch_size)

    def global_batch(self, step: int) -> np.ndarray:
        """Every example of step ``step``, over all ranks and micro-batches."""
        size = self.batch_size * self.grad_accum * self.world
        return self._examples(step * size, size)


def _pad(rows: list[np.ndarray], splits: list[int], pad_id: int) -> dict[str, Any]:
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.from_numpy(row.astype(np.int64))
        attention[i, :len(row)] = 1
    # Right padding, as TRL does, so default position ids match for the real tokens.
    labels = input_ids.masked_fill(attention == 0, IGNORE_INDEX)
    for i, n in enumerate(splits):
        labels[i, :n] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def collate(data: TrainSet, indices: np.ndarray, pad_id: int) -> dict[str, Any]:
    """One micro-batch; for DPO the rows are [chosen..., rejected...] and ``pref`` holds soft labels."""
    import torch

    if data.kind == "sft":
        seqs = data.seqs[0]
        return _pad([seqs.row(i) for i in indices], [int(seqs.split[i]) for i in indices], pad_id)
    chosen, rejected = data.seqs
    splits = [int(chosen.split[i]) for i in indices]  # one split per pair: see _encode
    batch = _pad([chosen.row(i) for i in indices] + [rejected.row(i) for i in indices], splits * 2, pad_id)
    batch["pref"] = None if data.labels is None else torch.from_numpy(data.labels[indices])
    return batch
