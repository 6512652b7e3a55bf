"""Which examples each step trains on, the same whatever the number of processes.

The good records are shuffled once per epoch with a generator seeded by (seed, epoch). An optimizer step takes
the next `global_batch = batch_size * world * grad_accum` of them, and micro-batch m of rank r holds the batch_size
examples starting at (m * world + r) * batch_size within them. So one process with batch 2b, two ranks with batch b,
or one process with batch b and grad_accum 2 all train step s on the same examples; each rank decodes only its
own. The examples left over at the end of an epoch (fewer than a global batch) wait for the next epoch's shuffle.
"""

import functools
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class Plan:
    n_examples: int
    batch_size: int  # per process
    world: int
    grad_accum: int
    epochs: int
    max_steps: int | None
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world * self.grad_accum

    @property
    def steps_per_epoch(self) -> int:
        return self.n_examples // self.global_batch

    @property
    def total_steps(self) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * self.steps_per_epoch

    def check(self, data: str) -> None:
        if self.steps_per_epoch == 0:
            raise InputError(f"{data} holds {self.n_examples} good example(s), fewer than one step takes "
                             f"(--batch-size {self.batch_size} x {self.world} process(es) x --grad-accum "
                             f"{self.grad_accum} = {self.global_batch}); lower --batch-size or --grad-accum")

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Record indices of this rank's micro-batches for optimizer step `step` (0-based)."""
        order = epoch_order(self.n_examples, self.seed, self.epoch_of(step))
        start = (step % self.steps_per_epoch) * self.global_batch
        chosen = order[start:start + self.global_batch]
        b = self.batch_size
        return [chosen[(m * self.world + rank) * b:(m * self.world + rank + 1) * b] for m in range(self.grad_accum)]


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def eval_batches(n: int, batch_size: int, rank: int, world: int) -> list[list[int]]:
    """This rank's evaluation batches: each global batch of batch_size * world examples split as in training.
    Every rank gets the same number of batches (FSDP2 needs every rank in every forward); a rank whose part of the
    last one is empty gets [] (it runs a forward that does not count)."""
    step = batch_size * world
    return [list(range(n))[start + rank * batch_size:start + (rank + 1) * batch_size]
            for start in range(0, n, step)]
