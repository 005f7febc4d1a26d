"""Training rows: where they come from, how they are checked, tokenised and batched.

Everything here runs in the driver before any Ray Train worker starts, so bad
input fails with one line naming the file, column and row instead of a
traceback from inside a worker.  Workers only receive the tokenised arrays and
the deterministic batch schedule.

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

import hashlib
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import numpy as np

from cai_ray.config import Config, TrainConfig, stage_dir
from cai_ray.constitution.format import HUMAN, conversation_prompt, spaced
from cai_ray.data.prompts import jsonl_columns

SFT_COLUMNS = ("prompt", "completion")
DPO_COLUMNS = ("prompt", "chosen", "rejected")
IGNORE_INDEX = -100
SAMPLES = "samples:"
_CONVERSATION_START = f"\n\n{HUMAN}:"


# ---------------------------------------------------------------- sources


def _generated(cfg: Config, name: str, key: str) -> str:
    path = stage_dir(cfg, "generate") / name
    if not path.is_file():
        raise ValueError(f"{key} is unset and the generate stage has no {name} at {path}; "
                         f"run `cai-ray generate` with this config first, or set {key}=FILE")
    return str(path)


def _sft_wanted(cfg: Config) -> dict[str, Optional[str]]:
    """{config key: source} the SFT stage reads; None stands for the generate stage's output."""
    s = cfg.sft
    if s.data:
        return {"sft.data": s.data}
    wanted = {}
    if s.helpful_ratio < 1:
        wanted["sft.revisions"] = s.revisions
    if s.helpful_ratio > 0:
        wanted["sft.helpful"] = s.helpful
    return wanted


def sft_reads_generate(cfg: Config) -> bool:
    """Whether the SFT data comes (in part) from the generate stage, whose hash then keys the SFT folder."""
    return None in _sft_wanted(cfg).values()


def sft_sources(cfg: Config) -> dict[str, str]:
    """{config key: file or samples:NAME}: ``sft.data`` alone, or the SL-CAI mix's sources that
    ``sft.helpful_ratio`` uses (revisions: the generate stage's ``sft.parquet``, helpful rows:
    its ``helpful.parquet``, unless set)."""
    files = {"sft.revisions": "sft.parquet", "sft.helpful": "helpful.parquet"}
    return {key: source or _generated(cfg, files[key], key) for key, source in _sft_wanted(cfg).items()}


def label_dir(cfg: Config) -> Path:
    """The label stage's folder: its config sections plus what they name by reference
    (the constitution's content, the policy folder or the sft stage's output)."""
    from cai_ray.constitution import load_constitution
    from cai_ray.train.driver import output_dir

    constitution = load_constitution(cfg.label.constitution or cfg.generate.constitution)
    upstream = [f"constitution:{constitution.hash}"]
    policy = cfg.label.policy or cfg.dpo.sft_adapter
    upstream.append(f"policy:{Path(policy).expanduser().resolve()}" if policy
                    else f"sft:{output_dir(cfg, 'sft').name}")
    return stage_dir(cfg, "label", tuple(upstream))


def _labelled(cfg: Config) -> str:
    folder = label_dir(cfg)
    if not (folder / "manifest.json").is_file():
        raise ValueError(f"dpo.pairs={cfg.dpo.pairs} and the label stage has no finished pairs at {folder}; "
                         f"run `cai-ray label` with this config first, or set dpo.data=FILE")
    return str(folder / "pairs.parquet")


def _both(revisions: str, feedback: str) -> str:
    """Both pair files in one, named by their contents (written once, atomically).

    Revision pairs carry label 1.0 (a revision is better by construction), feedback
    pairs the feedback model's probability; ``source`` tells them apart.
    """
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    digest = hashlib.sha256(f"{fingerprint(revisions)}{fingerprint(feedback)}".encode()).hexdigest()[:12]
    path = Path(feedback).parent / f"pairs-both-{digest}.parquet"
    if not path.is_file():
        tables = [pq.read_table(revisions), pq.read_table(feedback)]
        keep = [c for c in ("prompt", "chosen", "rejected", "source", "label", "id")
                if all(c in t.column_names for t in tables)]
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.concat_tables([t.select(keep).cast(tables[0].select(keep).schema) for t in tables]), tmp)
        os.replace(tmp, path)
    return str(path)


