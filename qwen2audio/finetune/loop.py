"""The training loop: micro-batches, the loss averaged over the whole step's tokens, AdamW, clipping, the schedule.

The loss of an optimizer step is the mean next-token loss over every counted token of the step, on all ranks and
all accumulated micro-batches together:

    loss = (sum over ranks r, micro-batches m, counted tokens t of -log p(t)) / N,   N = counted tokens of the step

not a mean of per-micro-batch or per-rank means (which would weigh a token of a short batch more than one of a long
batch). N is counted before the forward passes (from the labels alone) and summed over the ranks. Each micro-batch
then backpropagates `sum_loss * world / N`: DDP and FSDP2 average gradients over the ranks (divide by world), so the
step's gradient is exactly d(loss)/d(params). Hence two ranks with batch b, one process with batch 2b, and one
process with batch b and grad_accum 2 compute the same loss and the same update (up to the order of float sums).
"""

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..labels import collate
from ..model import counted_targets
from ..tokenizer import Tokenizer
from .batches import Plan, eval_batches
from .data import Record, build_example
from ..ranks import Ranks
from .distributed import sum_over_ranks
from .options import FinetuneOptions
from .report import Progress
from .state import save_checkpoint


def lr_at(step: int, options: FinetuneOptions, total_steps: int) -> float:
    """Linear warm-up over warmup_steps (step 0 at lr / warmup), then cosine decay to 0 at total_steps."""
    warmup = options.warmup_steps
    if step < warmup:
        return options.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return options.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Session:
    options: FinetuneOptions
    ranks: Ranks
    model: nn.Module  # the model itself
    module: nn.Module  # what runs the step: the model, DDP around it, or the model sharded by FSDP2
    optimizer: torch.optim.Optimizer
    tokenizer: Tokenizer
    records: list[Record]
    eval_records: list[Record]
    plan: Plan
    out: Path
    info: dict  # what a checkpoint records about the run (options, data)
    history: list[dict] = field(default_factory=list)

    def batch(self, records: list[Record]) -> dict[str, Tensor]:
        examples = [build_example(r, self.tokenizer, self.options.max_audio_seconds) for r in records]
        batch = collate(examples, self.tokenizer.pad_token_id)
        dtype = self.model.dtype
        return {k: v.to(self.ranks.device, dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]


def _counted(batch: dict[str, Tensor]) -> int:
    return int(counted_targets(batch["labels"], batch["attention_mask"]).sum())


def train_step(session: Session, step: int) -> dict:
    """One optimizer step (step is 0-based); returns its log record."""
    start = time.perf_counter()
    micro = [session.batch([session.records[i] for i in indices])
             for indices in session.plan.micro_batches(step, session.ranks.rank)]
    local_tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    n_counted, n_tokens = sum_over_ranks([sum(_counted(b) for b in micro), local_tokens], session.ranks)
    total = 0.0
    for i, batch in enumerate(micro):
        last = i == len(micro) - 1
        quiet = session.module.no_sync() if hasattr(session.module, "no_sync") and not last else nullcontext()
        with quiet:
            loss_sum = session.module(**batch, reduction="sum")
            (loss_sum * (session.ranks.world / n_counted)).backward()
        total += loss_sum.item()
    grad_norm = _clip(session)
    lr = lr_at(step, session.options, session.plan.total_steps)
    for group in session.optimizer.param_groups:
        group["lr"] = lr
    session.optimizer.step()
    session.optimizer.zero_grad(set_to_none=True)
    (loss_total,) = sum_over_ranks([total], session.ranks)
    seconds = time.perf_counter() - start
    return {"step": step + 1, "epoch": session.plan.epoch_of(step), "loss": loss_total / n_counted, "lr": lr,
            "grad_norm": grad_norm, "tokens": int(n_tokens), "counted_tokens": int(n_counted),
            "tokens_per_s": n_tokens / seconds, "step_s": seconds}


def _clip(session: Session) -> float:
    """Clip the gradients' global norm at max_grad_norm (0: no clipping); the norm before clipping."""
    limit = session.options.max_grad_norm or math.inf
    norm = torch.nn.utils.clip_grad_norm_(session.trainable, limit)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    return float(norm)


@torch.no_grad()
def evaluate(session: Session) -> float:
    """The mean loss over every counted token of the evaluation data (sharded over the ranks as in training)."""
    module = session.module.module if hasattr(session.module, "no_sync") else session.module  # DDP: no sync needed
    module.train(False)
    total, counted = 0.0, 0
    ranks = session.ranks
    for indices in eval_batches(len(session.eval_records), session.options.batch_size, ranks.rank, ranks.world):
        batch = session.batch([session.eval_records[i] for i in indices or [0]])
        loss_sum = module(**batch, reduction="sum")  # an empty share runs too (FSDP2), and does not count
        if indices:
            total, counted = total + loss_sum.item(), counted + _counted(batch)
    module.train(True)
    total, counted = sum_over_ranks([total, counted], session.ranks)
    return total / counted


def _due(step: int, every: int, total: int) -> bool:
    return every > 0 and step % every == 0 and step != total


def train(session: Session, first_step: int, progress: Progress) -> None:
    """Steps first_step .. total_steps - 1, with checkpoints and evaluations as the options ask."""
    total, options = session.plan.total_steps, session.options
    for step in range(first_step, total):
        record = train_step(session, step)
        record["elapsed_s"] = round(progress_elapsed(progress), 3)
        session.history.append(record)
        progress.step(record)
        done = step + 1
        if session.eval_records and _due(done, options.eval_every, total):
            progress.eval(done, evaluate(session))
        if _due(done, options.save_every, total):
            save_checkpoint(session.out, done, session.module, session.optimizer, session.ranks, session.info)


def progress_elapsed(progress: Progress) -> float:
    return time.perf_counter() - progress.start
