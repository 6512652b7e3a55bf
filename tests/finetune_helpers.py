"""Model folders and JSONL data for the fine-tuning tests: the tiny checkpoint with the real tokenizer files, and
small data sets of test-signal clips (helpers.write_wav) with short answers."""

import json
import shutil
from pathlib import Path

from helpers import test_signal, write_wav
from tokenizer_fixture import shared_tokenizer_folder

ANSWERS = ["Glass breaking.", "A dog barks twice.", "Rain on a roof.", "A bell rings.", "Someone whistles.",
           "A car passes by.", "Water drips slowly.", "Birds sing at dawn."]


def model_folder(checkpoint: Path, folder: Path) -> Path:
    """The checkpoint's files and the tokenizer's, in one folder (what finetune and chat load); vocab.json +
    merges.txt without tokenizer.json, which take half the time to read."""
    folder.mkdir(parents=True, exist_ok=True)
    for source in [*checkpoint.iterdir(), *shared_tokenizer_folder(fast=False).iterdir()]:
        shutil.copy(source, folder / source.name)
    return folder


def write_data(folder: Path, n: int = 8, name: str = "train.jsonl", seconds: float = 0.5) -> Path:
    """n lines: conversations about a clip (even lines) and base-model examples (odd lines), clips in clips/."""
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        clip = f"clips/{name}-{i}.wav"
        write_wav(folder / clip, test_signal(seconds + 0.1 * (i % 3), seed=i))
        answer = ANSWERS[i % len(ANSWERS)]
        if i % 2 == 0:
            lines.append({"messages": [
                {"role": "user", "content": [{"type": "audio", "audio_url": clip},
                                             {"type": "text", "text": "What's that sound?"}]},
                {"role": "assistant", "content": answer}]})
        else:
            lines.append({"audio": clip, "prompt": "Generate the caption in English:", "answer": answer})
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
