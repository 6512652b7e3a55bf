"""`qwen2audio eval` end to end on synthetic speech (espeak-ng) and a random tiny checkpoint.

The tiny model's replies are garbage; what is checked is the harness: the official jsonl read, the prompts and
model inputs built as the official scripts build them (token ids against transformers' Qwen2AudioProcessor), the
replies equal to what the official recipe gives when run with transformers itself, the results file, the summary,
resume, bad items, the command line, and torchrun over two ranks against one process.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, load_hf
from tokenizer_fixture import hf_processor, write_tokenizer_files

import qwen2audio
from qwen2audio.cli import main
from qwen2audio.evaluation import EvalError, evaluate
from qwen2audio.evaluation.data import decode_audio, ffmpeg_decode, read_items
from qwen2audio.evaluation.metrics import asr_score, corpus_wer
from qwen2audio.evaluation.tasks import TASKS

NEW_TOKENS = 6  # enough to see the decoding; the default (256) only makes the garbage longer
ASR_PROMPT = "Detect the language and recognize the speech: <|en|>"
SENTENCES = ["the cat sat on the mat", "one two three four", "good morning to you", "it is raining today",
             "please call me later"]
# Like the Hub models' generation_config.json: sampling defaults (which do_sample=False overrides) and a repetition
# penalty, which transformers' generate() applies to greedy decoding too. 2.0 rather than the Hub's 1.1, so that
# its effect shows on the echo model below.
GENERATION_CONFIG = {"bos_token_id": 151643, "eos_token_id": [151643, 151645], "pad_token_id": 151643,
                     "do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.5, "repetition_penalty": 2.0}


def espeak(text: str, path: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.fail("these tests need the espeak-ng program: apt-get install espeak-ng (.ci/run installs it)")
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    """The session's tiny checkpoint, with tokenizer files and a Hub-like generation_config.json beside it."""
    folder = tmp_path_factory.mktemp("eval_model")
    for f in tiny_checkpoint.iterdir():
        os.symlink(f, folder / f.name)
    (folder / "generation_config.json").unlink()
    (folder / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG))
    return write_tokenizer_files(folder)


@pytest.fixture(scope="module")
def pipe(model_dir):
    return qwen2audio.load(model_dir, dtype=torch.float32, quiet=True)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    """A folder of espeak-ng recordings (22.05 kHz WAV) of SENTENCES, named 0.wav, 1.wav, ..."""
    folder = tmp_path_factory.mktemp("speech")
    (folder / "wav").mkdir()
    for i, text in enumerate(SENTENCES):
        espeak(text, folder / "wav" / f"{i}.wav")
    (folder / "wav" / "broken.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    return folder


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines))
    return path


def asr_lines(n: int = len(SENTENCES)) -> list[dict]:
    return [{"audio": f"wav/{i}.wav", "prompt": ASR_PROMPT, "gt": SENTENCES[i].capitalize() + ".",
             "source": "synthetic_a" if i < 3 else "synthetic_b"} for i in range(n)]


@pytest.fixture(scope="module")
def asr_data(speech) -> Path:
    """Five good items and four bad lines (broken JSON, a missing key, a missing file, an undecodable file)."""
    lines = asr_lines()
    lines[2:2] = ['{"audio": "wav/0.wav", "prompt": ', {"audio": "wav/1.wav", "prompt": ASR_PROMPT}]
    lines += [{"audio": "wav/missing.wav", "prompt": ASR_PROMPT, "gt": "x", "source": "synthetic_b"},
              {"audio": "wav/broken.wav", "prompt": ASR_PROMPT, "gt": "x", "source": "synthetic_b"}]
    return write_jsonl(speech / "asr.jsonl", lines)


