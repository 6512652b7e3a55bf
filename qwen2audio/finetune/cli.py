"""`qwen2audio finetune`: the command line over finetune() (options.py holds the defaults and their checks).

    qwen2audio finetune --model Qwen/Qwen2-Audio-7B-Instruct --data train.jsonl --out tuned --merge
    torchrun --nproc_per_node 2 -m qwen2audio finetune --model M --data train.jsonl --out tuned
"""

import argparse
from dataclasses import fields

from .options import DTYPES, LORA_TARGETS, PARTS, FinetuneOptions

DEFAULTS = {f.name: f.default for f in fields(FinetuneOptions) if f.name not in ("model", "data", "out")}


def _number(kind: type):
    def parse(text: str):
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
    return parse


def _data_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data and output")
    g.add_argument("--model", required=True, help="the base: a model folder or a Hub repo id")
    g.add_argument("--data", required=True, metavar="FILE.jsonl", help="one conversation (or base-model example) "
                   "a line; audio paths relative to the file (see docs/fine-tuning.md)")
    g.add_argument("--out", required=True, metavar="DIR", help="where the adapter (or model), log and checkpoints go")
    g.add_argument("--eval", metavar="FILE.jsonl", help="evaluation data: its loss is logged every --eval-every steps")
    g.add_argument("--eval-every", type=_number(int), metavar="N", help="0: at the end only (default)")
    g.add_argument("--skip-bad", action="store_true", help="leave bad lines out (counted, first reasons shown) "
                   "instead of stopping before step 1")
    g.add_argument("--max-audio-seconds", type=_number(float), metavar="S", help="longest clip (default 30)")
    g.add_argument("--merge", action="store_true", help="also write OUT/merged: the base with the adapter folded in")
    g.add_argument("--quiet", action="store_true", help="no progress on stderr")
    g.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _method_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what trains (default: LoRA r 8, alpha 16, on the decoder's attention and MLP)")
    g.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA (FSDP2 under torchrun)")
    g.add_argument("--lora-rank", type=_number(int), metavar="R", help="default 8")
    g.add_argument("--lora-alpha", type=_number(float), metavar="A", help="default: twice the rank")
    g.add_argument("--lora-dropout", type=_number(float), metavar="P", help="default 0")
    g.add_argument("--lora-targets", nargs="+", choices=LORA_TARGETS, metavar="PART",
                   help=f"of {', '.join(LORA_TARGETS)} (default: attention mlp)")
    g.add_argument("--freeze", nargs="+", choices=PARTS, metavar="PART", help=f"of {', '.join(PARTS)}")


def _loop_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("the loop")
    g.add_argument("--lr", type=_number(float), help="peak learning rate (default: 1e-4 LoRA, 1e-5 --full)")
    g.add_argument("--weight-decay", type=_number(float), metavar="W", help="AdamW's (default 0)")
    g.add_argument("--warmup-steps", type=_number(int), metavar="N", help="default: 3%% of the steps")
    g.add_argument("--epochs", type=_number(int), metavar="N", help="default 3")
    g.add_argument("--max-steps", type=_number(int), metavar="N", help="stop after N steps (overrides --epochs)")
    g.add_argument("--batch-size", type=_number(int), metavar="B", help="examples per process per micro-batch "
                   "(default 1)")
    g.add_argument("--grad-accum", type=_number(int), metavar="K", help="micro-batches per step (default 8)")
    g.add_argument("--max-grad-norm", type=_number(float), metavar="G", help="clip at G (default 1; 0: off)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward: less "
                   "memory, ~30%% more time")
    g.add_argument("--dtype", choices=DTYPES, help="auto: the checkpoint's for LoRA, float32 for --full")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], help="auto: cuda when there is one")
    g.add_argument("--threads", type=_number(int), metavar="N", help="torch's intra-op threads")
    g.add_argument("--seed", type=_number(int), help="default 0")
    g.add_argument("--save-every", type=_number(int), metavar="N", help="write a checkpoint every N steps")
    g.add_argument("--resume", metavar="DIR", help="continue from a checkpoint (or the latest one in an --out)")


def add_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune on your own audio conversations (LoRA or full; torchrun for many processes)",
        description="Fine-tune Qwen2-Audio on a JSONL file of conversations or base-model examples. The whole "
                    "file is checked before step 1. Runs the same under torchrun --nproc_per_node N (DDP for "
                    "LoRA, FSDP2 for --full). Guide: docs/fine-tuning.md.")
    _data_options(parser)
    _method_options(parser)
    _loop_options(parser)
    return parser


def options_from(args: argparse.Namespace) -> FinetuneOptions:
    """The options given on the command line; the rest keep FinetuneOptions' defaults."""
    given = {name: value for name in DEFAULTS
             if (value := getattr(args, name, None)) is not None and value is not False}  # 0 is a value
    for name in ("lora_targets", "freeze"):
        if name in given:
            given[name] = tuple(given[name])
    return FinetuneOptions(model=args.model, data=args.data, out=args.out, **given)


def run(args: argparse.Namespace) -> int:
    import torch

    from .run import finetune

    if args.threads:
        torch.set_num_threads(args.threads)
    finetune(options_from(args))
    return 0
