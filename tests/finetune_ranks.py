"""Run by tests/test_finetune_ranks.py under `torchrun --nproc_per_node 2`: LoRA (DDP) and full fine-tuning
(FSDP2) with batch 1 per rank, each interrupted after a checkpoint and resumed, in one process group.

    torchrun --nproc_per_node 2 tests/finetune_ranks.py MODEL DATA OUT
"""

import sys

import torch
import torch.distributed as dist

from qwen2audio.finetune import finetune

LORA = dict(max_steps=2, lr=1e-2, warmup_steps=1, lora_dropout=0.0)
FULL = dict(max_steps=2, lr=1e-3, warmup_steps=1, full=True)


def main(model: str, data: str, out: str, batch_size: int) -> None:
    common = dict(model=model, data=data, batch_size=batch_size, grad_accum=1, seed=3, quiet=True)
    for name, options in (("lora", LORA), ("full", FULL)):
        finetune(out=f"{out}/{name}", save_every=options["max_steps"] - 1, **options, **common)
        finetune(out=f"{out}/{name}-resumed", resume=f"{out}/{name}", **options, **common)


if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # held across the runs (finetune() then neither starts nor ends it)
    main(*sys.argv[1:4], batch_size=1)
    dist.destroy_process_group()
