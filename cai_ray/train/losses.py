"""Losses for SFT and preference optimisation, in plain torch.

Everything here works on tensors a training loop already has (logits, labels,
summed log-probs), so it can be checked by hand and compared with TRL without
Ray, DeepSpeed or a model.  Label convention throughout: ``labels`` has the same
shape as ``input_ids`` (as Hugging Face ``labels`` do) with ``-100`` on the
prompt and padding; the causal shift happens inside, so ``logits[:, t]`` scores
``labels[:, t + 1]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "soft")
IGNORE_INDEX = -100


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    if logits.dim() != 3:
        raise ValueError(f"logits: expected shape [batch, seq, vocab], got {tuple(logits.shape)}")
    if labels.dim() != 2 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels: shape {tuple(labels.shape)} does not match logits {tuple(logits.shape[:2])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels: expected integer token ids, got dtype {labels.dtype}")
    if labels.shape[1] < 2:
        raise ValueError("labels: a sequence needs at least 2 positions to score a next token")
    real = labels[labels != ignore_index]
    if real.numel() and (real.min() < 0 or real.max() >= logits.shape[-1]):
        raise ValueError(f"labels: token id outside [0, {logits.shape[-1]}) that is not ignore_index={ignore_index}")


# Positions scored at once: about 2**24 float32 values (64 MiB) of [positions, vocab].
CHUNK_VALUES = 1 << 24


def _scored_chunks(mask: torch.Tensor, chunk: int):
    """(row, positions) of each chunk holding a scored position, read with one device sync."""
    rows, positions = mask.shape
    padded = torch.cat([mask, mask.new_zeros(rows, -positions % chunk)], dim=1)
    for b, flags in enumerate(padded.view(rows, -1, chunk).any(-1).tolist()):
        for c, scored in enumerate(flags):
            if scored:  # chunks of prompt or padding only are skipped
                yield b, slice(c * chunk, min((c + 1) * chunk, positions))


class _TokenLogps(torch.autograd.Function):
    """Per position ``t < seq-1``: log_softmax(logits[b, t])[targets[b, t]] in float32, 0 where masked.

    Forward and backward walk the positions in chunks.  Only the logits
    themselves (no copy) and a float32 logsumexp per position are kept for
    backward, which recomputes each chunk's softmax; so beyond the logits and
    their gradient, only a few float32 [chunk, vocab] temporaries exist at a time.
    The gradient has the full logits' shape (zero at the last position, which
    scores nothing), so no slice of it is copied into another full-size tensor.
    """

    @staticmethod
    def forward(ctx, logits, targets, mask, chunk):
        lse = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
        picked = torch.zeros_like(lse)
        for b, span in _scored_chunks(mask, chunk):
            x = logits[b, span].float()
            lse[b, span] = torch.logsumexp(x, dim=-1)
            picked[b, span] = x.gather(-1, targets[b, span].unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(logits, targets, mask, lse)
        ctx.chunk = chunk
        return torch.where(mask, picked - lse, torch.zeros_like(lse))

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets, mask, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        grad_out = torch.where(mask, grad_out.float(), torch.zeros_like(lse))
        for b, span in _scored_chunks(grad_out != 0, ctx.chunk):
            g = grad_out[b, span].unsqueeze(-1)
            # d logp[target] / d logits = onehot(target) - softmax
            block = torch.exp(logits[b, span].float() - lse[b, span].unsqueeze(-1)).mul_(-g)
            block.scatter_add_(-1, targets[b, span].unsqueeze(-1), g)
            grad[b, span] = block
        return grad, None, None, None


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   chunk: int | None = None) -> torch.Tensor:
    """Summed log-probability of each row's label tokens, as float32 of shape ``[batch]``.

    ``labels`` is *unshifted* (aligned with ``input_ids``); positions equal to
    ``ignore_index`` contribute 0, so a row with no label tokens sums to 0.
    Computed ``chunk`` positions at a time in float32 (default: about
    ``CHUNK_VALUES`` values per chunk); see ``_TokenLogps`` for the memory kept
    for backward.  A bf16 input gives a bf16 gradient, as its upcast would.
    """
    _check_logits_labels(logits, labels, ignore_index)
    if chunk is None:
        chunk = max(1, CHUNK_VALUES // logits.shape[-1])
    if chunk < 1:
        raise ValueError(f"chunk: must be a positive number of positions, got {chunk}")
    targets = labels[:, 1:]
    mask = targets != ignore_index
    per_token = _TokenLogps.apply(logits, targets.masked_fill(~mask, 0), mask, chunk)
    return per_token.sum(dim=-1)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
             n_tokens: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over label tokens (prompt and padding carry ``ignore_index``)
    and divided by ``n_tokens``, by default this batch's label tokens (the mean).

    A step split into micro-batches passes each its share of the whole step's
    label tokens, so the averaged gradients are one token mean over the global
    batch however it is split (TRL's ``num_items_in_batch`` does the same).
    """
    _check_logits_labels(logits, labels, ignore_index)
    if n_tokens is None:
        n_tokens = float((labels[:, 1:] != ignore_index).sum())
        if n_tokens == 0:
            # Cross-entropy over zero tokens is 0/0; a NaN here would poison the optimiser silently.
            raise ValueError("labels: every position is ignore_index, so there is no completion token to learn from")
    elif not n_tokens > 0:
        raise ValueError(f"n_tokens: must be > 0, got {n_tokens!r}")
    return -sequence_logps(logits, labels, ignore_index).sum() / n_tokens


