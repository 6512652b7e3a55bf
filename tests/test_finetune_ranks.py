"""torchrun --nproc_per_node 2 (gloo, CPU) with batch 1 per rank trains exactly as one process with batch 2:
the same losses (1e-5) and final weights, for LoRA under DDP and full fine-tuning under FSDP2; and a run
resumed across the group from a checkpoint ends where the uninterrupted run did."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from finetune_ranks import FULL, LORA
from helpers import free_port
from safetensors.torch import load_file

from qwen2audio.finetune import finetune

pytestmark = pytest.mark.usefixtures("one_thread")


def launch(model: Path, data: Path, out: Path) -> subprocess.Popen:
    script = Path(__file__).parent / "finetune_ranks.py"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(script), str(model), str(data), str(out)]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(folder: Path) -> list[float]:
    return json.loads((folder / "summary.json").read_text())["losses"]


def assert_same_tensors(a: Path, b: Path, tol: float) -> None:
    ours, theirs = load_file(a), load_file(b)
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    print(f"{a.parent.parent.name}/{a.parent.name} vs {b.parent.parent.name}: largest difference {worst:.2e}")
    assert worst <= tol, f"{a} and {b} differ by {worst:.2e}"


def test_two_ranks_with_batch_b_equal_one_process_with_batch_2b(finetune_model, finetune_data, tmp_path):
    ranks = launch(finetune_model, finetune_data, tmp_path / "ranks")  # runs while this process trains alone
    common = dict(model=str(finetune_model), data=str(finetune_data), batch_size=2, grad_accum=1, seed=3,
                  quiet=True)
    alone = {name: finetune(out=str(tmp_path / "alone" / name), **options, **common)
             for name, options in (("lora", LORA), ("full", FULL))}
    output, _ = ranks.communicate(timeout=240)
    assert ranks.returncode == 0, output[-3000:]
    for name in ("lora", "full"):
        for run in (name, f"{name}-resumed"):
            summary = json.loads((tmp_path / "ranks" / run / "summary.json").read_text())
            assert summary["world"] == 2
        together = losses(tmp_path / "ranks" / name)
        assert len(together) == len(alone[name]["losses"])
        worst = max(abs(a - b) for a, b in zip(together, alone[name]["losses"]))
        print(f"{name}: losses {together}, largest difference from one process {worst:.2e}")
        assert worst < 1e-5, (together, alone[name])
        resumed = losses(tmp_path / "ranks" / f"{name}-resumed")  # the last step only
        assert len(resumed) == 1 and abs(resumed[0] - together[-1]) < 1e-6
    weights = {"lora": "adapter/adapter_model.safetensors", "full": "model/model.safetensors"}
    for name, file in weights.items():
        assert_same_tensors(tmp_path / "ranks" / name / file, tmp_path / "alone" / name / file, 1e-5)
        assert_same_tensors(tmp_path / "ranks" / name / file, tmp_path / "ranks" / f"{name}-resumed" / file, 1e-6)
    base, tuned = load_file(finetune_model / "model.safetensors"), load_file(tmp_path / "alone/full/model/model.safetensors")
    assert all((base[k] - tuned[k]).abs().max() > 0 for k in base)  # full: every weight trained
