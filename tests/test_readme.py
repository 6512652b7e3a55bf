"""The README's Python quickstart runs as written, on a random tiny checkpoint instead of the 7B.

The code is read from README.md at test time (there is no second copy to drift); only the model id changes.
"""

import ast
import builtins
import re
import shutil
import sys
from pathlib import Path

import torch
from helpers import test_signal, write_wav
from tokenizer_fixture import shared_tokenizer_folder

README = Path(__file__).resolve().parent.parent / "README.md"
MODEL_ID = '"Qwen/Qwen2-Audio-7B-Instruct"'


def quickstart_code() -> str:
    """The ```python block of the "## Quickstart" section."""
    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Quickstart\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Quickstart' section"
    blocks = re.findall(r"^```python\n(.*?)^```", section.group(1), flags=re.S | re.M)
    assert len(blocks) == 1, f"expected one ```python block under '## Quickstart', found {len(blocks)}"
    return blocks[0]


def print_calls(code: str) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(code))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"]


def test_quickstart_runs_and_prints_a_reply_at_every_print(tiny_checkpoint, tmp_path, monkeypatch):
    model = tmp_path / "model"  # the tiny checkpoint + tokenizer files: a complete model folder
    model.mkdir()
    for source in [*tiny_checkpoint.iterdir(), *shared_tokenizer_folder().iterdir()]:
        shutil.copyfile(source, model / source.name)
    write_wav(tmp_path / "glass.wav", test_signal(2.0))  # the file the quickstart asks about
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread, above all on a busy machine

    code = quickstart_code()
    assert MODEL_ID in code
    code = code.replace(MODEL_ID, repr(str(model)))
    printed: list[tuple[int, str]] = []  # (line in the block, text) of every print

    def recording_print(*args, sep=" ", end="\n", file=None, flush=False):
        printed.append((sys._getframe(1).f_lineno, sep.join(map(str, args))))
        builtins.print(*args, sep=sep, end=end, file=file, flush=flush)

    try:
        exec(compile(code, "README.md:quickstart", "exec"), {"__name__": "__quickstart__", "print": recording_print})
    finally:
        torch.set_num_threads(threads)

    calls = print_calls(code)
    assert len(calls) >= 4
    for call in calls:
        lines = range(call.lineno, call.end_lineno + 1)
        texts = [text for line, text in printed if line in lines]
        assert texts, f"print at line {call.lineno} of the quickstart never ran"
        if call.args:  # print() alone ends the streamed line; every other print shows a reply (or a list of them)
            for text in texts:
                replies = ast.literal_eval(text) if text.startswith("[") else [text]
                assert replies and all(r.strip() for r in replies), (call.lineno, text)


def test_reading_the_code_names_functions_that_exist():
    import importlib
    import pkgutil

    import qwen2audio

    text = README.read_text(encoding="utf-8")
    section = re.search(r"^## Reading the code\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "README.md has no '## Reading the code' section"
    modules = {m.name for m in pkgutil.iter_modules(qwen2audio.__path__)}
    names = [n for n in re.findall(r"`([\w.]+)`", section.group(1)) if n.split(".")[0] in modules and "." in n]
    assert len(names) >= 15
    for name in names:
        module, *attributes = name.split(".")
        if name.endswith((".py", ".json")):  # a file name
            continue
        target = importlib.import_module(f"qwen2audio.{module}")
        for attribute in attributes:
            assert hasattr(target, attribute), f"README 'Reading the code' names {name}, which does not exist"
            target = getattr(target, attribute)
