"""The official evaluation jsonl files: one JSON object per line, read into Items; bad lines become BadItems.

ASR, S2TT, SER and VSC lines hold {"audio": PATH, "prompt": TEXT, "gt": REFERENCE, "source": NAME}; chat lines
(AIR-Bench) hold {"audio": PATH, "id": ID, "query": TEXT}. A relative audio path is taken relative to the data
file's folder (or to `audio_root` when given). A chat item's id is its "id" (the judge joins on it); any other
item's id is its line number (the official ASR, S2TT, SER and VSC scripts read no id).
"""

import json
import shutil
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EvalError

SAMPLE_RATE = 16000
DECODE_TIMEOUT_S = 300
AUDIO_DECODERS = ("auto", "ffmpeg", "qwen2audio")


@dataclass(frozen=True)
class Item:
    index: int  # position among the data file's good items: results are written in this order
    line: int  # 1-based line in the data file
    id: str | int
    audio: str  # as written in the file
    audio_path: str  # resolved: a local path or an http(s) URL
    prompt: str  # the item's prompt (or chat query)
    reference: str | None  # "gt"; None for chat
    source: str


@dataclass(frozen=True)
class BadItem:
    file: str
    line: int
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}"


def _fields(task: str) -> tuple[str, ...]:
    return ("audio", "id", "query") if task == "chat" else ("audio", "prompt", "gt")


def _resolve_audio(audio: str, folder: Path) -> str:
    if audio.startswith(("http://", "https://")):
        return audio
    path = Path(audio).expanduser()
    return str(path if path.is_absolute() else folder / path)


def _parse_line(text: str, task: str, folder: Path) -> tuple[dict, str]:
    """One line -> (its fields, resolved audio path); raises EvalError with the line's problem."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise EvalError(f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in _fields(task) if k not in row]
    if missing:
        raise EvalError(f"missing key(s) {', '.join(missing)} (a {task} line needs {', '.join(_fields(task))})")
    for key in ("audio", "prompt", "gt", "query", "source"):
        if key in row and not isinstance(row[key], str):
            raise EvalError(f'"{key}" must be a string, got {type(row[key]).__name__}')
    audio = _resolve_audio(row["audio"], folder)
    if not audio.startswith(("http://", "https://")) and not Path(audio).is_file():
        raise EvalError(f"audio file {audio} not found (relative paths are read from the data file's folder, or "
                        "from --audio-root)")
    return row, audio


def read_items(path: str | Path, task: str, audio_root: str | Path | None = None,
               limit: int | None = None) -> tuple[list[Item], list[BadItem]]:
    """The good items (the first `limit` of them) and the bad lines of a data file, both in file order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"cannot read the data file {path}: {e}") from None
    folder = Path(audio_root) if audio_root is not None else path.parent
    items: list[Item] = []
    bad: list[BadItem] = []
    seen: dict[str | int, int] = {}
    for number, text in enumerate(lines, start=1):
        if not text.strip() or (limit is not None and len(items) >= limit):
            continue
        try:
            row, audio = _parse_line(text, task, folder)
            item_id = row["id"] if task == "chat" else number
            if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                raise EvalError(f'"id" must be a string or an integer, got {type(item_id).__name__}')
            if item_id in seen:
                raise EvalError(f"id {item_id!r} already used on line {seen[item_id]}")
        except EvalError as e:
            bad.append(BadItem(str(path), number, str(e)))
            continue
        seen[item_id] = number
        prompt, reference = (row["query"], None) if task == "chat" else (row["prompt"], row["gt"])
        items.append(Item(len(items), number, item_id, row["audio"], audio, prompt, reference,
                          row.get("source", path.stem)))
    return items, bad


# ---------------------------------------------------------------------------------------------------------- audio
def resolve_decoder(name: str) -> str:
    """"auto" -> "ffmpeg" when the program is on PATH (the official scripts' decoder), else "qwen2audio"."""
    if name not in AUDIO_DECODERS:
        raise EvalError(f"audio decoder must be one of {', '.join(AUDIO_DECODERS)}, got {name!r}")
    if name == "auto":
        return "ffmpeg" if shutil.which("ffmpeg") else "qwen2audio"
    if name == "ffmpeg" and not shutil.which("ffmpeg"):
        raise EvalError("--audio-decoder ffmpeg: the ffmpeg program is not on PATH; install it (apt-get install "
                        "ffmpeg) or use --audio-decoder qwen2audio")
    return name


def _read_bytes(source: str) -> bytes:
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=60) as response:
            return response.read()
    return Path(source).read_bytes()


def ffmpeg_decode(source: str) -> np.ndarray:
    """The file's bytes through `ffmpeg -ac 1 -ar 16000 -f f32le` (stdin to stdout), the decoding the official
    scripts get from transformers.pipelines.audio_utils.ffmpeg_read: ffmpeg's own down-mix and resampler."""
    command = ["ffmpeg", "-i", "pipe:0", "-ac", "1", "-ar", str(SAMPLE_RATE), "-f", "f32le", "-hide_banner",
               "-loglevel", "quiet", "pipe:1"]
    done = subprocess.run(command, input=_read_bytes(source), capture_output=True, timeout=DECODE_TIMEOUT_S)
    samples = np.frombuffer(done.stdout, dtype="<f4")
    if done.returncode != 0 or samples.size == 0:
        raise EvalError(f"ffmpeg could not decode {source} (exit status {done.returncode})")
    return samples.copy()


def decode_audio(source: str, decoder: str) -> np.ndarray:
    """16 kHz mono float32 samples with the chosen decoder ("ffmpeg" or "qwen2audio"); errors are EvalError or
    the package's AudioError, both naming the file."""
    if decoder == "ffmpeg":
        try:
            return ffmpeg_decode(source)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EvalError(f"cannot decode {source} with ffmpeg: {e}") from None
    from .. import load_audio

    return load_audio(source)
