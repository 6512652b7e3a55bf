"""Fine-tuning on your own audio conversations: `qwen2audio finetune`, and `finetune()` from Python.

data.py (the JSONL file, checked whole first), batches.py (which examples each step and rank take), loop.py (the
step: loss over the step's tokens, AdamW, clipping, warm-up + cosine), state.py (atomic checkpoints, resume),
distributed.py (torchrun: DDP for LoRA, FSDP2 for full fine-tuning), outputs.py, report.py, run.py, cli.py.
"""

from .options import FinetuneOptions

__all__ = ["FinetuneOptions", "finetune"]


def finetune(options: FinetuneOptions | None = None, **kwargs) -> dict:
    """Fine-tune as `qwen2audio finetune` does; see run.finetune. (Imported when called: building the command's
    parser, which imports this package for its options, then stays quick.)"""
    from .run import finetune as run

    return run(options, **kwargs)
