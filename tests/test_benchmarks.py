"""benchmarks/run.py's argument checks: without a GPU, --device cuda says so in one sentence (no traceback), before
it builds or loads anything."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

RUN = Path(__file__).parents[1] / "benchmarks" / "run.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_cuda_benchmark_without_a_gpu_is_one_sentence():
    done = subprocess.run([sys.executable, str(RUN), "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "--device cuda needs an NVIDIA GPU" in done.stderr and torch.__version__ in done.stderr
