"""torch.distributed for fine-tuning: the device, the wrapper, sums over ranks (the process group, shards and
objects between ranks are ranks.py's, shared with `qwen2audio eval`).

LoRA trains with DDP (each rank holds the whole model; the adapters' gradients are averaged);
full fine-tuning with FSDP2 (`fully_shard` on each encoder and decoder layer, then on the whole model), so that
the weights, gradients and AdamW state are sharded over the ranks. One process runs the model as it is.
"""

import inspect

import torch
import torch.distributed as dist
from torch import nn

from ..decoder import DecoderLayer
from ..encoder import EncoderLayer
from ..errors import InputError
from ..ranks import Ranks, setup


def start_ranks(device: str) -> Ranks:
    """The ranks of this run (ranks.setup); device "auto" is cuda when there is one (this rank's GPU), else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device here; use --device cpu")
    return setup(device)


def wrap(model: nn.Module, ranks: Ranks, full: bool) -> nn.Module:
    """The module to train: the model itself (one process), DDP (LoRA) or FSDP2 (full) over the ranks."""
    if ranks.world == 1:
        return model
    if not full:
        from torch.nn.parallel import DistributedDataParallel

        # broadcast_buffers=False: the buffers never change, and a broadcast in forward would tie every forward
        # (the evaluation's too) to the other ranks'.
        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters  # torch >= 2.12
        quiet = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
        return DistributedDataParallel(model, device_ids=ids, **quiet)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for module in model.modules():
        if isinstance(module, (EncoderLayer, DecoderLayer)):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def sum_over_ranks(values: list[float], ranks: Ranks) -> list[float]:
    """Each value summed over the ranks (in float64)."""
    if ranks.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ranks.device if ranks.device.type == "cuda" else "cpu")
    dist.all_reduce(tensor)
    return tensor.tolist()
