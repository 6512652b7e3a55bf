"""The `qwen2audio` command: talk to Qwen2-Audio about audio files from the shell.

    qwen2audio chat --audio question.wav                       voice chat: the audio is the question
    qwen2audio chat --audio clip.wav --prompt "What is that?"  one reply, streamed to stdout
    qwen2audio chat                                            an interactive session (/audio PATH, /set, /exit)
    qwen2audio caption --audio clip.wav                        the base model's caption
    qwen2audio transcribe speech.wav --language en             speech to text (the base model's ASR prompt)
    qwen2audio eval --task asr --data librispeech_eval.jsonl   an official benchmark, scored the official way
    qwen2audio serve --port 8000                               an OpenAI-compatible server (the serve extra)
    qwen2audio finetune --model M --data train.jsonl --out DIR  fine-tune (LoRA by default; torchrun for more)

Errors a user can cause print one line `error: ...` on stderr and exit non-zero; --debug shows the traceback.
"""

import argparse
import logging
import math
import os
import sys
import traceback
import warnings
from collections.abc import Callable

from .chat_template import AUDIO_PLACEHOLDER
from .commands import (ASR_PROMPT, CAPTION_PROMPT, load_pipeline, one_line, read_audio, run_caption, run_chat,
                       run_transcribe, sampling_flags)
from .errors import InputError, Qwen2AudioError
from .interactive import HELP, Session

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
BASE_MODEL = "Qwen/Qwen2-Audio-7B"  # caption and transcribe use the base model's raw prompt format


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        sys.stderr.write(f"error: {one_line(message)} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def checked(kind: type, ok: Callable[[float], bool], requirement: str) -> Callable[[str], int | float]:
    """An argparse type: parse with `kind`, then require ok(value); the error names the requirement."""
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not (math.isfinite(value) and ok(value)):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    return parse


def _model_options(common: argparse.ArgumentParser, model: str) -> None:
    g = common.add_argument_group("model")
    g.add_argument("--model", default=model,
                   help="a local model folder or a Hub repo id, downloaded on first use (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype; auto keeps the checkpoint's (bf16 for the Hub models)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda if available, else mps, else cpu")
    g.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 for the decoder")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--kernels", default="auto", choices=["auto", "native", "avx2", "reference"],
                   help="CPU kernels: auto (chosen from the CPU; --debug logs the choice), native (torch's, in the "
                        "weights' dtype), avx2 (bf16 weights, fp32 arithmetic), reference (the plain model)")
    g.add_argument("--mmap", action="store_true",
                   help="keep the weight files mapped (by default they move into memory in the background after "
                        "loading): less memory, slower decoding")
    g.add_argument("--threads", type=checked(int, lambda v: v >= 1, ">= 1"), metavar="N",
                   help="torch's intra-op threads (default: torch's choice, one per core)")


