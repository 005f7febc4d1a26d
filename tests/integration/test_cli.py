import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "cai_ray", *args], capture_output=True, text=True,
                          cwd=ROOT)


def test_config_show_prints_resolved_config():
    done = cli("config", "show", "configs/quickstart.yaml", "generate.rounds=3")
    assert done.returncode == 0, done.stderr
    assert "rounds: 3" in done.stdout and "backend: hf" in done.stdout


def test_config_show_unknown_key_is_one_line_with_suggestion():
    done = cli("config", "show", "configs/quickstart.yaml", "generate.roundz=3")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "generate.roundz" in lines[0] and "'rounds'" in lines[0]


def test_help_on_every_command():
    top = cli("--help")
    assert top.returncode == 0
    from cai_ray.cli import STAGES, TOOLS

    for command in [*STAGES, *TOOLS, "config"]:
        done = cli(command, "--help")
        assert done.returncode == 0 and "usage" in done.stdout.lower(), command


def test_help_does_not_import_heavy_libraries():
    code = ("import sys; from cai_ray.cli import _parser; _parser(); "
            "print(sorted(m for m in ('ray', 'torch', 'vllm', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "[]"
