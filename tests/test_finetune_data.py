"""Bad training data is named, file and line, before the first step (before the model is even loaded); with
skip_bad the bad lines are counted and left out."""

import json
import re

import pytest
from finetune_helpers import write_data
from helpers import test_signal, write_wav

from qwen2audio.errors import AudioError, InputError
from qwen2audio.finetune import finetune
from qwen2audio.finetune import run as finetune_run
from qwen2audio.finetune.data import check_lines, read_lines
from qwen2audio.finetune.run import tokenizer_of

pytestmark = pytest.mark.usefixtures("one_thread")

AUDIO_USER = {"role": "user", "content": [{"type": "audio", "audio_url": "clips/ok.wav"},
                                          {"type": "text", "text": "What's that sound?"}]}
BAD_LINES = {  # line -> (the line, the exception, what its message says)
    2: ('{"messages": [', InputError, "not valid JSON"),
    3: ([{"role": "user", "content": [{"type": "audio", "audio_url": "clips/gone.wav"}]},
         {"role": "assistant", "content": "x"}], AudioError, "audio file clips/gone.wav not found"),
    4: ({"audio": "clips/noise.wav", "prompt": "Say:", "answer": "x"}, AudioError, "noise.wav"),
    5: ([AUDIO_USER], InputError, "no assistant message"),
    6: ({"prompt": "Say:", "answer": " word" * 2100}, InputError, "over the model's context of 2048"),
    7: ({"audio": "clips/long.wav", "prompt": "Say:", "answer": "x"}, AudioError, "over --max-audio-seconds 2"),
    8: ({"text": "hello"}, InputError, "expected a conversation"),
}


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_data")
    (folder / "clips").mkdir()
    write_wav(folder / "clips" / "ok.wav", test_signal(0.5))
    write_wav(folder / "clips" / "long.wav", test_signal(2.5))
    (folder / "clips" / "noise.wav").write_bytes(b"RIFF....WAVEfmt not really a wav file")
    lines = [[AUDIO_USER, {"role": "assistant", "content": "Glass breaking."}]]
    lines += [text if isinstance(text, str) else json.dumps(text) for text, _, _ in BAD_LINES.values()]
    lines = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n\n" + lines[0] + "\n")  # a blank line, then a second good one
    return path


def test_each_bad_line_is_named(finetune_model, bad_data):
    good, bad = check_lines(bad_data, read_lines(bad_data), tokenizer_of(finetune_model), 2048, 2.0)
    assert [r.line for r in good] == [1, 10]
    assert [b.line for b in bad] == list(BAD_LINES)
    for b in bad:
        _, error, words = BAD_LINES[b.line]
        assert b.file == str(bad_data) and words in b.problem, b
        assert b.kind == ("audio" if error is AudioError else "input")


def test_bad_data_stops_the_run_before_the_model_loads(finetune_model, bad_data, tmp_path, monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(finetune_run, "prepare_model", no_model)
    options = dict(model=str(finetune_model), data=str(bad_data), out=str(tmp_path / "out"), max_audio_seconds=2.0)
    with pytest.raises(InputError, match=re.escape(f"{bad_data}:2: not valid JSON") + ".*7 bad lines in all.*"
                       + re.escape(f"{bad_data}:3: audio file clips/gone.wav")):
        finetune(**options)
    monkeypatch.undo()
    summary = finetune(**options, skip_bad=True, max_steps=1, batch_size=2, grad_accum=1)
    assert summary["steps"] == 1
    assert f"skipped 7 bad line(s) of {bad_data}: {bad_data}:2: not valid JSON" in capsys.readouterr().err


def test_a_bad_audio_line_first_is_an_audio_error(finetune_model, tmp_path):
    data = write_data(tmp_path, 2)
    lines = data.read_text().splitlines()
    data.write_text(lines[0].replace("clips/", "missing/") + "\n" + lines[1] + "\n")
    with pytest.raises(AudioError, match=re.escape(f"{data}:1: audio file missing/")):
        finetune(model=str(finetune_model), data=str(data), out=str(tmp_path / "out"))


def test_too_little_data_and_bad_options(finetune_model, finetune_data, tmp_path):
    with pytest.raises(InputError, match=r"8 good example\(s\), fewer than one step takes .* = 16"):
        finetune(model=str(finetune_model), data=str(finetune_data), out=str(tmp_path), batch_size=2)
    with pytest.raises(InputError, match="--merge folds a LoRA adapter"):
        finetune(model=str(finetune_model), data=str(finetune_data), out=str(tmp_path), full=True, merge=True)
    with pytest.raises(InputError, match="trains nothing"):
        finetune(model=str(finetune_model), data=str(finetune_data), out=str(tmp_path), freeze=("decoder",))
    with pytest.raises(InputError, match="--max-audio-seconds must be in"):
        finetune(model=str(finetune_model), data=str(finetune_data), out=str(tmp_path), max_audio_seconds=40)
