"""The `qwen2audio` command: talk to Qwen2-Audio about audio files from the shell.

    qwen2audio chat --audio question.wav                       voice chat: the audio is the question
    qwen2audio chat --audio clip.wav --prompt "What is that?"  one reply, streamed to stdout
    qwen2audio chat                                            an interactive session (/audio PATH, /reset, /exit)
    qwen2audio caption --model Qwen/Qwen2-Audio-7B --audio clip.wav

Errors a user can cause print one line `error: ...` on stderr and exit non-zero; --debug shows the traceback.
"""

import argparse
import json
import math
import os
import shlex
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from .errors import Qwen2AudioError
from .chat_template import AUDIO_PLACEHOLDER, base_prompt

if TYPE_CHECKING:
    from .pipeline import Qwen2Audio

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
HELP_INTERACTIVE = ("type a message and press Enter; /audio PATH attaches a recording to your next message (an empty "
                    "line then sends the audio alone); /reset starts over; /exit (or Ctrl-D) quits")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        sys.stderr.write(f"error: {_one_line(message)} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _checked(kind: type, ok: Callable[[float], bool], requirement: str) -> Callable[[str], int | float]:
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


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="a local model folder or a Hub repo id, downloaded on first use (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype; auto keeps the checkpoint's (bf16 for the Hub models)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: cuda if available, else mps, else cpu")
    g.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 for the decoder")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    g.add_argument("--mmap", action="store_true",
                   help="map the weight files instead of reading them: loads at once, decodes slower")
    s = common.add_argument_group("generation (defaults: the checkpoint's generation_config.json)")
    s.add_argument("--max-new-tokens", type=_checked(int, lambda v: v >= 1, ">= 1"), default=512, metavar="N",
                   help="most tokens in a reply (default: %(default)s)")
    s.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    # --temperature, --top-k and --top-p turn sampling on, even for a checkpoint whose default is greedy.
    s.add_argument("--temperature", type=_checked(float, lambda v: v > 0, "> 0"), metavar="T",
                   help="sample with this temperature (--temperature, --top-k, --top-p turn sampling on)")
    s.add_argument("--top-k", type=_checked(int, lambda v: v >= 0, ">= 0 (0 turns it off)"), metavar="K")
    s.add_argument("--top-p", type=_checked(float, lambda v: 0 < v <= 1, "in (0, 1]"), metavar="P")
    s.add_argument("--repetition-penalty", type=_checked(float, lambda v: v > 0, "> 0 (1 turns it off)"),
                   metavar="R")
    s.add_argument("--seed", type=_checked(int, lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
                   help="makes sampling repeatable")
    s.add_argument("--long-audio", choices=["truncate", "chunk"], default="truncate",
                   help="audio over 30 s: keep the first 30 s (default, warns) or encode it in 30 s windows")
    o = common.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object per reply, with timings")
    o.add_argument("--quiet", action="store_true", help="no progress bar or notices on stderr")
    o.add_argument("--debug", action="store_true", help="show the traceback of an error")

    examples = "examples:\n" + __doc__.split("\n", 2)[2]  # the module docstring below its first line
    parser = _Parser(prog="qwen2audio", description="Talk to Qwen2-Audio about audio files.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=examples)
    sub = parser.add_subparsers(dest="command", metavar="{chat,caption}", parser_class=_Parser)
    chat = sub.add_parser("chat", parents=[common], help="chat with the Instruct model (one reply or a session)",
                          description="One reply to --audio/--prompt, streamed to stdout; with neither, an "
                                      f"interactive session: {HELP_INTERACTIVE}.")
    chat.add_argument("--audio", action="append", default=[], metavar="FILE", help="an audio file (repeatable)")
    chat.add_argument("--prompt", help="the question; without it the audio itself is the question (voice chat)")
    chat.add_argument("--system", help="a system prompt instead of the default one")
    caption = sub.add_parser("caption", parents=[common], help="the base model's raw prompt format",
                             description="The base model (Qwen/Qwen2-Audio-7B): the audio tags, then the task text.")
    caption.add_argument("--audio", action="append", required=True, metavar="FILE",
                         help="an audio file (repeatable)")
    caption.add_argument("--prompt", default="Generate the caption in English:",
                         help=f"the task text after the audio tags (default: %(default)r); a prompt that holds its "
                              f"own {AUDIO_PLACEHOLDER} tags is used as it is")
    return parser


# ------------------------------------------------------------------------------------------------------ helpers
def _one_line(message: object) -> str:
    """An exception's text on one line (some libraries' messages span several)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text or type(message).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command: `warning: ...` on one line, without the source line."""
    text = _one_line(message).replace('long_audio="chunk"', "--long-audio chunk")  # the option's CLI spelling
    sys.stderr.write(f"warning: {text}\n")


def _notice(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def _options(args: argparse.Namespace) -> dict:
    """Generation options given on the command line; the rest come from the checkpoint's generation_config.json."""
    opts = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "long_audio": args.long_audio}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.greedy:
        opts["do_sample"] = False
    elif _sampling_flags(args):  # asking for a temperature means asking to sample, whatever the checkpoint's default
        opts["do_sample"] = True
    return opts


def _sampling_flags(args: argparse.Namespace) -> list[str]:
    """The options given that only matter when sampling."""
    names = ("temperature", "top_k", "top_p")
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def _user_message(text: str | None, clips: list[np.ndarray]) -> dict:
    # Clips are passed decoded (16 kHz arrays): each file is read once, when it is named.
    content: list[dict] = [{"type": "audio", "audio": clip} for clip in clips]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _emit(pieces: Iterator[str], args: argparse.Namespace, pipe: "Qwen2Audio", load_seconds: float) -> str:
    """Stream a reply to stdout (or collect it for --json); returns its text."""
    start, reply = time.perf_counter(), []
    for piece in pieces:
        reply.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    text = "".join(reply)
    if args.json:
        timings = dict(pipe.last_stats or {}, load_s=round(load_seconds, 3),
                       reply_s=round(time.perf_counter() - start, 3))
        print(json.dumps({"reply": text, "timings": timings}, ensure_ascii=False), flush=True)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return text


# -------------------------------------------------------------------------------------------- interactive session
def _read_line(tty: bool) -> str | None:
    """The next input line without its newline, or None at the end of input."""
    if tty:
        try:
            return input("> ")  # line editing through readline, when it was imported
        except EOFError:
            print()
            return None
    line = sys.stdin.readline()
    return line.rstrip("\r\n") if line else None


def _audio_argument(text: str) -> str:
    """The path after /audio: quotes and backslash escapes (as a terminal's drag and drop writes them) removed."""
    try:
        words = shlex.split(text)
    except ValueError:
        words = []
    return os.path.expanduser(words[0] if len(words) == 1 else text)


def _interactive(pipe: "Qwen2Audio", args: argparse.Namespace, load_seconds: float) -> int:
    """Read messages from stdin until /exit or the end of input; returns the exit code (1 if a turn failed)."""
    from .audio import load_audio

    system = [{"role": "system", "content": args.system}] if args.system else []
    history, pending = list(system), []
    tty = sys.stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (arrow keys and history for input())
        except ImportError:
            pass
        _notice(args, HELP_INTERACTIVE)
    failures = 0
    while (line := _read_line(tty)) is not None:
        line = line.strip()
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if command == "/help":
            print(HELP_INTERACTIVE, file=sys.stderr)
        elif command == "/reset":
            history, pending = list(system), []
            if tty:
                _notice(args, "(new conversation)")
        elif command == "/audio":
            if not rest.strip():
                print("error: /audio needs a path: /audio PATH", file=sys.stderr)
                failures += 1
                continue
            path = _audio_argument(rest.strip())
            try:
                pending.append(load_audio(path))  # read it now: a bad file is reported before the next message
            except Qwen2AudioError as e:
                print(f"error: {_one_line(e)}", file=sys.stderr)
                failures += 1
                continue
            if tty:
                _notice(args, f"(attached {path}, {len(pending[-1]) / 16000:.1f} s; it goes with your next message)")
        elif command.startswith("/") and command[1:].isalpha():
            print(f"error: unknown command {command}; {HELP_INTERACTIVE}", file=sys.stderr)
            failures += 1
        elif line or pending:
            history.append(_user_message(line or None, pending))
            pending = []
            try:
                reply = _emit(pipe.stream(history, **_options(args)), args, pipe, load_seconds)
            except Qwen2AudioError as e:  # e.g. the conversation outgrew the context: say so, keep the session
                history.pop()
                print(f"error: {_one_line(e)}", file=sys.stderr)
                failures += 1
                continue
            except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
                if not tty:
                    raise
                history.pop()
                print("\n(interrupted)", file=sys.stderr)
                continue
            history.append({"role": "assistant", "content": reply})
    return 1 if failures else 0


# ------------------------------------------------------------------------------------------------------ the command
def run(args: argparse.Namespace) -> int:
    import qwen2audio
    from .audio import load_audio
    from .pipeline import resolve_device

    device = str(resolve_device(args.device))  # a device torch cannot use is an error before any file is read
    # Check every audio file before spending a minute on 16 GB of weights.
    clips = [load_audio(path) for path in args.audio]
    start = time.perf_counter()
    pipe = qwen2audio.load(args.model, dtype=None if args.dtype == "auto" else args.dtype, device=device,
                           quantize=args.quantize, compile=args.compile, mmap=args.mmap, quiet=args.quiet)
    load_seconds = time.perf_counter() - start
    if args.command == "caption":
        prompt = args.prompt if AUDIO_PLACEHOLDER in args.prompt else base_prompt(args.prompt, len(clips))
        _emit(pipe.stream_prompt(prompt, clips, **_options(args)), args, pipe, load_seconds)
        return 0
    if args.prompt is None and not clips:
        return _interactive(pipe, args, load_seconds)
    conversation = [{"role": "system", "content": args.system}] if args.system else []
    conversation.append(_user_message(args.prompt, clips))
    _emit(pipe.stream(conversation, **_options(args)), args, pipe, load_seconds)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0), or a usage error already printed on one line (2)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    if args.command is None:
        parser.print_help()
        return 0
    if args.greedy and _sampling_flags(args):
        print(f"error: --greedy turns sampling off, so {', '.join(_sampling_flags(args))} would do nothing; drop one "
              "or the other", file=sys.stderr)
        return 2
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
            if args.debug:
                traceback.print_exc()
            elif isinstance(e, (Qwen2AudioError, OSError)):
                print(f"error: {_one_line(e)}", file=sys.stderr)
            elif type(e).__name__ in ("OutOfMemoryError", "MemoryError"):  # torch.cuda's, or Python's
                print(f"error: out of memory ({_one_line(e)}); try --quantize int8, a smaller --dtype, shorter audio "
                      "or fewer --max-new-tokens", file=sys.stderr)
            else:  # not a mistake of the user's: still one line, with the way to the details
                print(f"error: {type(e).__name__}: {_one_line(e)} (an internal error; rerun with --debug for the "
                      "traceback and report it)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
