"""The `qwen2audio` command as a user meets it: replies equal to the Python API's, the interactive session, and
one-line errors without a traceback.

Most cases call `main([...])` in this process with `qwen2audio.load` replaced by a recorder that returns one loaded
pipeline (the CLI's own logic is what is tested); a few run the installed console script for real.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from helpers import test_signal, write_wav
from tokenizer_fixture import model_folder

import qwen2audio
from qwen2audio import cli
from qwen2audio.errors import WeightsError

GREEDY = ["--greedy", "--max-new-tokens", "8"]  # the tiny model's generation_config does not sample anyway
API_GREEDY = dict(do_sample=False, max_new_tokens=8)




pytestmark = pytest.mark.usefixtures("module_on_one_thread")


@pytest.fixture(scope="module")
def work(tiny_checkpoint, tmp_path_factory) -> Path:
    """A folder holding `model/`, `a.wav` (1.5 s) and `b.wav` (0.7 s); the subprocesses run in it."""
    root = tmp_path_factory.mktemp("cli")
    model_folder(tiny_checkpoint, root / "model")
    write_wav(root / "a.wav", test_signal(1.5))
    write_wav(root / "b.wav", test_signal(0.7, seed=1))
    return root


@pytest.fixture(scope="module")
def pipe(work):
    return qwen2audio.load(work / "model")


@pytest.fixture
def loads(pipe, monkeypatch):
    """Replace qwen2audio.load by a recorder that hands back the loaded pipeline; yields the recorded calls."""
    calls = []

    def fake_load(path, **kwargs):
        calls.append((path, kwargs))
        return pipe

    monkeypatch.setattr(qwen2audio, "load", fake_load)
    return calls


def user(text: str | None = None, *paths: Path) -> dict:
    content = [{"type": "audio", "audio_url": str(p)} for p in paths]
    return {"role": "user", "content": content + ([{"type": "text", "text": text}] if text else [])}


def console_script() -> str:
    """The installed `qwen2audio` entry point of this interpreter's environment."""
    script = Path(sysconfig.get_path("scripts")) / "qwen2audio"
    return str(script) if script.exists() else shutil.which("qwen2audio")


