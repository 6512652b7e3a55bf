"""The interactive session of `qwen2audio chat`: messages from stdin, the history kept, commands starting with /.

    /audio PATH      attach a recording to your next message (an empty line then sends the audio alone)
    /set NAME VALUE  change a generation option (temperature, top_k, top_p, repetition_penalty, max_new_tokens,
                     seed; greedy on|off); /set alone shows them
    \"\"\"             starts and ends a message of several lines
    /reset, /help, /exit (or Ctrl-D)
"""

import argparse
import os
import shlex
import sys
from typing import TYPE_CHECKING

from .commands import emit, generation_overrides, notice, one_line, read_audio, user_message
from .errors import InputError, Qwen2AudioError

if TYPE_CHECKING:
    from .pipeline import Qwen2Audio

HELP = ('type a message and press Enter ("""  on a line of its own starts and ends a message of several lines); '
        "/audio PATH attaches a recording to your next message (an empty line then sends the audio alone); "
        "/set NAME VALUE changes an option (temperature, top_k, top_p, repetition_penalty, max_new_tokens, seed, "
        "greedy on|off; /set alone shows them); /reset starts over; /exit (or Ctrl-D) quits")
SETTABLE = {"temperature": float, "top_k": int, "top_p": float, "repetition_penalty": float, "max_new_tokens": int,
            "seed": int}
BLOCK = '"""'


def _error(text: str) -> None:
    print(f"error: {one_line(text)}", file=sys.stderr)


class Session:
    """One conversation with its history, the clips waiting for the next message and the options set so far."""

    def __init__(self, pipe: "Qwen2Audio", load_seconds: float, args: argparse.Namespace) -> None:
        self.pipe, self.args, self.load_seconds = pipe, args, load_seconds
        self.system = [{"role": "system", "content": args.system}] if args.system else []
        self.history, self.pending = list(self.system), []
        self.options = generation_overrides(args)
        self.tty = sys.stdin.isatty()
        self.failures = 0

    def read_line(self, prompt: str = "> ") -> str | None:
        """The next input line without its newline, or None at the end of input."""
        if self.tty:
            try:
                return input(prompt)  # line editing through readline, when it was imported
            except EOFError:
                print()
                return None
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def read_block(self, first: str) -> str | None:
        """A message of several lines: from after the opening \"\"\" to the closing one (None at end of input)."""
        lines = [first[len(BLOCK):]]
        while not lines[-1].endswith(BLOCK) or len(lines) == 1 and lines[0] == "":
            line = self.read_line(". ")
            if line is None:
                return None
            lines.append(line)
        lines[-1] = lines[-1][:-len(BLOCK)]
        return "\n".join(lines).strip("\n")

    def run(self) -> int:
        """Read messages until /exit or the end of input; the exit code (1 if a turn failed)."""
        if self.tty:
            try:
                import readline  # noqa: F401  (arrow keys and history for input())
            except ImportError:
                pass
            notice(self.args, HELP)
        while (line := self.read_line()) is not None:
            line = line.strip()
            if line.startswith(BLOCK):
                line = self.read_block(line)
                if line is None:
                    break
                self.send(line)
            elif not self.command(line):
                break
        return 1 if self.failures else 0

    def command(self, line: str) -> bool:
        """Act on one line; False to end the session."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            print(HELP, file=sys.stderr)
        elif name == "/reset":
            self.history, self.pending = list(self.system), []
            if self.tty:
                notice(self.args, "(new conversation)")
        elif name == "/audio":
            self.attach(rest.strip())
        elif name == "/set":
            self.set_option(rest.split())
        elif name.startswith("/") and name[1:].isalpha():
            self.fail(f"unknown command {name}; {HELP}")
        elif line or self.pending:
            self.send(line)
        return True

    def fail(self, message: str) -> None:
        _error(message)
        self.failures += 1

    def attach(self, text: str) -> None:
        if not text:
            return self.fail("/audio needs a path: /audio PATH")
        try:  # quotes and backslash escapes (as a terminal's drag and drop writes them) removed
            words = shlex.split(text)
        except ValueError:
            words = []
        path = os.path.expanduser(words[0] if len(words) == 1 else text)
        try:
            self.pending.append(read_audio(path, self.args.long_audio))  # a bad file is reported now
        except Qwen2AudioError as e:
            return self.fail(str(e))
        if self.tty:
            notice(self.args, f"(attached {path}, {len(self.pending[-1]) / 16000:.1f} s; it goes with your next "
                              "message)")

    def set_option(self, words: list[str]) -> None:
        """/set NAME VALUE, checked at once against every other option (GenerationOptions); /set alone lists."""
        if not words:
            current = self.pipe.options(**self.options)
            names = ["do_sample", *SETTABLE]
            print(", ".join(f"{n} {getattr(current, n)}" for n in names), file=sys.stderr)
            return None
        name = words[0].replace("-", "_")
        if len(words) != 2 or name not in (*SETTABLE, "greedy"):
            return self.fail(f"/set takes a name and a value: /set temperature 0.2 (names: {', '.join(SETTABLE)}, "
                             "greedy on|off)")
        try:
            change = parse_setting(name, words[1])
            self.pipe.options(**self.options | change)  # a bad value is an InputError naming it
        except InputError as e:
            return self.fail(str(e))
        self.options |= change
        if self.tty:
            notice(self.args, f"({name} set to {words[1]})")

    def send(self, text: str) -> None:
        """One turn: the message and pending clips in, the reply streamed out and kept in the history."""
        self.history.append(user_message(text or None, self.pending))
        self.pending = []
        try:
            reply = emit(self.pipe.stream(self.history, long_audio=self.args.long_audio, **self.options), self.args,
                         self.pipe, self.load_seconds)
        except Qwen2AudioError as e:  # e.g. the conversation outgrew the context: say so, keep the session
            self.history.pop()
            return self.fail(str(e))
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the session
            if not self.tty:
                raise
            self.history.pop()
            print("\n(interrupted)", file=sys.stderr)
            return None
        self.history.append({"role": "assistant", "content": reply})


def parse_setting(name: str, value: str) -> dict:
    """The options one /set changes: greedy on|off sets do_sample; a sampling value also turns sampling on."""
    if name == "greedy":
        if value not in ("on", "off"):
            raise InputError(f"/set greedy takes on or off, got {value!r}")
        return {"do_sample": value == "off"}
    try:
        parsed = SETTABLE[name](value)
    except ValueError:
        raise InputError(f"{name} must be {'an integer' if SETTABLE[name] is int else 'a number'}, got "
                         f"{value!r}") from None
    return {name: parsed, **({"do_sample": True} if name in ("temperature", "top_k", "top_p") else {})}