def official_recipe_replies(model_dir: Path, prompts: list[str], clips: list, batch_size: int, model=None,
                            **override) -> list[str]:
    """What the official eval scripts do, with transformers: left padding, processor(text, audio, padding=True),
    generate(max_new_tokens, min_new_tokens=1, do_sample=False), decode the new tokens without special tokens."""
    processor = hf_processor(model_dir)  # left padding, as the official scripts set it
    model = model if model is not None else load_hf(model_dir)
    replies = []
    for start in range(0, len(prompts), batch_size):
        inputs = processor(text=prompts[start:start + batch_size], audio=clips[start:start + batch_size],
                           sampling_rate=16000, return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=1, do_sample=False, **override)
        new = out[:, inputs["input_ids"].shape[1]:]
        replies += processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return replies


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ the data file
def test_reading_reports_bad_lines_with_file_and_line(asr_data):
    items, bad = read_items(asr_data, "asr")
    assert [i.line for i in items] == [1, 2, 5, 6, 7, 9] and [i.id for i in items] == [1, 2, 5, 6, 7, 9]
    assert [str(b).split(": ", 1)[0] for b in bad] == [f"{asr_data}:3", f"{asr_data}:4", f"{asr_data}:8"]
    assert "not valid JSON" in bad[0].problem and "missing key(s) gt" in bad[1].problem
    assert "wav/missing.wav not found" in bad[2].problem
    assert items[0].audio_path == str(asr_data.parent / "wav" / "0.wav")  # relative to the data file


def test_chat_items_keep_their_ids_which_must_be_unique(speech):
    query = "<|audio_bos|><|AUDIO|><|audio_eos|>What is it?"
    data = write_jsonl(speech / "ids.jsonl", [{"audio": "wav/0.wav", "id": "a", "query": query},
                                              {"audio": "wav/1.wav", "id": "a", "query": query},
                                              {"audio": "wav/1.wav", "id": 7, "query": query}])
    items, bad = read_items(data, "chat")
    assert [i.id for i in items] == ["a", 7]
    assert [str(b) for b in bad] == [f"{data}:2: id 'a' already used on line 1"]


