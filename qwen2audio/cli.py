"""The `qwen2audio` command: talk to Qwen2-Audio about audio files from the shell.

    qwen2audio chat --audio question.wav                       voice chat: the audio is the question
    qwen2audio chat --audio clip.wav --prompt "What is that?"  one reply, streamed to stdout
    qwen2audio chat                                            an interactive session (/audio PATH, /reset, /exit)
    qwen2audio caption --model Qwen/Qwen2-Audio-7B --audio clip.wav
"""

import argparse
import json
import sys
import time
from collections.abc import Iterator

from .errors import Qwen2AudioError

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
HELP_INTERACTIVE = "type a message; /audio PATH attaches a recording to your next message; /reset; /exit"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="a local model folder or a Hub repo id (default: %(default)s)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights dtype; auto keeps the checkpoint's (bf16 for the Hub models)")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    g.add_argument("--quantize", choices=["int8"], default=None, help="weight-only int8 for the decoder")
    g.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    s = common.add_argument_group("generation")
    s.add_argument("--max-new-tokens", type=_positive_int, default=512)
    s.add_argument("--greedy", action="store_true", help="always take the most likely token (no sampling)")
    s.add_argument("--temperature", type=float)
    s.add_argument("--top-k", type=int)
    s.add_argument("--top-p", type=float)
    s.add_argument("--repetition-penalty", type=float)
    s.add_argument("--seed", type=int)
    s.add_argument("--long-audio", choices=["truncate", "chunk"], default="truncate",
                   help="audio over 30 s: keep the first 30 s (default, warns) or encode it in 30 s windows")
    o = common.add_argument_group("output")
    o.add_argument("--json", action="store_true", help="print one JSON object with the reply and timings")
    o.add_argument("--quiet", action="store_true", help="no progress bars or notices on stderr")
    o.add_argument("--debug", action="store_true", help="show tracebacks")

    parser = _Parser(prog="qwen2audio", description="Talk to Qwen2-Audio about audio files.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    sub = parser.add_subparsers(dest="command", metavar="{chat,caption}", parser_class=_Parser)
    chat = sub.add_parser("chat", parents=[common], help="chat with the Instruct model (one reply or a session)")
    chat.add_argument("--audio", action="append", default=[], metavar="FILE", help="an audio file (repeatable)")
    chat.add_argument("--prompt", help="the question; without it the audio itself is the question")
    chat.add_argument("--system", help="a system prompt instead of the default one")
    caption = sub.add_parser("caption", parents=[common], help="the base model's raw prompt format")
    caption.add_argument("--audio", action="append", required=True, metavar="FILE")
    caption.add_argument("--prompt", default="Generate the caption in English:")
    return parser


def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available() else "cpu"


def _options(args: argparse.Namespace) -> dict:
    opts = {"max_new_tokens": args.max_new_tokens, "seed": args.seed, "long_audio": args.long_audio}
    if args.greedy:
        opts["do_sample"] = False
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    return opts


def _user_message(text: str | None, audios: list[str]) -> dict:
    content = [{"type": "audio", "audio_url": path} for path in audios]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def _emit(pieces: Iterator[str], args: argparse.Namespace, pipe, load_seconds: float) -> str:
    start, reply = time.perf_counter(), []
    for piece in pieces:
        reply.append(piece)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    text = "".join(reply)
    if args.json:
        stats = dict(pipe.last_stats or {}, load_s=round(load_seconds, 3), total_s=round(time.perf_counter() - start, 3))
        print(json.dumps({"reply": text, "timings": stats}, ensure_ascii=False))
    else:
        sys.stdout.write("\n")
    return text


def _interactive(pipe, args: argparse.Namespace, load_seconds: float) -> None:
    history = [{"role": "system", "content": args.system}] if args.system else []
    pending: list[str] = []
    tty = sys.stdin.isatty()
    if tty and not args.quiet:
        print(HELP_INTERACTIVE, file=sys.stderr)
    while True:
        if tty:
            sys.stdout.write("> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        line = line.strip()
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history, pending = history[:1] if args.system else [], []
            continue
        if line.startswith("/audio"):
            path = line[len("/audio"):].strip()
            from .audio import load_audio

            try:
                load_audio(path)  # fail now, not after the next message
                pending.append(path)
            except Qwen2AudioError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if not line and not pending:
            continue
        history.append(_user_message(line or None, pending))
        pending = []
        reply = _emit(pipe.stream(history, **_options(args)), args, pipe, load_seconds)
        history.append({"role": "assistant", "content": reply})


def run(args: argparse.Namespace) -> None:
    import qwen2audio

    start = time.perf_counter()
    from .audio import load_audio

    for path in args.audio:  # check the audio before spending a minute on 16 GB of weights
        load_audio(path)
    pipe = qwen2audio.load(args.model, dtype=None if args.dtype == "auto" else args.dtype, device=_device(args.device),
                           quantize=args.quantize, compile=args.compile, quiet=args.quiet)
    load_seconds = time.perf_counter() - start
    if args.command == "caption":
        prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>" * len(args.audio) + args.prompt
        _emit(pipe.stream_prompt(prompt, args.audio, **_options(args)), args, pipe, load_seconds)
    elif args.prompt is None and not args.audio:
        _interactive(pipe, args, load_seconds)
    else:
        conversation = [{"role": "system", "content": args.system}] if args.system else []
        conversation.append(_user_message(args.prompt, args.audio))
        _emit(pipe.stream(conversation, **_options(args)), args, pipe, load_seconds)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        run(args)
    except (Qwen2AudioError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
