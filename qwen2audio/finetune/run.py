"""`finetune()`: the whole run, one process or each rank of a torchrun group.

    from qwen2audio.finetune import finetune
    summary = finetune(model="Qwen/Qwen2-Audio-7B-Instruct", data="train.jsonl", out="tuned", max_steps=100)

The data is read and checked whole before the model is loaded (each rank checks a shard of the lines); the model is
loaded, given LoRA adapters or frozen in part, wrapped for the ranks, and trained; rank 0 writes the outputs.
"""

import dataclasses
import functools
import json
import resource
import sys
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..lora import LoraConfig, apply_lora, lora_targets
from ..pipeline import load_model
from ..pipeline_checks import resolve_model_path
from ..config import Qwen2AudioConfig
from ..tokenizer import Tokenizer
from .batches import Plan
from .data import Record, check_lines, judge, read_lines
from ..ranks import Ranks, barrier, gather, shard, teardown
from .distributed import start_ranks, wrap
from .loop import Session, evaluate, train
from .options import FinetuneOptions
from .outputs import write_outputs
from .report import Progress, summary_text
from .state import check_compatible, data_fingerprint, find_checkpoint, load_checkpoint, read_state

_PARTS = {"encoder": "audio_tower", "projector": "multi_modal_projector", "decoder": "language_model"}


def read_data(path: str, tokenizer: Tokenizer, context: int, options: FinetuneOptions, ranks: Ranks,
              say) -> list[Record]:
    """Every line checked (each rank a shard, results shared): the good records, or an error for bad lines."""
    lines = read_lines(path)
    mine = [lines[i] for i in shard(len(lines), ranks.rank, ranks.world)]
    good, bad = check_lines(Path(path), mine, tokenizer, context, options.max_audio_seconds)
    parts = gather((good, bad), ranks)
    good, bad = [r for g, _ in parts for r in g], [b for _, b in parts for b in b]
    if notice := judge(Path(path), good, bad, options.skip_bad):
        say(f"warning: {notice}")
    return good


@functools.lru_cache(maxsize=1)
def _tokenizer(folder: Path, stamp: tuple) -> Tokenizer:
    """The folder's tokenizer, kept for the next run of this process while the files stay as they are (reading
    the 7 MB tokenizer.json takes ~1.4 s)."""
    return Tokenizer.from_folder(folder)


def tokenizer_of(folder: Path) -> Tokenizer:
    files = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
             "added_tokens.json")
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in map(folder.joinpath, files)
                  if p.is_file())
    return _tokenizer(folder, stamp)


def prepare_model(options: FinetuneOptions, folder: Path, ranks: Ranks) -> torch.nn.Module:
    """The base model, with LoRA adapters (everything else frozen) or with the --freeze parts frozen."""
    dtype = None if options.dtype == "auto" else options.dtype
    model = load_model(folder, dtype=dtype, device=ranks.device, quiet=True)
    torch.manual_seed(options.seed)  # the adapters' initial values
    if options.full:
        for part in options.freeze:
            getattr(model, _PARTS[part]).requires_grad_(False)
    else:
        apply_lora(model, LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha,
                                     lora_dropout=options.lora_dropout,
                                     target_modules=lora_targets(**options.lora_parts())))
    model.set_gradient_checkpointing(options.gradient_checkpointing)
    return model.train()


def _session(options: FinetuneOptions, ranks: Ranks, say) -> Session:
    folder = resolve_model_path(options.model, quiet=options.quiet or not ranks.is_main)
    config = Qwen2AudioConfig.from_file(folder)
    tokenizer = tokenizer_of(folder)
    context = config.text_config.max_position_embeddings
    records = read_data(options.data, tokenizer, context, options, ranks, say)
    eval_records = read_data(options.eval, tokenizer, context, options, ranks, say) if options.eval else []
    plan = Plan(len(records), options.batch_size, ranks.world, options.grad_accum, options.epochs,
                options.max_steps, options.seed)
    plan.check(options.data)
    options = options.resolved(plan.total_steps)
    say(f"fine-tuning {folder} on {len(records)} examples of {options.data}: {plan.total_steps} steps of "
        f"{plan.global_batch} examples ({ranks.world} process(es) on {ranks.device.type}), "
        f"{'full' if options.full else 'LoRA'}\n"
        f"{options.describe()}")
    model = prepare_model(options, folder, ranks)
    module = wrap(model, ranks, options.full)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
    info = {"options": options.compared(), "data": {"sha256": data_fingerprint(options.data),
                                                     "examples": len(records)}, "base": str(folder)}
    return Session(options, ranks, model, module, optimizer, tokenizer, records, eval_records, plan,
                   Path(options.out), info)


def _resume(session: Session) -> int:
    """Load --resume's checkpoint; the step it ends (0 without --resume)."""
    if not session.options.resume:
        return 0
    folder = find_checkpoint(session.options.resume)
    check_compatible(read_state(folder), folder, session.ranks, session.info)
    state = load_checkpoint(folder, session.module, session.optimizer, session.ranks)
    return state["step"]


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux: the process's peak RSS


def _finish(session: Session, start: float, first_step: int, progress: Progress) -> dict:
    options, history = session.options, session.history
    eval_loss = evaluate(session) if session.eval_records else None
    if eval_loss is not None:
        progress.eval(session.plan.total_steps, eval_loss)
    outputs = write_outputs(session)
    steps = session.plan.total_steps - first_step
    return {"steps": steps, "examples": steps * session.plan.global_batch,
            "tokens": sum(r["tokens"] for r in history), "seconds": time.perf_counter() - start,
            "first_loss": history[0]["loss"] if history else float("nan"),
            "last_loss": history[-1]["loss"] if history else float("nan"), "eval_loss": eval_loss,
            "peak_memory_gb": max(gather(peak_memory_gb(session.ranks.device), session.ranks)),
            "losses": [r["loss"] for r in history], "outputs": outputs,
            "world": session.ranks.world, "out": str(options.out)}


def finetune(options: FinetuneOptions | None = None, **kwargs) -> dict:
    """Fine-tune as `qwen2audio finetune` does (FinetuneOptions or its fields as keywords); returns the summary
    (also written to OUT/summary.json): steps, tokens, seconds, first and last loss, eval loss, peak memory, the
    per-step losses and the output folders."""
    options = dataclasses.replace(options, **kwargs) if options else FinetuneOptions(**kwargs)
    ranks = start_ranks(options.device)
    try:
        out = Path(options.out)
        if ranks.is_main:
            out.mkdir(parents=True, exist_ok=True)
        say = (lambda text: print(text, file=sys.stderr)) if ranks.is_main and not options.quiet else \
            (lambda text: None)
        start = time.perf_counter()
        session = _session(options, ranks, say)
        first_step = _resume(session)
        if first_step >= session.plan.total_steps:
            raise InputError(f"--resume: the checkpoint is at step {first_step}, the run ends at step "
                             f"{session.plan.total_steps}: nothing is left to train")
        progress = Progress(out, session.plan.total_steps, first_step, ranks.is_main, options.quiet)
        train(session, first_step, progress)
        summary = _finish(session, start, first_step, progress)
        if ranks.is_main:
            (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            say(summary_text(summary))
        barrier(ranks)
        return summary
    finally:
        teardown(ranks)