def _generation_options(common: argparse.ArgumentParser) -> None:
    s = common.add_argument_group("generation (defaults: the checkpoint's generation_config.json)")
    s.add_argument("--max-new-tokens", type=checked(int, lambda v: v >= 1, ">= 1"), default=512, metavar="N",
                   help="most tokens in a reply (default: %(default)s)")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    # --temperature, --top-k and --top-p turn sampling on, even for a checkpoint whose default is greedy.
    s.add_argument("--temperature", type=checked(float, lambda v: v > 0, "> 0"), metavar="T",
                   help="sample with this temperature (--temperature, --top-k, --top-p turn sampling on)")
    s.add_argument("--top-k", type=checked(int, lambda v: v >= 0, ">= 0 (0 turns it off)"), metavar="K")
    s.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), metavar="P")
    s.add_argument("--repetition-penalty", type=checked(float, lambda v: v > 0, "> 0 (1 turns it off)"),
                   metavar="R")
    s.add_argument("--seed", type=checked(int, lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
                   help="makes sampling repeatable")
    s.add_argument("--long-audio", choices=["truncate", "chunk"], default="truncate",
                   help="audio over 30 s: keep the first 30 s (default, warns) or encode it in 30 s windows")


def common_options(model: str = DEFAULT_MODEL) -> argparse.ArgumentParser:
    """The options every subcommand takes: the model (default `model`), generation, output. A new parser for each
    subcommand: argparse shares a parent's actions, so one subcommand's defaults would change the others'."""
    common = argparse.ArgumentParser(add_help=False)
    _model_options(common, model)
    _generation_options(common)
    o = common.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object per reply, with timings")
    o.add_argument("--quiet", action="store_true", help="no progress bar or notices on stderr")
    o.add_argument("--debug", action="store_true", help="show the traceback of an error, and the choices logged")
    return common


def _add_subcommands(sub: argparse._SubParsersAction) -> None:
    chat = sub.add_parser("chat", parents=[common_options()],
                          help="chat with the Instruct model (one reply or a session)",
                          description=f"One reply to --audio/--prompt, streamed to stdout; with neither, an "
                                      f"interactive session: {HELP}.")
    chat.add_argument("--audio", action="append", default=[], metavar="FILE",
                      help="an audio file, '-' for stdin (repeatable)")
    chat.add_argument("--prompt", help="the question; without it the audio itself is the question (voice chat)")
    chat.add_argument("--system", help="a system prompt instead of the default one")
    caption = sub.add_parser("caption", parents=[common_options(BASE_MODEL)],
                             help="the base model's raw prompt format",
                             description="The base model (Qwen/Qwen2-Audio-7B): the audio tags, then the task text.")
    caption.add_argument("--audio", action="append", required=True, metavar="FILE",
                         help="an audio file, '-' for stdin (repeatable)")
    caption.add_argument("--prompt", default=CAPTION_PROMPT,
                         help=f"the task text after the audio tags (default: %(default)r); a prompt that holds its "
                              f"own {AUDIO_PLACEHOLDER} tags is used as it is")
    transcribe = sub.add_parser("transcribe", parents=[common_options(BASE_MODEL)],
                                help="speech to text, one transcript per file",
                                description=f"The base model's ASR prompt ({ASR_PROMPT!r}, then the language tag "
                                            "when given) for each file; greedy unless sampling options are given.")
    transcribe.add_argument("files", nargs="+", metavar="FILE", help="audio files ('-' for stdin)")
    transcribe.add_argument("--language", metavar="CODE", help="the spoken language, e.g. en, zh, yue, fr "
                                                               "(default: the model detects it)")
    transcribe.add_argument("-o", "--output-dir", metavar="DIR", help="write one DIR/NAME.txt per input instead")
    from .evaluation.cli import add_parser as add_eval_parser

    add_eval_parser(sub, common_options())
    from .serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub, common_options())
    from .finetune.cli import add_parser as add_finetune_parser

    add_finetune_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    examples = "examples:\n" + __doc__.split("\n", 2)[2]  # the module docstring below its first line
    parser = _Parser(prog="qwen2audio", description="Talk to Qwen2-Audio about audio files.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples)
    parser.add_argument("--version", action="version", version=f"qwen2audio {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_subcommands(sub)
    return parser


# ------------------------------------------------------------------------------------------------------ helpers
# ------------------------------------------------------------------------------------------------------ helpers
def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwen2audio")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command: `warning: ...` on one line, without the source line."""
    text = one_line(message).replace('long_audio="chunk"', "--long-audio chunk")  # the option's CLI spelling
    sys.stderr.write(f"warning: {text}\n")


def run(args: argparse.Namespace) -> int:
    """Check the device and read every audio file (before 16 GB of weights), then run the subcommand."""
    import torch

    from .pipeline import resolve_device

    if args.command == "finetune":  # its own options (finetune/cli.py); under torchrun, one rank of many
        from .finetune.cli import run as run_finetune

        return run_finetune(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = str(resolve_device(args.device))  # a device torch cannot use is an error before any file is read
    if args.command == "eval":
        from .evaluation.cli import run as run_eval

        return run_eval(args)
    if args.command == "serve":
        from .serve.cli import run as run_serve

        return run_serve(args)
    paths = args.files if args.command == "transcribe" else args.audio
    if paths.count("-") > 1:
        raise InputError("'-' (stdin) can be given as audio once only")
    clips = [read_audio(path, args.long_audio) for path in paths]
    if args.command == "chat" and args.prompt is None and not clips:
        return Session(*load_pipeline(args), args).run()  # the interactive session
    return {"chat": run_chat, "caption": run_caption, "transcribe": run_transcribe}[args.command](args, clips)


def _report(error: Exception, args: argparse.Namespace) -> int:
    """One line on stderr for an error (the traceback with --debug); the exit status."""
    if args.debug:
        traceback.print_exc()
    elif isinstance(error, (Qwen2AudioError, OSError)):
        print(f"error: {one_line(error)}", file=sys.stderr)
    elif type(error).__name__ in ("OutOfMemoryError", "MemoryError"):  # torch.cuda's, or Python's
        print(f"error: out of memory ({one_line(error)}); try --quantize int8, a smaller --dtype, shorter audio "
              "or fewer --max-new-tokens", file=sys.stderr)
    else:  # not a mistake of the user's: still one line, with the way to the details
        print(f"error: {type(error).__name__}: {one_line(error)} (an internal error; rerun with --debug for the "
              "traceback and report it)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help/--version (0), or a usage error already printed on one line (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if args.command is None:
        parser.print_help()
        return 0
    if getattr(args, "greedy", False) and sampling_flags(args):
        print(f"error: --greedy turns sampling off, so {', '.join(sampling_flags(args))} would do nothing; drop one "
              "or the other", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return run(args)
        except KeyboardInterrupt:
            print("", file=sys.stderr)
            return 130
        except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as shell tools do
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            except (OSError, ValueError):
                pass
            return 1
        except Exception as e:
            return _report(e, args)


if __name__ == "__main__":
    sys.exit(main())