# ------------------------------------------------------------------------------------------------ prompts
def test_prompts_and_inputs_as_the_official_scripts_build_them(pipe, model_dir, speech):
    data = write_jsonl(speech / "prompts.jsonl", asr_lines(2) + [
        {"audio": "wav/2.wav", "id": "chat-1", "query": "<|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said?"}])
    asr_items, _ = read_items(data, "asr", limit=2)
    chat_items, _ = read_items(data, "chat")
    hf = hf_processor(model_dir)
    prompts = [TASKS["asr"].prompt(i) for i in asr_items] + [TASKS["chat"].prompt(chat_items[-1])]
    assert prompts[0] == "<|audio_bos|><|AUDIO|><|audio_eos|>" + ASR_PROMPT
    conversation = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": chat_items[-1].prompt}]
    assert prompts[2] == hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    clips = [decode_audio(i.audio_path, "qwen2audio") for i in asr_items + chat_items[-1:]]
    ours = pipe.processor(text=prompts, audio=clips, padding=True)
    theirs = hf(text=prompts, audio=clips, sampling_rate=16000, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "input_features", "feature_attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key


def test_ffmpeg_decoding_is_transformers_ffmpeg_read(speech):
    from transformers.pipelines.audio_utils import ffmpeg_read

    if shutil.which("ffmpeg") is None:
        pytest.fail("this test needs the ffmpeg program: apt-get install ffmpeg (.ci/run installs it)")
    path = speech / "wav" / "1.wav"
    expected = ffmpeg_read(path.read_bytes(), sampling_rate=16000)  # what the official scripts decode with
    assert ffmpeg_decode(str(path)).tobytes() == expected.tobytes()
    with pytest.raises(EvalError, match="ffmpeg could not decode"):
        ffmpeg_decode(str(speech / "wav" / "broken.wav"))


# ------------------------------------------------------------------------------------------------ the run
def test_asr_run_matches_the_official_recipe(pipe, model_dir, asr_data, tmp_path, capsys):
    out = tmp_path / "asr.jsonl"
    summary = evaluate("asr", asr_data, pipe, out, batch_size=2, max_new_tokens=NEW_TOKENS,
                       audio_decoder="qwen2audio")
    rows = read_results(out)
    assert [r["line"] for r in rows] == [1, 2, 5, 6, 7]  # data-file order; bad lines 3, 4, 8 and 9 skipped
    prompts = ["<|audio_bos|><|AUDIO|><|audio_eos|>" + ASR_PROMPT] * 5
    assert [r["prompt"] for r in rows] == prompts
    clips = [qwen2audio.load_audio(asr_data.parent / "wav" / f"{i}.wav") for i in range(5)]
    # batches of 2 as the run made them: [1, 2], [5, 6], [7] (line 9's audio failed to decode in the last batch)
    assert [r["reply"] for r in rows] == official_recipe_replies(model_dir, prompts, clips, batch_size=2)
    for r, i in zip(rows, range(5)):
        assert r["reference"] == SENTENCES[i].capitalize() + "."
        assert r["score"] == asr_score(r["reply"], r["reference"], "en")
    by_source = {"synthetic_a": rows[:3], "synthetic_b": rows[3:]}
    assert summary == [{"source": s, "items": len(g), "metric": "WER", "value": corpus_wer([r["score"] for r in g])}
                       for s, g in by_source.items()]
    printed = capsys.readouterr()
    assert printed.out.splitlines()[0].split() == ["source", "items", "metric", "value"]
    assert "skipped 4 bad item(s)" in printed.out and f"{asr_data}:9: audio could not be decoded" in printed.err
    report = json.loads((tmp_path / "asr.summary.json").read_text())
    assert report["language"] == "en" and report["max_new_tokens"] == NEW_TOKENS and len(report["bad_items"]) == 4


def make_echo(model: torch.nn.Module) -> None:
    """Decoder layers that add nothing and lm_head = the embedding: each step's likeliest token is its input token,
    so greedy decoding repeats itself unless a repetition penalty steps in. Works on ours and on transformers'."""
    params = dict(model.named_parameters())
    embedding = next(p for name, p in params.items() if name.endswith("embed_tokens.weight"))
    with torch.no_grad():
        for name, p in params.items():
            if "audio_tower" not in name and name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                p.zero_()
            elif name.endswith("lm_head.weight"):
                p.copy_(embedding)


def test_decoding_settings_not_given_come_from_generation_config(model_dir, speech, tmp_path):
    """The official scripts pass max_new_tokens, min_new_tokens and do_sample to generate() and leave the rest (the
    repetition penalty, the stop tokens) to the checkpoint's generation_config.json; the harness passes the same
    three to pipe.generate, which reads the rest from the same file. The echo model shows the penalty at work."""
    pipe, hf = qwen2audio.load(model_dir, dtype=torch.float32, quiet=True), load_hf(model_dir)
    make_echo(pipe.model)
    make_echo(hf)
    data = write_jsonl(speech / "echo.jsonl", asr_lines(2))
    evaluate("asr", data, pipe, tmp_path / "echo.jsonl", max_new_tokens=NEW_TOKENS, audio_decoder="qwen2audio",
             quiet=True)
    replies = [r["reply"] for r in read_results(tmp_path / "echo.jsonl")]
    prompts = ["<|audio_bos|><|AUDIO|><|audio_eos|>" + ASR_PROMPT] * 2
    clips = [qwen2audio.load_audio(speech / "wav" / f"{i}.wav") for i in range(2)]
    assert replies == official_recipe_replies(model_dir, prompts, clips, 20, model=hf)
    assert replies != official_recipe_replies(model_dir, prompts, clips, 20, model=hf, repetition_penalty=1.0)


def test_resume_runs_only_what_is_missing(pipe, asr_data, tmp_path, monkeypatch):
    out = tmp_path / "asr.jsonl"
    options = dict(batch_size=2, max_new_tokens=NEW_TOKENS, audio_decoder="qwen2audio", quiet=True)
    evaluate("asr", asr_data, pipe, out, limit=3, **options)
    first = read_results(out)
    with pytest.raises(EvalError, match="already holds results: pass --resume"):
        evaluate("asr", asr_data, pipe, out, **options)
    with open(out, "a") as f:
        f.write('{"id": 6, "reply": "half a li')  # a run killed while writing: that item is done again
    generated = []
    real_generate = pipe.generate
    monkeypatch.setattr(pipe, "generate", lambda **kw: generated.append(len(kw["input_ids"])) or real_generate(**kw))
    summary = evaluate("asr", asr_data, pipe, out, resume=True, **options)
    assert sum(generated) == 2  # items on lines 6 and 7 (line 9's audio is broken)
    rows = read_results(out)
    assert rows[:3] == first and [r["line"] for r in rows] == [1, 2, 5, 6, 7]
    assert [s["items"] for s in summary] == [3, 2]


def test_other_tasks(pipe, speech, tmp_path):
    lines = [{"audio": f"wav/{i}.wav", "prompt": "Recognize the emotion with keywords in English:", "gt": g,
              "source": "meld"} for i, g in enumerate(["neutral", "joy", "anger"])]
    data = write_jsonl(speech / "ser.jsonl", lines)
    options = dict(max_new_tokens=NEW_TOKENS, audio_decoder="qwen2audio", quiet=True)
    (summary,) = evaluate("ser", data, pipe, tmp_path / "new" / "ser.jsonl", **dict(options, audio_decoder="ffmpeg"))
    rows = read_results(tmp_path / "new" / "ser.jsonl")
    assert [r["score"] for r in rows] == [{"correct": r["reply"].lstrip() == r["reference"]} for r in rows]
    assert summary == {"source": "meld", "items": 3, "metric": "ACC",
                       "value": sum(r["score"]["correct"] for r in rows) / 3}

    for line in lines:
        line["source"] = "covost2_en_zh_test"
    (summary,) = evaluate("s2tt", write_jsonl(speech / "st.jsonl", lines), pipe, tmp_path / "st.jsonl", **options)
    rows = read_results(tmp_path / "st.jsonl")
    import sacrebleu

    bleu = sacrebleu.corpus_bleu([r["reply"] for r in rows], [[r["reference"] for r in rows]], tokenize="zh")
    assert summary == {"source": "covost2_en_zh_test", "items": 3, "metric": "BLEU (tokenize=zh)",
                       "value": bleu.score}

    chat = [{"audio": "wav/0.wav", "id": "q1", "query": "<|audio_bos|><|AUDIO|><|audio_eos|>\nWhat is said?"},
            {"audio": "wav/1.wav", "id": "q2", "query": "No audio tags here"}]
    (summary,) = evaluate("chat", write_jsonl(speech / "chat.jsonl", chat), pipe, tmp_path / "chat.jsonl", **options)
    (row,) = read_results(tmp_path / "chat.jsonl")  # q2 is a bad item: its query has no <|AUDIO|>
    assert row["id"] == "q1" and row["score"] is None and row["prompt"].startswith("<|im_start|>system\n")
    assert summary["items"] == 1 and summary["metric"] == "responses for an external judge"


# ------------------------------------------------------------------------------------------------ command line
def test_cli(model_dir, asr_data, tmp_path, capsys):
    out = tmp_path / "cli.jsonl"
    args = ["eval", "--task", "asr", "--data", str(asr_data), "--model", str(model_dir), "--dtype", "float32",
            "--device", "cpu", "--out", str(out), "--limit", "2", "--max-new-tokens", "3",
            "--audio-decoder", "qwen2audio", "--quiet"]
    assert main(args) == 0
    assert len(read_results(out)) == 2 and "synthetic_a  2" in capsys.readouterr().out
    assert main(args + ["--temperature", "0.5"]) == 1
    assert "--temperature cannot apply" in capsys.readouterr().err
    assert main(args[:4] + [str(tmp_path / "none.jsonl")] + args[5:]) == 1
    assert "cannot read the data file" in capsys.readouterr().err


def test_torchrun_two_ranks_give_the_results_of_one_process(pipe, model_dir, speech, tmp_path, capsys):
    data = write_jsonl(speech / "four.jsonl", asr_lines(4))
    # one process: the same run in this process (the same batches of 2 as the two ranks make: [0, 1] and [2, 3])
    evaluate("asr", data, pipe, tmp_path / "one.jsonl", batch_size=2, max_new_tokens=4, audio_decoder="qwen2audio",
             quiet=True)
    table = capsys.readouterr().out
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "qwen2audio", "eval", "--task", "asr", "--data", str(data),
               "--model", str(model_dir), "--dtype", "float32", "--device", "cpu", "--batch-size", "2",
               "--max-new-tokens", "4", "--audio-decoder", "qwen2audio", "--quiet",
               "--out", str(tmp_path / "two.jsonl")]
    two = subprocess.run(command, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    assert read_results(tmp_path / "two.jsonl") == read_results(tmp_path / "one.jsonl")
    assert two.stdout == table  # the summary table, printed once (by rank 0)
    summaries = [json.loads((tmp_path / f"{n}.summary.json").read_text()) for n in ("one", "two")]
    assert summaries[0]["summary"] == summaries[1]["summary"] and summaries[1]["ranks"] == 2
    assert not list(tmp_path.glob("two.jsonl.rank*"))  # part files merged and removed
