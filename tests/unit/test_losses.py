"""Hand-checked values for cai_ray.train.losses.

Each test writes the arithmetic out so a reader can redo it on paper.
Notation: h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected),
sigma(x) = 1 / (1 + exp(-x)), and logsigma(-x) = logsigma(x) - x.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from cai_ray.train.losses import dpo_loss, dpo_metrics, sequence_logps, sft_loss

LN2 = math.log(2.0)


def _pair(chosen_ratio: float, rejected_ratio: float, batch: int = 1):
    """Log-probs whose log-ratios are chosen_ratio and rejected_ratio (the reference is arbitrary)."""
    ref_c, ref_r = torch.full((batch,), -7.0), torch.full((batch,), -9.0)
    return ref_c + chosen_ratio, ref_r + rejected_ratio, ref_c, ref_r


# ---------------------------------------------------------------- dpo_loss


@pytest.mark.parametrize("loss_type,labels", [("sigmoid", None), ("soft", [1.0, 1.0]), ("soft", [0.5, 0.5]),
                                              ("soft", [0.0, 0.2])])
def test_policy_equal_to_reference_costs_ln2(loss_type, labels):
    # Policy == reference -> both log-ratios 0 -> h = 0, and sigma(0) = 1/2.
    # sigmoid:   -logsigma(0) = ln 2 = 0.6931...
    # soft, any p: -(p*logsigma(0) + (1-p)*logsigma(-0)) = -(p + 1 - p) * ln(1/2) = ln 2,
    # so p = 0.5 gives ln 2 as well: at h = 0 the label does not matter.
    logps = torch.tensor([-12.0, -3.5])
    loss, chosen_r, rejected_r = dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.1,
                                          loss_type=loss_type, labels=labels)
    torch.testing.assert_close(loss, torch.full((2,), LN2))
    torch.testing.assert_close(chosen_r, torch.zeros(2))
    torch.testing.assert_close(rejected_r, torch.zeros(2))


def test_sigmoid_hand_case():
    # beta = 0.1, chosen log-ratio +2, rejected -1 -> h = 3, beta*h = 0.3.
    # sigma(0.3) = 1 / (1 + e^-0.3) = 1 / 1.740818 = 0.574443
    # loss = -ln 0.574443 = 0.554355
    # rewards: 0.1 * 2 = 0.2 and 0.1 * -1 = -0.1
    loss, chosen_r, rejected_r = dpo_loss(*_pair(2.0, -1.0), beta=0.1)
    assert loss.item() == pytest.approx(0.554355244, abs=1e-6)
    assert chosen_r.item() == pytest.approx(0.2, abs=1e-6)
    assert rejected_r.item() == pytest.approx(-0.1, abs=1e-6)


def test_rewards_are_detached():
    pc, pr, rc, rr = _pair(2.0, -1.0)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert loss.requires_grad
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


def test_ipo_hand_case():
    # beta = 0.1 -> target margin 1/(2*beta) = 5.  h = 2 - (-1) = 3.
    # loss = (3 - 5)^2 = 4.
    loss, _, _ = dpo_loss(*_pair(2.0, -1.0), beta=0.1, loss_type="ipo")
    assert loss.item() == pytest.approx(4.0, abs=1e-6)


def test_ipo_with_lengths_averages_per_token_like_trl():
    # Chosen ratio 2 over 4 tokens -> 0.5; rejected ratio -1 over 2 tokens -> -0.5.
    # h = 0.5 - (-0.5) = 1 -> loss = (1 - 5)^2 = 16.  Rewards stay unnormalised: 0.2 and -0.1.
    loss, chosen_r, rejected_r = dpo_loss(*_pair(2.0, -1.0), beta=0.1, loss_type="ipo",
                                          chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]))
    assert loss.item() == pytest.approx(16.0, abs=1e-5)
    assert chosen_r.item() == pytest.approx(0.2, abs=1e-6)
    assert rejected_r.item() == pytest.approx(-0.1, abs=1e-6)


def test_ipo_is_zero_at_its_target_margin():
    # beta = 0.25 -> target 1/(2*0.25) = 2; ratios +1.5 and -0.5 give h = 2 exactly -> loss 0.
    loss, _, _ = dpo_loss(*_pair(1.5, -0.5), beta=0.25, loss_type="ipo")
    assert loss.item() == pytest.approx(0.0, abs=1e-9)


def test_soft_hand_case():
    # p = 0.25, beta*h = 0.3 (as in the sigmoid case).
    # -logsigma(0.3) = 0.554355;  -logsigma(-0.3) = 0.554355 + 0.3 = 0.854355
    # loss = 0.25 * 0.554355 + 0.75 * 0.854355 = 0.779355
    loss, _, _ = dpo_loss(*_pair(2.0, -1.0), beta=0.1, loss_type="soft", labels=torch.tensor([0.25]))
    assert loss.item() == pytest.approx(0.779355244, abs=1e-6)


def test_soft_label_one_equals_sigmoid():
    pc, pr, rc, rr = torch.tensor([-3.0, -8.0, -1.0]), torch.tensor([-4.0, -2.0, -1.5]), \
        torch.tensor([-3.5, -7.0, -1.2]), torch.tensor([-3.9, -2.4, -0.8])
    soft, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="soft", labels=torch.ones(3))
    hard, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(soft, hard)


def test_soft_label_zero_equals_sigmoid_with_sides_swapped():
    # p = 0 says "rejected is better": the loss is DPO with chosen and rejected exchanged.
    pc, pr, rc, rr = torch.tensor([-3.0, -8.0]), torch.tensor([-4.0, -2.0]), \
        torch.tensor([-3.5, -7.0]), torch.tensor([-3.9, -2.4])
    soft, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="soft", labels=torch.zeros(2))
    swapped, _, _ = dpo_loss(pr, pc, rr, rc, beta=0.5)
    torch.testing.assert_close(soft, swapped)


def test_label_smoothing_is_soft_label_one_minus_eps():
    # eps = 0.1 -> p = 0.9: loss = 0.554355 + (1 - 0.9) * 0.3 = 0.584355.
    smoothed, _, _ = dpo_loss(*_pair(2.0, -1.0), beta=0.1, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(0.584355244, abs=1e-6)


@pytest.mark.parametrize("loss_type,labels", [("sigmoid", None), ("ipo", None), ("soft", [0.8])])
def test_raising_chosen_logp_lowers_the_loss(loss_type, labels):
    # For sigmoid, dL/d(policy_chosen) = -beta * sigma(-beta*h) = -0.1 * sigma(-0.3) = -0.042556:
    # pushing the chosen log-prob up lowers the loss, pushing the rejected one up raises it.
    pc, pr, rc, rr = _pair(2.0, -1.0)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    loss, _, _ = dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type=loss_type, labels=labels)
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()
    if loss_type == "sigmoid":
        assert pc.grad.item() == pytest.approx(-0.0425557483, abs=1e-7)
    stepped, _, _ = dpo_loss(pc.detach() + 0.1, pr.detach(), rc, rr, beta=0.1, loss_type=loss_type, labels=labels)
    assert stepped.item() < loss.item()


def test_dpo_metrics_hand_case():
    # Row 0: rewards 0.2 / -0.1 (a win); row 1: rewards -0.3 / 0.1 (a loss).
    pc, pr = torch.tensor([-5.0, -7.0]), torch.tensor([-10.0, -4.0])
    rc, rr = pc - torch.tensor([2.0, -3.0]), pr - torch.tensor([-1.0, 1.0])
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=0.1)
    m = dpo_metrics(loss, cr, rj, pc, pr)
    assert m["rewards/chosen"] == pytest.approx((0.2 - 0.3) / 2, abs=1e-6)
    assert m["rewards/rejected"] == pytest.approx((-0.1 + 0.1) / 2, abs=1e-6)
    assert m["rewards/margins"] == pytest.approx((0.3 + -0.4) / 2, abs=1e-6)
    assert m["rewards/accuracies"] == pytest.approx(0.5)
    assert m["logps/chosen"] == pytest.approx(-6.0)
    assert m["logps/rejected"] == pytest.approx(-7.0)
    assert m["loss"] == pytest.approx(loss.mean().item())


def test_tied_rewards_do_not_count_as_accurate():
    logps = torch.tensor([-2.0])
    loss, cr, rj = dpo_loss(logps, logps, logps, logps, beta=0.1)
    assert dpo_metrics(loss, cr, rj, logps, logps)["rewards/accuracies"] == 0.0


@pytest.mark.parametrize("kwargs,field", [
    (dict(beta=0.0), "beta"),
    (dict(beta=-0.1), "beta"),
    (dict(beta=float("nan")), "beta"),
    (dict(loss_type="hinge"), "loss_type"),
    (dict(loss_type="soft"), "labels"),
    (dict(labels=[1.0, 1.0]), "labels"),
    (dict(loss_type="soft", labels=[1.5, 0.5]), "labels"),
    (dict(loss_type="soft", labels=[-0.1, 0.5]), "labels"),
    (dict(loss_type="soft", labels=[float("nan"), 0.5]), "labels"),
    (dict(loss_type="soft", labels=[0.5, 0.5, 0.5]), "labels"),
    (dict(label_smoothing=0.5), "label_smoothing"),
    (dict(loss_type="ipo", label_smoothing=0.1), "label_smoothing"),
    (dict(chosen_lengths=torch.tensor([3, 3])), "lengths"),
    (dict(chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([3])), "chosen_lengths"),
])
def test_dpo_bad_arguments_raise(kwargs, field):
    logps = torch.tensor([-3.0, -4.0])
    args = dict(beta=0.1) | kwargs
    with pytest.raises(ValueError, match=field):
        dpo_loss(logps, logps, logps, logps, **args)


def test_dpo_mismatched_logps_raise():
    with pytest.raises(ValueError, match="ref_rejected"):
        dpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(3), beta=0.1)
    with pytest.raises(ValueError, match="policy_chosen"):
        dpo_loss(torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), torch.zeros(2, 1), beta=0.1)


# ------------------------------------------------------ sequence_logps, sft_loss


def _hand_batch():
    """Two rows, vocab 3, length 4.

    Row 0, labels [0, -100, 1, 0]: after the shift, logits[t] scores labels[t+1]:
      t=0 -> label -100: skipped (its logits are set absurdly to prove it)
      t=1 -> label 1 with logits ln[1, 2, 1]: p = 2/4 -> ln(1/2)
      t=2 -> label 0 with logits ln[1, 1, 2]: p = 1/4 -> ln(1/4)
      t=3 -> nothing follows, never scored (absurd logits again)
      sum = ln(1/8) = -2.079442
    Row 1 is all -100 (a pure prompt/padding row): sum 0.
    """
    ln = math.log
    row0 = [[50.0, -50.0, 0.0], [0.0, ln(2), 0.0], [0.0, 0.0, ln(2)], [-50.0, 50.0, 9.0]]
    row1 = [[1.0, 2.0, 3.0]] * 4
    logits = torch.tensor([row0, row1])
    labels = torch.tensor([[0, -100, 1, 0], [-100, -100, -100, -100]])
    return logits, labels


def test_sequence_logps_hand_case_with_masking():
    logits, labels = _hand_batch()
    torch.testing.assert_close(sequence_logps(logits, labels), torch.tensor([-math.log(8.0), 0.0]))


def test_sequence_logps_ignores_first_label_and_is_shift_invariant():
    # labels[:, 0] is never a target; adding a constant to one position's logits leaves softmax unchanged.
    logits, labels = _hand_batch()
    labels[0, 0] = 2
    logits[0, 1] += 100.0
    torch.testing.assert_close(sequence_logps(logits, labels), torch.tensor([-math.log(8.0), 0.0]))


def test_sequence_logps_matches_cross_entropy_and_upcasts_bf16():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :2] = -100
    labels[2, 4:] = -100
    expected = -F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none").sum(-1)
    torch.testing.assert_close(sequence_logps(logits, labels), expected)
    low = sequence_logps(logits.bfloat16(), labels)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, expected, atol=0.05, rtol=0.02)


def _per_row_logps(logits, labels):
    """The implementation before chunking (one float32 [seq, vocab] copy per row kept for backward)."""
    targets = labels[:, 1:]
    mask = targets != -100
    rows = []
    for row_logits, row_targets in zip(logits[:, :-1], targets.masked_fill(~mask, 0)):
        row = row_logits.float()
        rows.append(row.gather(-1, row_targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(row, dim=-1))
    per_token = torch.stack(rows)
    return torch.where(mask, per_token, torch.zeros_like(per_token)).sum(dim=-1)


def _direct_logps(logits, labels):
    targets = labels[:, 1:]
    picked = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != -100, picked, torch.zeros_like(picked)).sum(dim=-1)


def _random_batch(dtype=torch.float32, rows=3, seq=9, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, seq, vocab, generator=g).to(dtype).requires_grad_(True)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[:, :3] = -100         # prompt
    labels[rows - 1, 6:] = -100  # right padding
    labels[1] = -100             # a row with nothing to score
    return logits, labels


@pytest.mark.parametrize("chunk", [1, 2, 5, 8, 100, None])
def test_chunked_logps_equal_per_row_and_direct_values_and_gradients(chunk):
    # Chunks of 1, uneven (5 of 8 scored positions), exact, and larger than the sequence.
    logits, labels = _random_batch()
    weights = torch.tensor([0.5, -2.0, 1.5])  # distinct per-row upstream gradients
    got = sequence_logps(logits, labels, chunk=chunk)
    (grad,) = torch.autograd.grad((got * weights).sum(), logits)
    for reference in (_per_row_logps, _direct_logps):
        want = reference(logits, labels)
        (want_grad,) = torch.autograd.grad((want * weights).sum(), logits)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad, want_grad, atol=1e-6, rtol=0)
    assert got[1] == 0 and grad[1].abs().sum() == 0 and grad[:, -1].abs().sum() == 0


def test_chunked_logps_keep_no_float32_vocab_copy_for_backward():
    # Everything saved for backward is either the bf16 logits themselves or [rows, positions]-sized;
    # the per-row implementation saved one float32 [seq, vocab] upcast per row.
    logits, labels = _random_batch(torch.bfloat16, seq=40, vocab=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        sequence_logps(logits, labels, chunk=4)
    big = [t for t in saved if t.numel() > logits.shape[0] * logits.shape[1]]
    assert big and all(t.data_ptr() == logits.data_ptr() and t.dtype == torch.bfloat16 for t in big)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _per_row_logps(logits, labels)
    assert any(t.dtype == torch.float32 and t.shape == (40 - 1, 64) for t in saved)


def test_chunked_logps_on_bf16_match_the_per_row_upcast():
    logits, labels = _random_batch(torch.bfloat16)
    got = sequence_logps(logits, labels, chunk=3)
    want = _per_row_logps(logits, labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(got.sum(), logits)
    (want_grad,) = torch.autograd.grad(want.sum(), logits)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad, want_grad, atol=0, rtol=0)


def test_chunked_logps_run_without_gradients_and_reject_a_bad_chunk():
    logits, labels = _random_batch()
    with torch.no_grad():
        got = sequence_logps(logits, labels, chunk=2)
    assert not got.requires_grad
    torch.testing.assert_close(got, _direct_logps(logits.detach(), labels), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="chunk"):
        sequence_logps(logits, labels, chunk=0)


def test_sft_loss_hand_case_is_mean_over_label_tokens():
    # Two label tokens in the batch, total -ln 8 -> mean cross-entropy ln(8)/2 = 1.039721.
    logits, labels = _hand_batch()
    assert sft_loss(logits, labels).item() == pytest.approx(math.log(8.0) / 2, abs=1e-6)


def test_sft_loss_ignores_masked_positions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 7, 13, generator=g, requires_grad=True)
    labels = torch.randint(0, 13, (2, 7), generator=g)
    labels[:, :3] = -100
    labels[1, 6] = -100
    loss = sft_loss(logits, labels)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 13), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # Logits at positions whose next label is -100 (t = 0, 1 and row 1's t = 5) get no gradient.
    assert logits.grad[:, :2].abs().sum() == 0
    assert logits.grad[1, 5].abs().sum() == 0
    assert logits.grad[0, 5].abs().sum() > 0


def test_sft_loss_over_micro_batches_with_the_step_token_count_is_the_global_mean():
    # Micro-batches of 1 and 3 rows hold 7 and 2 + 7 + 7 = 16 label tokens: 23 in the step.  With
    # n_tokens = 23 / 2 (two micro-batches, averaged the way DeepSpeed accumulates), the mean of the two
    # losses is the token mean over all 4 rows; the micro-batch means weigh the rows differently.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(4, 8, 11, generator=g)
    labels = torch.randint(0, 11, (4, 8), generator=g)
    labels[1, :6] = -100                           # 2 label tokens in row 1, 7 in rows 0, 2, 3
    split = [slice(0, 1), slice(1, 4)]
    assert [int((labels[s, 1:] != -100).sum()) for s in split] == [7, 16]
    whole = sft_loss(logits, labels)
    parts = [sft_loss(logits[s], labels[s], n_tokens=23 / 2) for s in split]
    assert (parts[0] + parts[1]).item() / 2 == pytest.approx(whole.item(), abs=1e-6)
    means = [sft_loss(logits[s], labels[s]) for s in split]
    assert (means[0] + means[1]).item() / 2 != pytest.approx(whole.item(), abs=1e-3)
    with pytest.raises(ValueError, match="n_tokens"):
        sft_loss(logits, labels, n_tokens=0)


@pytest.mark.parametrize("logits,labels,field", [
    (torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long), "logits"),
    (torch.zeros(2, 5, 3), torch.zeros(2, 4, dtype=torch.long), "labels"),
    (torch.zeros(2, 5, 3), torch.zeros(2, 5), "labels"),
    (torch.zeros(2, 1, 3), torch.zeros(2, 1, dtype=torch.long), "labels"),
    (torch.zeros(1, 3, 3), torch.tensor([[0, 1, 3]]), "labels"),
    (torch.zeros(1, 3, 3), torch.tensor([[0, -5, 1]]), "labels"),
])
def test_sequence_logps_bad_inputs_raise(logits, labels, field):
    with pytest.raises(ValueError, match=field):
        sequence_logps(logits, labels)
    with pytest.raises(ValueError, match=field):
        sft_loss(logits, labels)


def test_sft_loss_without_label_tokens_raises():
    logits = torch.zeros(2, 4, 3)
    labels = torch.full((2, 4), -100)
    labels[:, 0] = 1  # position 0 is never a target, so this still leaves nothing to learn
    with pytest.raises(ValueError, match="labels"):
        sft_loss(logits, labels)
