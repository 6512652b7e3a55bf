"""What each `qwen2audio` subcommand does once its arguments are parsed (cli.py): load the model, read the audio,
stream the replies; and the helpers the interactive session (interactive.py) shares with them."""

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .chat_template import AUDIO_PLACEHOLDER, base_prompt
from .errors import InputError

if TYPE_CHECKING:
    from .pipeline import Qwen2Audio

ASR_PROMPT = "Detect the language and recognize the speech:"
CAPTION_PROMPT = "Generate the caption in English:"


def one_line(message: object) -> str:
    """An exception's text on one line (some libraries' messages span several)."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    return text or type(message).__name__


def notice(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr)


def generation_overrides(args: argparse.Namespace) -> dict:
    """Generation options given on the command line; the rest come from the checkpoint's generation_config.json."""
    opts = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        if getattr(args, name) is not None:
            opts[name] = getattr(args, name)
    if args.greedy:
        opts["do_sample"] = False
    elif sampling_flags(args):  # asking for a temperature means asking to sample, whatever the checkpoint's default
        opts["do_sample"] = True
    return opts


def sampling_flags(args: argparse.Namespace) -> list[str]:
    """The options given that only matter when sampling."""
    names = ("temperature", "top_k", "top_p")
    return [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]


def read_audio(path: str, long_audio: str) -> np.ndarray:
    """A file's 16 kHz waveform ('-': the bytes on stdin); cut to 30 s here, warning with the file's name, unless
    long_audio is "chunk"."""
    from .audio import load_audio, truncate_long_audio

    source = sys.stdin.buffer.read() if path == "-" else path
    clip = load_audio(source)
    return clip if long_audio == "chunk" else truncate_long_audio(clip, "<stdin>" if path == "-" else path)


def emit(pieces: Iterator[str], args: argparse.Namespace, pipe: "Qwen2Audio", load_seconds: float,
         key: str = "reply", **fields: str) -> str:
    """Stream a reply to stdout (or collect it for --json: {**fields, key: text, "timings": ...}); returns it."""
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
        print(json.dumps({**fields, key: text, "timings": timings}, ensure_ascii=False), flush=True)
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    return text


# ------------------------------------------------------------------------------------------------------ the commands
def load_pipeline(args: argparse.Namespace) -> tuple["Qwen2Audio", float]:
    import qwen2audio

    start = time.perf_counter()
    pipe = qwen2audio.load(args.model, dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
                           quantize=args.quantize, compile=args.compile, kernels=args.kernels,
                           mmap=True if args.mmap else None,
                           quiet=args.quiet)
    return pipe, time.perf_counter() - start


def user_message(text: str | None, clips: list[np.ndarray]) -> dict:
    # Clips are passed decoded (16 kHz arrays): each file is read once, when it is named.
    content: list[dict] = [{"type": "audio", "audio": clip} for clip in clips]
    if text:
        content.append({"type": "text", "text": text})
    return {"role": "user", "content": content}


def run_chat(args: argparse.Namespace, clips: list[np.ndarray]) -> int:
    """One reply to --prompt and/or --audio (the interactive session is interactive.py's)."""
    pipe, load_seconds = load_pipeline(args)
    conversation = [{"role": "system", "content": args.system}] if args.system else []
    conversation.append(user_message(args.prompt, clips))
    emit(pipe.stream(conversation, long_audio=args.long_audio, **generation_overrides(args)), args, pipe,
         load_seconds)
    return 0


def run_caption(args: argparse.Namespace, clips: list[np.ndarray]) -> int:
    pipe, load_seconds = load_pipeline(args)
    prompt = args.prompt if AUDIO_PLACEHOLDER in args.prompt else base_prompt(args.prompt, len(clips))
    emit(pipe.stream_prompt(prompt, clips, long_audio=args.long_audio, **generation_overrides(args)), args, pipe,
         load_seconds)
    return 0


def run_transcribe(args: argparse.Namespace, clips: list[np.ndarray]) -> int:
    """One transcript per file, in order: a line on stdout, a JSON object with --json, or DIR/NAME.txt with -o."""
    if args.language is not None and not args.language.isalpha():
        raise InputError(f"--language {args.language!r}: give a language code such as en, zh, yue or fr")
    prompt = base_prompt(ASR_PROMPT + (f" <|{args.language}|>" if args.language else ""))
    options = {"do_sample": False, **generation_overrides(args)}
    pipe, load_seconds = load_pipeline(args)
    for path, clip in zip(args.files, clips):
        pieces = pipe.stream_prompt(prompt, [clip], long_audio=args.long_audio, **options)
        if args.output_dir is None:
            emit(pieces, args, pipe, load_seconds, key="text", file=path)
            continue
        out = Path(args.output_dir) / f"{'stdin' if path == '-' else Path(path).stem}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(pieces) + "\n", encoding="utf-8")
        notice(args, f"wrote {out}")
    return 0
