"""torch.distributed for fine-tuning, in one place: the process group, the wrapper, sums over ranks.

Under torchrun (WORLD_SIZE > 1) the group starts here: gloo on CPU, nccl on CUDA with one GPU per rank
(LOCAL_RANK). LoRA trains with DDP (each rank holds the whole model; the adapters' gradients are averaged);
full fine-tuning with FSDP2 (`fully_shard` on each encoder and decoder layer, then on the whole model), so that
the weights, gradients and AdamW state are sharded over the ranks. One process runs the model as it is.
"""

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..decoder import DecoderLayer
from ..encoder import EncoderLayer
from ..errors import InputError


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device
    started_group: bool  # whether `setup` started the process group (and `teardown` ends it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> Ranks:
    """The ranks of this run; device "auto" is cuda when there is one (this rank's GPU), else cpu."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: torch sees no CUDA device here; use --device cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        return Ranks(0, 1, torch.device(device), False)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), torch.device(device), started)


def teardown(ranks: Ranks) -> None:
    if ranks.started_group:
        dist.destroy_process_group()


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


def gather(obj: object, ranks: Ranks) -> list[object]:
    """Every rank's `obj`, in rank order, on every rank."""
    if ranks.world == 1:
        return [obj]
    out: list[object] = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: object, ranks: Ranks) -> object:
    """Rank 0's `obj` on every rank."""
    if ranks.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


def shard(n_items: int, rank: int, world: int) -> range:
    """This rank's contiguous slice of n_items (the first n % world ranks take one more)."""
    size, extra = divmod(n_items, world)
    begin = rank * size + min(rank, extra)
    return range(begin, begin + size + (rank < extra))
