import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _estimate(tiny_base, tmp_path, *extra):
    return subprocess.run(
        [sys.executable, "-m", "cai_ray", "estimate", "configs/quickstart.yaml", f"model.path={tiny_base}",
         f"output_dir={tmp_path}", "tracking.enabled=false", "estimate.prompts=160800",
         "generate.sampling.max_new_tokens=8", *extra],
        capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_estimate_measures_generation_and_scales_costs(tmp_path, tiny_base):
    done = _estimate(tiny_base, tmp_path, "estimate.calibrate=true", "estimate.calibration_prompts=4",
                     "estimate.device_hour_cost=2.5")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.split()}
    assert {"generate", "sft", "dpo", "evaluate", "total"} <= set(lines)
    assert "measured on 4 prompts" in done.stdout
    hours, cost = float(lines["total"][2]), float(lines["total"][3])
    assert hours > 0 and abs(cost - 2.5 * hours) < 0.02 * cost + 0.01
    # Generation dominates the tokens: every prompt carries its few-shot prefix 5 times.
    assert float(lines["generate"][1].replace(",", "")) > float(lines["dpo"][1].replace(",", ""))


def test_estimate_from_configured_throughput_doubles_when_throughput_halves(tmp_path, tiny_base):
    fast = _estimate(tiny_base, tmp_path, "estimate.calibrate=false", "estimate.generate_tokens_per_s=2000")
    slow = _estimate(tiny_base, tmp_path, "estimate.calibrate=false", "estimate.generate_tokens_per_s=1000")
    hours = [float(next(l for l in d.stdout.splitlines() if l.startswith("generate")).split()[3])
             for d in (fast, slow)]
    assert "not measured" in fast.stdout
    assert abs(hours[1] - 2 * hours[0]) < 0.02 * hours[1]


def test_gpu_config_estimates_on_a_laptop_without_ray_or_an_engine(tmp_path, tiny_base):
    """The cluster config as shipped (vLLM, 8 GPU actors, /mnt/shared): no Ray, no vLLM, no GPU here.
    Only the tokenizer and the prompt source are swapped for offline ones."""
    done = subprocess.run(
        [sys.executable, "-m", "cai_ray", "estimate", "configs/llama-3.2-3b.yaml", f"model.path={tiny_base}",
         "data.source=samples:red_team", "data.layout=plain", "data.field=prompt", "tracking.enabled=false",
         "runtime.offline=true"],
        capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not measured" in done.stdout and "160,800 prompts" in done.stdout
    assert "Started a local Ray" not in done.stdout + done.stderr
