"""`qwen2audio eval`: the official Qwen2-Audio benchmarks from the command line (one process, or torchrun).

    qwen2audio eval --task asr --data librispeech_eval.jsonl --model Qwen/Qwen2-Audio-7B
    torchrun --nproc_per_node 8 -m qwen2audio eval --task s2tt --data covost2_eval.jsonl --device cuda
"""

import argparse
import copy

from .data import AUDIO_DECODERS
from .errors import EvalError
from .tasks import TASKS

# Options of the shared parent that the official decoding fixes; eval refuses them rather than ignore them.
FIXED_BY_THE_RECIPE = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p",
                       "repetition_penalty": "--repetition-penalty", "seed": "--seed", "json": "--json"}


def _at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def add_parser(subparsers: "argparse._SubParsersAction", common_parent: argparse.ArgumentParser
               ) -> argparse.ArgumentParser:
    """Register `eval` with the main command; the shared options (model, dtype, device, ...) come from
    common_parent, copied so that eval's own defaults (no default model, 256 new tokens) leave the other
    commands' untouched."""
    tasks = ", ".join(f"{name} ({task.description})" for name, task in TASKS.items())
    parser = subparsers.add_parser(
        "eval", parents=[copy.deepcopy(common_parent)], help="the official benchmarks, scored the official way",
        description=f"Run one official Qwen2-Audio evaluation file (eval_audio jsonl) through the model with the "
                    f"official decoding and score it as the official scripts do. Tasks: {tasks}. Results: one JSON "
                    "line per item in --out, written as they come; a summary table per source on stdout and in "
                    "OUT.summary.json. Under torchrun the items are sharded over the ranks. --model defaults to the "
                    "official scripts' checkpoint: Qwen/Qwen2-Audio-7B, or Qwen/Qwen2-Audio-7B-Instruct for chat.")
    g = parser.add_argument_group("evaluation")
    g.add_argument("--task", required=True, choices=list(TASKS))
    g.add_argument("--data", required=True, metavar="FILE.jsonl", help="an official evaluation jsonl file")
    g.add_argument("--out", metavar="FILE.jsonl", help="results file (default: DATA_STEM.TASK.jsonl here)")
    g.add_argument("--batch-size", type=_at_least(1), metavar="N",
                   help="items per generate call (default: the official launcher's: 20 for asr, else 8)")
    g.add_argument("--limit", type=_at_least(1), metavar="N", help="only the first N items of the file")
    g.add_argument("--resume", action="store_true", help="keep the results already in --out, run the rest")
    g.add_argument("--language", help="asr: the language to normalise for (en, zh, yue, fr, ...); default: from "
                                      "the official file name, else from the <|xx|> tag ending the prompts")
    g.add_argument("--audio-root", metavar="DIR", help="folder that relative audio paths start from (default: "
                                                       "the data file's folder)")
    g.add_argument("--audio-decoder", choices=AUDIO_DECODERS, default="auto",
                   help="auto: ffmpeg when on PATH (the official scripts' decoder), else qwen2audio.load_audio")
    parser.set_defaults(model=None, max_new_tokens=256)  # None: the task's official checkpoint
    return parser


def _check_fixed_options(args: argparse.Namespace) -> None:
    given = [flag for name, flag in FIXED_BY_THE_RECIPE.items() if getattr(args, name, None) not in (None, False)]
    if getattr(args, "long_audio", "truncate") != "truncate":
        given.append("--long-audio chunk")
    if given:
        raise EvalError(f"eval decodes as the official scripts do (greedy, the rest from the checkpoint's "
                        f"generation_config.json, audio cut at 30 s), so {', '.join(given)} cannot apply; drop it")


def run(args: argparse.Namespace) -> int:
    import torch

    from .runner import evaluate

    _check_fixed_options(args)
    device = args.device if args.device not in (None, "auto") else "cuda" if torch.cuda.is_available() else "cpu"
    load_options = {name: getattr(args, name) for name in ("quantize", "compile", "mmap") if getattr(args, name, None)}
    evaluate(args.task, args.data, args.model, args.out, batch_size=args.batch_size, limit=args.limit,
             resume=args.resume, language=args.language, audio_root=args.audio_root,
             audio_decoder=args.audio_decoder, max_new_tokens=args.max_new_tokens,
             dtype=None if args.dtype in (None, "auto") else args.dtype, device=device, load_options=load_options,
             quiet=getattr(args, "quiet", False))
    return 0
