"""Training data: a JSONL file, one example a line, read and checked whole before the first step.

A line is a conversation in the chat format `chat` takes, either a list of messages or {"messages": [...]}:

    {"messages": [{"role": "user", "content": [{"type": "audio", "audio_url": "clips/a.wav"},
                                               {"type": "text", "text": "What's that sound?"}]},
                  {"role": "assistant", "content": "Glass breaking."}]}

or a base-model example, {"audio": PATH or [PATHS] (optional), "prompt": TEXT, "answer": TEXT}, whose prompt holds
one <|audio_bos|><|AUDIO|><|audio_eos|> per clip (put in front when it holds none). Audio paths are relative to the
JSONL file's folder. Only the answers count in the loss (labels.py). A line is bad when it is not a JSON example,
an audio file is missing, cannot be decoded or is longer than max_audio_seconds, the conversation has no assistant
answer, or the example is longer than the model's context; `read_data` names the file and line of each.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..audio import load_audio
from ..chat_template import AUDIO_PLACEHOLDER, _AUDIO_SOURCE_KEYS, as_conversations
from ..errors import AudioError, InputError, Qwen2AudioError
from ..features import SAMPLE_RATE
from ..labels import base_example, conversation_example
from ..model import counted_targets
from ..tokenizer import AUDIO, Tokenizer

SHOWN_REASONS = 3  # bad lines quoted in the error (or, with skip_bad, in the notice)


@dataclass(frozen=True)
class Record:
    """One good line: what it holds (audio paths resolved) and its size."""
    line: int
    conversation: list | None  # a conversation's messages, or None for a base-model example
    prompt: str
    answer: str
    audio: tuple[str, ...]  # a base-model example's clips (a conversation's are in its messages)
    n_tokens: int
    n_counted: int


def _resolve(path: object, folder: Path) -> str:
    if not isinstance(path, str) or not path:
        raise InputError(f"an audio path must be a non-empty string, got {path!r:.60}")
    resolved = Path(path).expanduser()
    resolved = resolved if resolved.is_absolute() else folder / resolved
    if not resolved.is_file():
        raise AudioError(f"audio file {path} not found (looked for {resolved}; paths are relative to the data "
                         "file's folder)")
    return str(resolved)


def _conversation(messages: object, folder: Path) -> list:
    """The messages with each audio item's path resolved into "audio_url"."""
    (conversation,), _ = as_conversations(messages)
    resolved = []
    for message in conversation:
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                key = next((k for k in _AUDIO_SOURCE_KEYS if isinstance(item, dict) and k in item), None)
                if key is None:
                    items.append(item)
                else:
                    rest = {k: v for k, v in item.items() if k not in _AUDIO_SOURCE_KEYS}
                    items.append({**rest, "type": "audio", "audio_url": _resolve(item[key], folder)})
            message = {**message, "content": items}
        resolved.append(message)
    return resolved