def _as_rows(name: str, value, like: torch.Tensor) -> torch.Tensor:
    tensor = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if tensor.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not match policy_chosen {tuple(like.shape)}")
    return tensor


def _check_dpo_args(logps: dict[str, torch.Tensor], beta: float, loss_type: str, labels, label_smoothing: float):
    first = logps["policy_chosen"]
    if first.dim() != 1 or not first.dtype.is_floating_point:
        raise ValueError(f"policy_chosen: expected a 1-D float tensor, got {first.dtype} {tuple(first.shape)}")
    for name, value in logps.items():
        if value.shape != first.shape:
            raise ValueError(f"{name}: shape {tuple(value.shape)} does not match policy_chosen {tuple(first.shape)}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type: {loss_type!r} is unknown; choose one of {LOSS_TYPES}")
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: must be a positive finite number, got {beta!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing: only applies to loss_type='sigmoid', not {loss_type!r}")
    if (labels is None) == (loss_type == "soft"):
        raise ValueError(f"labels: required for loss_type='soft' and only allowed there (got loss_type={loss_type!r})")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    labels: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row preference loss and the implicit rewards ``beta * (policy - ref)`` per side (detached).

    Inputs are summed completion log-probs of shape ``[batch]``.  With
    ``h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)``:

    - ``sigmoid``: ``-logsigmoid(beta*h)`` (DPO); ``label_smoothing`` = eps gives
      conservative DPO, i.e. ``soft`` with every label equal to ``1 - eps``.
    - ``ipo``: ``(h - 1/(2*beta))**2`` (IPO, beta playing tau).
    - ``soft``: ``labels[i]`` = probability that chosen is better;
      ``-(p*logsigmoid(beta*h) + (1-p)*logsigmoid(-beta*h))``.

    ``chosen_lengths``/``rejected_lengths`` (completion token counts, floored at
    1) turn each side's log-ratio into a per-token mean before ``h`` is formed.
    TRL 1.16 does this for its ``ipo`` loss, so pass them to reproduce it; the
    rewards stay unnormalised either way, as in TRL.
    """
    logps = dict(policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                 ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    _check_dpo_args(logps, beta, loss_type, labels, label_smoothing)
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("chosen_lengths/rejected_lengths: pass both or neither")
    if chosen_lengths is not None:
        chosen_n = _as_rows("chosen_lengths", chosen_lengths, policy_chosen).clamp(min=1.0)
        rejected_n = _as_rows("rejected_lengths", rejected_lengths, policy_chosen).clamp(min=1.0)
        h = chosen_ratio / chosen_n - rejected_ratio / rejected_n
    else:
        h = chosen_ratio - rejected_ratio

    if loss_type == "ipo":
        loss = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        if loss_type == "soft":
            p = _as_rows("labels", labels, policy_chosen)
            if not bool(((p >= 0) & (p <= 1)).all()):
                raise ValueError(f"labels: soft labels must lie in [0, 1], got {p.tolist()}")
        else:
            p = torch.full_like(h, 1.0 - label_smoothing)
        loss = -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def dpo_metrics(
    loss_per_row: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
) -> dict[str, float]:
    """Batch means under TRL's metric names, so dashboards from both read alike."""
    with torch.no_grad():
        return {
            "loss": loss_per_row.mean().item(),
            "rewards/chosen": chosen_rewards.mean().item(),
            "rewards/rejected": rejected_rewards.mean().item(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
            # Strictly greater, as TRL counts it: a tie is not a win.
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
            "logps/chosen": policy_chosen.mean().item(),
            "logps/rejected": policy_rejected.mean().item(),
        }
