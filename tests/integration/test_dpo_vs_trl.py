"""On one fixed batch our DPO loss equals TRL's (1.16) within 1e-4.

TRL's conventions, read from trl/trainer/dpo_trainer.py (1.16) and mirrored in
``_our_batch`` below:
- the EOS token is appended to chosen and rejected *as text* (unless already there);
- it tokenises ``prompt`` and ``prompt + completion`` as whole strings with the
  tokenizer's defaults (so BOS only if the tokenizer itself adds one; ours does
  not), and the completion starts where the two token lists first differ, taking
  the smaller of the chosen and rejected prefixes, so a BPE merge across the
  boundary moves the split rather than changing tokens;
- rows are [all chosen..., all rejected...], right-padded with the pad token,
  labels = input_ids with -100 outside the completion; max_length 1024 with
  keep_start truncation (our strings are far shorter);
- the batch loss is the mean of the per-pair losses; ``ipo`` divides each side's
  log-ratio by its completion token count first.
"""

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from cai_ray.tiny import build_tiny  # noqa: E402
from cai_ray.train.losses import dpo_loss, dpo_metrics, sequence_logps  # noqa: E402

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

BETA = 0.1
PAIRS = {
    "prompt": ["\n\nHuman: how do I learn to code?\n\nAssistant:",
               "\n\nHuman: tell me a dangerous thing\n\nAssistant:",
               # Trailing space: " sure" merges across the boundary, exercising TRL's common-prefix split.
               "\n\nHuman: please explain water\n\nAssistant: "],
    "chosen": [" First, write code. Second, read code.", " Sorry, I cannot help with that.", "sure, water is kind."],
    "rejected": [" no.", " Here steps: first harm, then harm, then more harm.", "sure thing"],
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("tiny"))


def _policy_and_ref(path):
    """The reference is the saved model; the policy is the same model nudged by seeded noise,
    so the log-ratios are far from 0 and the loss is not the trivial ln 2."""
    load = transformers.AutoModelForCausalLM.from_pretrained
    policy, ref = load(path, dtype=torch.float32).eval(), load(path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return policy, ref


def _our_batch(tok):
    chosen, rejected, prompt_lens = [], [], []
    for prompt, good, bad in zip(PAIRS["prompt"], PAIRS["chosen"], PAIRS["rejected"]):
        prompt_ids = tok(prompt).input_ids
        pair = [tok(prompt + text + tok.eos_token).input_ids for text in (good, bad)]
        # Completion starts at the first token where the prompt alone and either full text disagree.
        split = 0
        while split < len(prompt_ids) and all(split < len(ids) and ids[split] == prompt_ids[split] for ids in pair):
            split += 1
        chosen.append(pair[0])
        rejected.append(pair[1])
        prompt_lens.append(split)
    rows, prompt_lens = chosen + rejected, prompt_lens * 2
    width = max(map(len, rows))
    # Right padding, as TRL does: Llama's default position ids then match for the real tokens.
    input_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = input_ids.masked_fill(attention == 0, -100)
    for row, n in enumerate(prompt_lens):
        labels[row, :n] = -100
    return input_ids, attention, labels


def _ours(path, loss_type):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    policy, ref = _policy_and_ref(path)
    input_ids, attention, labels = _our_batch(tok)
    with torch.no_grad():
        pol = sequence_logps(policy(input_ids=input_ids, attention_mask=attention).logits, labels)
        rf = sequence_logps(ref(input_ids=input_ids, attention_mask=attention).logits, labels)
    pc, pr = pol.chunk(2)
    rc, rr = rf.chunk(2)
    lengths = dict(zip(("chosen_lengths", "rejected_lengths"), (labels[:, 1:] != -100).sum(-1).chunk(2)))
    loss, cr, rj = dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type=loss_type,
                            **(lengths if loss_type == "ipo" else {}))
    return dpo_metrics(loss, cr, rj, pc, pr)


def _trl(path, loss_type, out_dir):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    policy, ref = _policy_and_ref(path)
    args = trl.DPOConfig(output_dir=str(out_dir), report_to="none", beta=BETA, loss_type=loss_type,
                         per_device_train_batch_size=len(PAIRS["prompt"]), disable_tqdm=True,
                         save_strategy="no", use_cpu=True,
                         # DPOConfig turns bf16 on by default where the CPU supports it, and accelerate then
                         # runs the reference forward under bf16 autocast; keep both sides in float32.
                         bf16=False)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, processing_class=tok,
                             train_dataset=datasets.Dataset.from_dict(PAIRS))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS["prompt"]))])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    # The trainer logs batch means under "eval" because the model is in eval mode.
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    return loss.item(), logged


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_matches_trl(tiny_path, tmp_path, loss_type):
    ours = _ours(tiny_path, loss_type)
    trl_loss, trl_logged = _trl(tiny_path, loss_type, tmp_path / "trl")
    print(f"{loss_type}: ours={ours['loss']:.6f} trl={trl_loss:.6f} margins={ours['rewards/margins']:.4f}")
    if loss_type == "sigmoid":
        assert abs(trl_loss - math.log(2)) > 1e-2, "policy == reference: the comparison would be vacuous"
    assert abs(ours["loss"] - trl_loss) < 1e-4
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected"):
        assert ours[name] == pytest.approx(trl_logged[name], abs=1e-4), name