def parse_line(text: str, folder: Path, line: int) -> Record:
    """One JSONL line -> a Record without its sizes; raises InputError or AudioError with the problem."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if isinstance(row, dict) and "messages" in row:
        row = row["messages"]
    if isinstance(row, list):
        return Record(line, _conversation(row, folder), "", "", (), 0, 0)
    if not isinstance(row, dict) or "answer" not in row or "prompt" not in row:
        raise InputError('expected a conversation (a list of messages, or {"messages": [...]}) or a base-model '
                         'example {"audio": PATH, "prompt": TEXT, "answer": TEXT}')
    prompt, answer, audio = row["prompt"], row["answer"], row.get("audio", [])
    audio = [audio] if isinstance(audio, str) else audio
    if not isinstance(prompt, str) or not isinstance(answer, str) or not isinstance(audio, list):
        raise InputError('"prompt" and "answer" must be strings, "audio" a path or a list of paths')
    if not answer.strip():
        raise InputError("the answer is empty, so nothing would be learned from this line")
    if audio and AUDIO not in prompt:
        prompt = AUDIO_PLACEHOLDER * len(audio) + prompt
    return Record(line, None, prompt, answer, tuple(_resolve(a, folder) for a in audio), 0, 0)


def _clip(path: str, max_seconds: float) -> Tensor:
    samples = load_audio(path)
    if len(samples) > max_seconds * SAMPLE_RATE:
        raise AudioError(f"audio file {path} is {len(samples) / SAMPLE_RATE:.1f} s long, over --max-audio-seconds "
                         f"{max_seconds:g}: cut it into pieces of at most {max_seconds:g} s")
    return torch.from_numpy(samples)


def build_example(record: Record, tokenizer: Tokenizer, max_audio_seconds: float) -> dict[str, Tensor]:
    """The record's input_ids and labels (T,), and input_features / feature_attention_mask when it has audio; the
    audio files are decoded here (again at each use: nothing is kept between steps)."""
    if record.conversation is not None:
        clips = [_clip(item["audio_url"], max_audio_seconds) for message in record.conversation
                 if isinstance(message.get("content"), list) for item in message["content"]
                 if isinstance(item, dict) and "audio_url" in item]
        return conversation_example(tokenizer, record.conversation, audio=clips)
    clips = [_clip(path, max_audio_seconds) for path in record.audio]
    return base_example(tokenizer, record.prompt, record.answer, audio=clips)


def check_line(text: str, folder: Path, line: int, tokenizer: Tokenizer, context: int,
               max_audio_seconds: float) -> Record:
    """A Record with its sizes, after building its example once: every check a training step would meet."""
    record = parse_line(text, folder, line)
    example = build_example(record, tokenizer, max_audio_seconds)
    n_tokens = len(example["input_ids"])
    if n_tokens > context:
        raise InputError(f"the example is {n_tokens} tokens long, over the model's context of {context} "
                         "(max_position_embeddings): shorten it or split it")
    n_counted = int(counted_targets(example["labels"][None]).sum())
    if n_counted == 0:
        raise InputError("no answer token counts in the loss: give the assistant a non-empty reply")
    return Record(line, record.conversation, record.prompt, record.answer, record.audio, n_tokens, n_counted)


@dataclass(frozen=True)
class BadLine:
    file: str
    line: int
    problem: str
    kind: str  # "audio" or "input": which of our exceptions

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.problem}"


def check_lines(path: Path, lines: list[tuple[int, str]], tokenizer: Tokenizer, context: int,
                max_audio_seconds: float) -> tuple[list[Record], list[BadLine]]:
    """Check (line number, text) pairs: the good Records and the bad lines, in order."""
    good, bad = [], []
    for number, text in lines:
        try:
            good.append(check_line(text, path.parent, number, tokenizer, context, max_audio_seconds))
        except (Qwen2AudioError, OSError) as e:
            kind = "audio" if isinstance(e, (AudioError, OSError)) else "input"
            bad.append(BadLine(str(path), number, str(e), kind))
    return good, bad


def read_lines(path: str | Path) -> list[tuple[int, str]]:
    """The non-blank lines of a JSONL file with their 1-based numbers."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read the data file {path}: {e}") from None
    lines = [(n, t) for n, t in enumerate(text.splitlines(), start=1) if t.strip()]
    if not lines:
        raise InputError(f"the data file {path} holds no examples (one JSON example per line)")
    return lines


def judge(path: Path, good: list[Record], bad: list[BadLine], skip_bad: bool) -> str | None:
    """Raise for bad lines (the first few quoted), unless skip_bad: then the notice to print (None if none)."""
    if not bad:
        return None
    shown = "; ".join(str(b) for b in bad[:SHOWN_REASONS]) + ("; ..." if len(bad) > SHOWN_REASONS else "")
    if skip_bad:
        if not good:
            raise InputError(f"every line of {path} is bad ({shown})")
        return f"skipped {len(bad)} bad line(s) of {path}: {shown}"
    more = f" ({len(bad)} bad lines in all: {shown})" if len(bad) > 1 else ""
    error = AudioError if bad[0].kind == "audio" else InputError
    raise error(f"{bad[0]}{more}. Fix the line(s), or pass --skip-bad to leave them out")
