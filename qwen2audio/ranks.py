"""The ranks of a run under torchrun (`torchrun --nproc_per_node N`), shared by `qwen2audio eval` and
`qwen2audio finetune`: the process group, each rank's slice of the items, and objects passed between ranks.

Under torchrun (WORLD_SIZE > 1) the process group is started here: gloo on CPU, nccl on CUDA with one GPU per
rank (LOCAL_RANK). Each rank takes one contiguous slice of the items, the first `n % world` ranks one item more
(the official evaluation's InferenceSampler), so with the same batch size every batch holds the same items as theirs.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


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
    """The ranks of this run; device "cuda" becomes this rank's GPU."""
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


def shard(n_items: int, rank: int, world: int) -> range:
    """This rank's contiguous slice of n_items."""
    size, extra = divmod(n_items, world)
    begin = rank * size + min(rank, extra)
    return range(begin, begin + size + (rank < extra))


def barrier(ranks: Ranks) -> None:
    if ranks.world > 1:
        dist.barrier()


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
