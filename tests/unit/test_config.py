from pathlib import Path

import pytest

from cai_ray.config import ConfigError, load_config, stage_folder, stage_hash, to_yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("model: {path: m}\ngenerate: {rounds: 2, few_shot: 1}\n")
    cfg = load_config(cfg_file, ["generate.rounds=5"])
    assert cfg.generate.rounds == 5          # override beats YAML
    assert cfg.generate.few_shot == 1        # YAML beats default
    assert cfg.generate.actors == 1          # default kept
    assert cfg.model.path == "m"


@pytest.mark.parametrize("config", ["quickstart.yaml", "llama-3.2-3b.yaml", "llama-3-8b.yaml"])
def test_shipped_configs_validate(config):
    cfg = load_config(ROOT / "configs" / config)
    assert cfg.model.role == "base"
    assert cfg.judge.model.role == "instruct"


def test_unknown_key_names_key_and_suggests_fix():
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, ["generate.roundz=3"])
    message = str(err.value)
    assert "\n" not in message
    assert "generate.roundz" in message and "rounds" in message


@pytest.mark.parametrize("override, fragment", [
    (["generate.rounds=abc"], "generate.rounds"),
    (["train.precision=fp16"], "train.precision=fp16 is not supported on CPU"),
    (["engine.backend=tgi"], "engine.backend='tgi' is not allowed"),
    (["generate.rounds=0"], "generate.rounds=0 must be > 0"),
    (["generate.max_error_rate=1.5"], "generate.max_error_rate=1.5 must lie in [0, 1]"),
    (["engine.device=cpu", "engine.tensor_parallel_size=2"], "engine.tensor_parallel_size=2 needs GPUs"),
    (["evaluate.arms=[{name: a, format: chat}]"], "evaluate.arms[0].format=chat needs an instruct model"),
    (["rounds"], "is not key=value"),
    (["engine.backend=vllm", "train.lora.r=16", "engine.max_lora_rank=16"], "engine.max_lora_rank=16 is below"),
    # Engines against the actors/replicas holding them: CUDA needs a GPU, tensor parallelism one per rank.
    (["engine.device=cuda"], "engine.device=cuda but the generate actors (generate, evaluate arms) request "
                             "no GPU (generate.num_gpus_per_actor=0)"),
    (["engine.device=cuda", "generate.num_gpus_per_actor=1", "dpo.pairs=feedback"],
     "engine.device=cuda but the label actors request no GPU (label.num_gpus_per_actor=0)"),
    (["engine.device=cuda", "generate.num_gpus_per_actor=0.5", "engine.tensor_parallel_size=2"],
     "engine.tensor_parallel_size=2 needs 2 GPUs on each of the generate actors"),
    (["judge.model.path=j", "judge.engine.device=cuda"], "judge.engine.device=cuda but the judge replicas"),
])
def test_bad_values_fail_with_one_line(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(QUICKSTART, override)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_value_names_key():
    with pytest.raises(ConfigError, match=r"^model\.path: required value is missing"):
        load_config(None, [])


def test_stage_requirements_checked_only_for_that_stage():
    cfg = load_config(None, ["model.path=m"])
    cfg.require("generate")
    with pytest.raises(ConfigError, match="judge.model.path is empty"):
        cfg.require("evaluate")


def test_missing_or_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_stage_hash_tracks_what_decides_the_output(tmp_path):
    base = load_config(QUICKSTART)
    same = load_config(QUICKSTART, ["generate.actors=7", "train.workers=4", "dpo.beta=0.3"])
    changed = load_config(QUICKSTART, ["generate.rounds=3"])
    assert stage_hash(base, "generate") == stage_hash(same, "generate")   # resources, other stages
    assert stage_hash(base, "generate") != stage_hash(changed, "generate")
    assert stage_hash(base, "dpo") != stage_hash(same, "dpo")
    assert stage_hash(base, "sft", ("abc",)) != stage_hash(base, "sft", ("abd",))
    assert stage_folder(base, "generate").parent.name == "generate"
    assert stage_folder(base, "generate").is_absolute()


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(QUICKSTART, ["generate.rounds=3"])
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(to_yaml(cfg))
    assert load_config(dumped) == cfg


def test_gpu_only_settings_on_a_local_ray_without_gpus_stop_in_one_line(tmp_path, capsys):
    from cai_ray.cli import main
    from cai_ray.runtime import check_local_gpus

    cfg = load_config(QUICKSTART, ["train.use_gpu=true", "runtime.num_gpus=0"])
    with pytest.raises(ValueError, match=r"^train.use_gpu=true: the local Ray has no GPU"):
        check_local_gpus(cfg, "sft")
    check_local_gpus(cfg, "generate")  # generation does not train
    check_local_gpus(load_config(QUICKSTART, ["train.use_gpu=true", "runtime.num_gpus=1"]), "sft")
    # Through the CLI: before Ray, an MLflow run or any output.
    out = tmp_path / "out"
    args = ["generate", str(QUICKSTART), "engine.device=cuda", "generate.num_gpus_per_actor=1",
            "runtime.num_gpus=0", f"output_dir={out}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "engine.device=cuda: the local Ray has no GPU" in err[0]
    assert {p.name for p in out.iterdir()} == {"logs"}  # no MLflow store, no stage folder
