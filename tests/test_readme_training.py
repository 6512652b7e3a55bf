"""The "Modifying and training the model" code of docs/training.md runs as written, on a random tiny checkpoint."""

import re
import shutil
from pathlib import Path

import pytest
from helpers import load_hf, test_signal, write_wav
from tokenizer_fixture import shared_tokenizer_folder

TRAINING = Path(__file__).resolve().parent.parent / "docs" / "training.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def section_code() -> list[str]:
    text = TRAINING.read_text(encoding="utf-8")
    section = re.search(r"^## Modifying and training the model\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, "docs/training.md has no '## Modifying and training the model' section"
    return re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.S | re.M)


def test_the_section_runs(tiny_checkpoint, tmp_path, monkeypatch):
    folder = tmp_path / "qwen2-audio"  # the tiny checkpoint + tokenizer files, under the section's folder name
    folder.mkdir()
    for source in [*tiny_checkpoint.iterdir(), *shared_tokenizer_folder().iterdir()]:
        shutil.copyfile(source, folder / source.name)
    write_wav(tmp_path / "glass.wav", test_signal(1.0))
    monkeypatch.chdir(tmp_path)
    blocks = section_code()
    assert len(blocks) == 3
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(TRAINING), "exec"), scope)
    assert scope["seen"].decoder_attentions[0].shape[:2] == (1, 4)  # the tiny model's 4 heads
    assert scope["model"].language_model.model.layers[0].self_attn.q_proj.__class__.__name__ == "Linear"
    assert len(scope["again"]) == 2 * 7  # q k v o gate up down in both layers
    load_hf(tmp_path / "qwen2-audio-tuned")  # the merged model opens in transformers