def dpo_source(cfg: Config) -> str:
    """``dpo.data``, else what ``dpo.pairs`` names: the generate stage's revision pairs,
    the label stage's feedback pairs, or both."""
    if cfg.dpo.data:
        return cfg.dpo.data
    if cfg.dpo.pairs == "feedback":
        return _labelled(cfg)
    revisions = _generated(cfg, "pairs.parquet", "dpo.data")
    return revisions if cfg.dpo.pairs == "revisions" else _both(revisions, _labelled(cfg))


def fingerprint(source: str) -> str:
    """sha256 of the file behind ``source`` (shipped sets included), so a changed file retrains."""
    if source.startswith(SAMPLES):
        handle = resources.files("cai_ray.data").joinpath("samples", f"{source[len(SAMPLES):]}.jsonl")
        blob = handle.read_bytes() if handle.is_file() else source.encode()
        return hashlib.sha256(blob).hexdigest()
    path = Path(source).expanduser()
    if not path.is_file():
        return hashlib.sha256(source.encode()).hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _columns(source: str, key: str) -> tuple[str, dict[str, list], Optional[list[int]]]:
    """(name for messages, {column: values}, jsonl line numbers or None) of a file or shipped set."""
    if source.startswith(SAMPLES):
        handle = resources.files("cai_ray.data").joinpath("samples", f"{source[len(SAMPLES):]}.jsonl")
        if not handle.is_file():
            raise ValueError(f"{key}={source}: no such shipped set in cai_ray/data/samples")
        with handle.open("r", encoding="utf-8") as fh:
            return (source, *jsonl_columns(fh, f"{key}: {source}"))
    path = Path(source).expanduser()
    if not path.is_file():
        raise ValueError(f"{key}={source}: file does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow's messages run over several lines
            raise ValueError(f"{key}: {path} is not a readable parquet file "
                             f"({str(exc).strip().splitlines()[0]})") from None
        return str(path), table.to_pydict(), None
    if path.suffix != ".jsonl":
        raise ValueError(f"{key}={source}: use a .jsonl or .parquet file, or samples:NAME")
    try:
        with open(path, encoding="utf-8") as fh:
            return (str(path), *jsonl_columns(fh, f"{key}: {path}"))
    except UnicodeDecodeError:
        raise ValueError(f"{key}: {path} is not UTF-8 text") from None


def read_rows(source: str, required: tuple[str, ...], optional: tuple[str, ...] = (),
              key: str = "data") -> list[dict[str, Any]]:
    """Rows with the ``required`` text columns (non-empty strings) and any ``optional`` ones present."""
    name, columns, lines = _columns(source, key)
    n = len(next(iter(columns.values()), []))
    if n == 0:
        raise ValueError(f"{key}: {name} has no rows")
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(f"{key}: {name} is missing column(s) {', '.join(missing)}; "
                         f"columns: {', '.join(columns) or '(none)'}")
    for column in required:
        for i, value in enumerate(columns[column]):
            if not isinstance(value, str) or not value.strip():
                where = f"line {lines[i]}" if lines is not None else f"row {i}"
                what = "is empty" if value is None or isinstance(value, str) else \
                    f"holds a {type(value).__name__}, not a string"
                raise ValueError(f"{key}: {name}: {where}: column {column!r} {what}")
    kept = [c for c in (*required, *optional) if c in columns]
    return [{c: columns[c][i] for c in kept} for i in range(n)]


def mix_counts(revisions: int, helpful: int, ratio: float) -> tuple[int, int]:
    """(revision rows, helpful rows) to use: the most rows whose helpful share is ``ratio``
    without using any row twice; the larger source is subsampled, never repeated."""
    if ratio == 0:
        return revisions, 0
    if ratio == 1:
        return 0, helpful
    total = math.floor(min(revisions / (1 - ratio), helpful / ratio) + 1e-9)
    n_helpful = round(ratio * total)
    return total - n_helpful, n_helpful


def _sample(rows: list, n: int, seed: int, stream: int) -> list:
    """``n`` of ``rows`` chosen by a seeded permutation, kept in file order."""
    if n >= len(rows):
        return rows
    keep = np.sort(np.random.default_rng([seed, stream]).permutation(len(rows))[:n])
    return [rows[i] for i in keep]


def read_sft(cfg: Config, mix: Optional[dict] = None) -> list[dict[str, str]]:
    """SFT rows: ``sft.data`` as it is, or the SL-CAI mix of revisions and helpful rows at
    ``sft.helpful_ratio`` (seeded by ``cfg.seed``).  ``mix``, if given, is filled with the
    composition: per source its file, rows available and rows used, and the ratio asked and got."""
    sources = sft_sources(cfg)
    read = {key: read_rows(source, SFT_COLUMNS, key=key) for key, source in sources.items()}
    if "sft.data" in read:
        rows, used = read["sft.data"], {"sft.data": len(read["sft.data"])}
    else:
        n_rev, n_help = mix_counts(len(read.get("sft.revisions", ())), len(read.get("sft.helpful", ())),
                                   cfg.sft.helpful_ratio)
        used = {key: n for key, n in (("sft.revisions", n_rev), ("sft.helpful", n_help)) if key in read}
        # One random stream per source, so one source's draw never depends on the other's size.
        rows = [row for stream, key in enumerate(("sft.revisions", "sft.helpful")) if key in used
                for row in _sample(read[key], used[key], cfg.seed, stream)]
    if mix is not None:
        mix.update({"helpful_ratio": cfg.sft.helpful_ratio, "rows": len(rows),
                    "helpful_share": used.get("sft.helpful", 0) / max(len(rows), 1),
                    "sources": {key: {"source": sources[key], "available": len(read[key]), "used": n}
                                for key, n in used.items()}})
    return rows


def read_dpo(cfg: Config) -> list[dict[str, Any]]:
    source = dpo_source(cfg)
    rows = read_rows(source, DPO_COLUMNS, ("label",), key="dpo.data")
    if cfg.dpo.loss != "soft":
        return rows
    if "label" not in rows[0]:
        raise ValueError(f"dpo.loss=soft needs a 'label' column (probability that chosen is better) "
                         f"in {source}; columns: {', '.join(rows[0])}")
    for i, row in enumerate(rows):
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)) or not 0 <= label <= 1:
            raise ValueError(f"dpo.data: {source}: row {i}: column 'label' must be a number in [0, 1], "
                             f"got {label!r}")
    return rows


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
    prompts, completions = [], []
    for row in rows:
        texts = [as_text(row["prompt"], row[n]) for n in names]
        prompts.append(texts[0][0])
        completions.append([t[1] for t in texts])
    encoded = _encode(tok, prompts, completions, max_length)
    kept = [i for i, e in enumerate(encoded) if e is not None]
    if not kept:
        raise ValueError(f"train.max_length={max_length} leaves no completion token in any of the "
                         f"{len(rows)} rows; raise train.max_length")
    seqs = [Sequences.from_rows([encoded[i][0][k] for i in kept], [encoded[i][1] for i in kept])
            for k in range(len(names))]
    labels = None
    if kind == "dpo" and "label" in rows[0]:
        labels = np.array([float(rows[i]["label"]) for i in kept], dtype=np.float32)
    stats = {"rows": len(rows), "examples": len(kept), "dropped_too_long": len(rows) - len(kept),
             "completion_tokens": int(sum((s.offsets[1:] - s.offsets[:-1] - s.split).sum() for s in seqs))}
    return TrainSet(kind, seqs, labels, stats)


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
