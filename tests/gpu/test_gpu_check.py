"""bench/gpu_check.py on the GPU: SFT/DPO over NCCL in bf16, export, hf engine. Skipped without CUDA."""

import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_part_on_cuda():
    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--device", "cuda"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "process group: nccl" in out.stdout and "layer 0 ran 2x per step" in out.stdout
    assert "hf engine on cuda" in out.stdout and "all parts ran" in out.stdout