def run_command(args: list[str], cwd: Path, stdin: str = "", env: dict | None = None) -> tuple[int, str, str]:
    """Run a real process; stdout/stderr decoded as UTF-8 without newline translation (replies may hold \\r)."""
    result = subprocess.run(args, cwd=cwd, input=stdin.encode(), capture_output=True, timeout=180,
                            env={**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", **(env or {})})
    return result.returncode, result.stdout.decode("utf-8"), result.stderr.decode("utf-8")


def assert_one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr


# ------------------------------------------------------------------------------------ the console script, for real
def test_console_script_one_reply_equals_the_api(work, pipe):
    code, out, err = run_command([console_script(), "chat", "--model", "model", "--audio", "a.wav",
                                  "--prompt", "What is it?", *GREEDY], cwd=work)
    assert code == 0, err
    expected = pipe.chat([user("What is it?", work / "a.wav")], **API_GREEDY)
    assert expected and out == expected + "\n"
    # stderr is a pipe here, not a terminal: no progress bar, and nothing else either.
    assert "Traceback" not in err and "Loading" not in err, err


def test_console_script_interactive_session_keeps_history(work, pipe):
    script = "/audio a.wav\nWhat is it?\nAnd again?\n/reset\nhello\n/exit\nnever read\n"
    code, out, err = run_command([console_script(), "chat", "--model", "model", *GREEDY], cwd=work, stdin=script)
    assert code == 0, err
    assert err == ""  # stdin is not a terminal: no "> " prompt, no help line, no notices
    first_turn = [user("What is it?", work / "a.wav")]
    first = pipe.chat(first_turn, **API_GREEDY)
    history = first_turn + [{"role": "assistant", "content": first}, user("And again?")]
    second = pipe.chat(history, **API_GREEDY)
    assert second != pipe.chat([user("And again?")], **API_GREEDY)  # the history changes the reply
    after_reset = pipe.chat([user("hello")], **API_GREEDY)
    assert out == f"{first}\n{second}\n{after_reset}\n"


def test_caption_with_json_as_a_subprocess(work, pipe):
    code, out, err = run_command([console_script(), "caption", "--model", "model", "--audio", "a.wav",
                                  "--audio", "b.wav", "--json", *GREEDY], cwd=work)
    assert code == 0, err
    result = json.loads(out)  # exactly one JSON object on stdout
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>" * 2 + "Generate the caption in English:"
    assert result["reply"] == pipe.complete(prompt, audio=[str(work / "a.wav"), str(work / "b.wav")], **API_GREEDY)
    timings = result["timings"]
    assert timings["new_tokens"] == 8 and timings["load_s"] > 0 and timings["time_to_first_token_s"] > 0


def test_python_m_with_an_unreachable_hub_repo_says_how_to_use_a_local_copy(work, tmp_path):
    code, out, err = run_command([sys.executable, "-m", "qwen2audio", "chat", "--model", "nobody/nothing",
                                  "--prompt", "hi"], cwd=work,
                                 env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert code == 1 and out == ""
    assert_one_error_line(err)
    assert "nobody/nothing" in err and "local folder" in err


# ------------------------------------------------------------------------------------------------ main(), in process
def test_voice_chat_without_prompt(work, pipe, loads, capsys):
    assert cli.main(["chat", "--model", str(work / "model"), "--audio", str(work / "b.wav"), *GREEDY]) == 0
    out = capsys.readouterr().out
    assert out == pipe.chat([user(None, work / "b.wav")], **API_GREEDY) + "\n"


def test_two_audios_system_prompt_json_and_load_options(work, pipe, loads, capsys):
    argv = ["chat", "--model", "M", "--audio", str(work / "a.wav"), "--audio", str(work / "b.wav"),
            "--prompt", "Same sound?", "--system", "Be brief.", "--json", "--quiet", "--dtype", "float32",
            "--device", "cpu", "--quantize", "int8", "--compile", "--mmap", "--kernels", "native", *GREEDY]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    conversation = [{"role": "system", "content": "Be brief."}, user("Same sound?", work / "a.wav", work / "b.wav")]
    assert result["reply"] == pipe.chat(conversation, **API_GREEDY)
    assert loads == [("M", dict(dtype="float32", device="cpu", quantize="int8", compile=True, kernels="native",
                                mmap=True, quiet=True))]
    assert captured.err == ""


def test_defaults_pass_quiet_false_and_the_checkpoint_dtype(work, loads, capsys):
    assert cli.main(["chat", "--model", "M", "--prompt", "hi", "--device", "cpu", "--max-new-tokens", "2"]) == 0
    assert loads == [("M", dict(dtype=None, device="cpu", quantize=None, compile=False, kernels="auto", mmap=None,
                                quiet=False))]
    assert loads[0][1]["quiet"] is False  # the loader shows its bar only when stderr is a terminal


def test_sampling_options_reach_generation_and_turn_sampling_on(work, pipe, loads, capsys):
    argv = ["chat", "--model", "M", "--audio", str(work / "a.wav"), "--temperature", "0.8", "--top-k", "40",
            "--top-p", "0.9", "--repetition-penalty", "1.1", "--seed", "3", "--max-new-tokens", "6"]
    assert cli.main(argv) == 0
    expected = pipe.chat([user(None, work / "a.wav")], do_sample=True, temperature=0.8, top_k=40, top_p=0.9,
                         repetition_penalty=1.1, seed=3, max_new_tokens=6)
    assert capsys.readouterr().out == expected + "\n"
    assert expected != pipe.chat([user(None, work / "a.wav")], do_sample=False, repetition_penalty=1.1,
                                 max_new_tokens=6)  # sampling really happened


def test_interactive_errors_keep_the_session_going(work, pipe, loads, capsys, monkeypatch):
    import io

    script = "/audio missing.wav\n/audio\n/bogus\n/audio 'b.wav'\n\n/exit\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    monkeypatch.chdir(work)
    assert cli.main(["chat", "--model", "M", "--json", *GREEDY]) == 1  # a turn failed: non-zero at the end
    captured = capsys.readouterr()
    errors = captured.err.splitlines()
    assert len(errors) == 3 and all(e.startswith("error: ") for e in errors), captured.err
    assert "missing.wav" in errors[0] and "/audio PATH" in errors[1] and "/bogus" in errors[2]
    # The quoted path worked and the empty line sent the audio alone (voice chat).
    assert json.loads(captured.out)["reply"] == pipe.chat([user(None, work / "b.wav")], **API_GREEDY)


def test_on_a_terminal_the_session_prompts_and_explains(work, loads, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "stdin", Terminal("/audio a.wav\n/reset\n"))  # then the end of input (Ctrl-D)
    assert cli.main(["chat", "--model", "M"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "> > > \n"  # input()'s prompt goes to stdout; a newline after Ctrl-D
    assert "/audio PATH" in captured.err and "attached a.wav, 1.5 s" in captured.err
    assert "new conversation" in captured.err
    monkeypatch.setattr(sys, "stdin", Terminal("/audio a.wav\n/exit\n"))
    assert cli.main(["chat", "--model", "M", "--quiet"]) == 0
    assert capsys.readouterr() == ("> > ", "")


# ----------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("argv", [
    ["--dtype", "float8"],
    ["--device", "tpu"],
    ["--max-new-tokens", "0"],
    ["--max-new-tokens", "many"],
    ["--top-p", "1.5"],
    ["--greedy", "--temperature", "0.5"],
], ids=lambda a: " ".join(a))
def test_bad_option_values(argv, loads, capsys):
    assert cli.main(["chat", "--model", "M", "--prompt", "hi", *argv]) == 2
    captured = capsys.readouterr()
    assert_one_error_line(captured.err)
    assert argv[0] in captured.err and captured.out == "" and loads == []


@pytest.mark.parametrize("content, problem", [(None, "no such file"), (b"not audio at all", "not a WAV"),
                                              (b"RIFF\x10\x00\x00\x00WAVEfmt ", "")], ids=["missing", "garbage", "cut"])
def test_bad_audio_is_reported_before_the_model_loads(content, problem, work, tmp_path, loads, capsys):
    path = tmp_path / "clip.wav"
    if content is not None:
        path.write_bytes(content)
    assert cli.main(["chat", "--model", "M", "--audio", str(work / "a.wav"), "--audio", str(path)]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "clip.wav" in err and problem in err
    assert loads == []  # nothing loaded


def test_model_folders_missing_files(work, tmp_path, capsys):
    no_config = tmp_path / "empty"
    no_config.mkdir()
    assert cli.main(["chat", "--model", str(no_config), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "config.json" in err

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copyfile(work / "model" / "config.json", no_weights / "config.json")
    assert cli.main(["chat", "--model", str(no_weights), "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "safetensors" in err


def test_unavailable_device(monkeypatch, loads, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["chat", "--model", "M", "--prompt", "hi", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "--device cpu" in err and loads == []


def test_multi_line_and_internal_errors_print_one_line(monkeypatch, capsys):
    messages = iter([WeightsError("the first line\n  and the second\n"), RuntimeError("boom\nmore detail"),
                     MemoryError("cannot allocate\n16 GB")])

    def failing_load(path, **kwargs):
        raise next(messages)

    monkeypatch.setattr(qwen2audio, "load", failing_load)
    assert cli.main(["chat", "--model", "M", "--prompt", "hi"]) == 1
    assert capsys.readouterr().err == "error: the first line and the second\n"
    assert cli.main(["chat", "--model", "M", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "RuntimeError: boom more detail" in err and "--debug" in err
    assert cli.main(["chat", "--model", "M", "--prompt", "hi"]) == 1
    err = capsys.readouterr().err
    assert_one_error_line(err)
    assert "out of memory (cannot allocate 16 GB)" in err and "--quantize int8" in err


def test_long_audio_warning_is_one_line_in_the_cli_spelling(work, tmp_path, loads, capsys):
    long_clip = write_wav(tmp_path / "long.wav", test_signal(31.0))
    assert cli.main(["chat", "--model", "M", "--audio", str(long_clip), "--quiet", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: ") and "first 30 s" in err, err
    assert "--long-audio chunk" in err


def test_debug_shows_the_traceback(tmp_path, loads, capsys):
    assert cli.main(["chat", "--model", "M", "--audio", str(tmp_path / "nope.wav"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "AudioError" in err and "nope.wav" in err


# ----------------------------------------------------------------------------------- transcribe, and shell habits
ASR = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech:"


def test_transcribe_text_json_and_output_dir(work, pipe, loads, capsys, tmp_path):
    a, b = str(work / "a.wav"), str(work / "b.wav")
    expected = [pipe.complete(ASR + " <|en|>", audio=[p], **API_GREEDY) for p in (a, b)]
    assert cli.main(["transcribe", a, b, "--language", "en", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "".join(t + "\n" for t in expected)
    assert loads[-1][0] == "Qwen/Qwen2-Audio-7B"  # the base model's prompt format, so the base model by default

    assert cli.main(["transcribe", a, "--json", "--model", "M", "--max-new-tokens", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["file"] == a and result["text"] == pipe.complete(ASR, audio=[a], **API_GREEDY)

    out_dir = tmp_path / "texts"
    assert cli.main(["transcribe", a, b, "-o", str(out_dir), "--language", "en", "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and "wrote" in captured.err
    assert [(out_dir / n).read_text() for n in ("a.txt", "b.txt")] == [t + "\n" for t in expected]
    assert cli.main(["transcribe", a, "-o", str(out_dir), "--quiet", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr() == ("", "")  # --quiet: no notices
    assert cli.main(["transcribe", a, "--language", "en; rm -rf"]) == 1
    assert "language code" in capsys.readouterr().err


def test_caption_defaults_to_the_base_model_and_audio_from_stdin(work, pipe, loads, capsys, monkeypatch):
    import io

    data = (work / "a.wav").read_bytes()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert cli.main(["caption", "--audio", "-", *GREEDY]) == 0
    prompt = "<|audio_bos|><|AUDIO|><|audio_eos|>Generate the caption in English:"
    assert capsys.readouterr().out == pipe.complete(prompt, audio=[str(work / "a.wav")], **API_GREEDY) + "\n"
    assert loads[-1][0] == "Qwen/Qwen2-Audio-7B"
    assert cli.main(["chat", "--audio", "-", "--audio", "-", "--prompt", "hi"]) == 1
    assert "once" in capsys.readouterr().err


def test_version_and_threads(work, loads, capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"qwen2audio {cli.package_version()}" != "qwen2audio unknown"
    before = torch.get_num_threads()
    try:
        assert cli.main(["chat", "--model", "M", "--prompt", "hi", "--threads", "2", "--max-new-tokens", "1"]) == 0
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert cli.main(["chat", "--model", "M", "--prompt", "hi", "--threads", "0"]) == 2


def test_long_audio_warning_names_the_file(work, tmp_path, loads, capsys):
    long_clip = write_wav(tmp_path / "interview.wav", test_signal(31.0))
    assert cli.main(["transcribe", str(long_clip), "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "interview.wav is 31.0 s long" in err and "audio 0" not in err


def test_interactive_set_and_messages_of_several_lines(work, pipe, loads, capsys, monkeypatch):
    import io

    script = ('/set temperature 0.5\n/set top_k 7\n/set seed 11\n/set max-new-tokens 6\n/set temperature hot\n'
              '/set colour blue\n/set\n"""\nFirst line\nsecond line\n"""\n/set greedy on\nAgain?\n')
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    assert cli.main(["chat", "--model", "M", "--max-new-tokens", "8"]) == 1  # two /set lines failed
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "temperature must be a number" in errors[0] and "/set takes" in errors[1]
    assert "temperature 0.5" in captured.err and "top_k 7" in captured.err and "do_sample True" in captured.err
    sampled = dict(do_sample=True, temperature=0.5, top_k=7, seed=11, max_new_tokens=6)
    first_turn = [user("First line\nsecond line")]
    first = pipe.chat(first_turn, **sampled)
    second = pipe.chat(first_turn + [{"role": "assistant", "content": first}, user("Again?")],
                       **sampled | {"do_sample": False})
    assert captured.out == f"{first}\n{second}\n"


def test_each_subcommand_has_its_own_default_model():
    parser = cli.build_parser()
    assert parser.parse_args(["chat"]).model == "Qwen/Qwen2-Audio-7B-Instruct"
    assert parser.parse_args(["caption", "--audio", "x.wav"]).model == "Qwen/Qwen2-Audio-7B"
    assert parser.parse_args(["transcribe", "x.wav"]).model == "Qwen/Qwen2-Audio-7B"
    assert parser.parse_args(["chat"]).model == "Qwen/Qwen2-Audio-7B-Instruct"  # not changed by the others
