"""Bounded mutation fuzzers (issue 18): the safetensors reader (headers, the index, the whole loader on a small
checkpoint), the config readers and the tokenizer readers. Fixed seeds, a few thousand cases per target, each case
under a time bound; the requirement is zero foreign exceptions (anything that is not a Qwen2AudioError) and zero
hangs. The WAV reader's fuzzer is tests/test_audio_fuzz.py. Case counts and times are printed (pytest -s)."""

import faulthandler
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from helpers import save_tiny_checkpoint
from mini_tokenizer import write_mini_tokenizer
from mutate import dump, mutate_bytes, mutate_json, run_cases
from safetensors.torch import save_file

from qwen2audio.checkpoint import checkpoint_shards, read_header, read_tensor
from qwen2audio.config import GenerationConfig, Qwen2AudioConfig
from qwen2audio.memory import check_model_fits
from qwen2audio.processor import Processor
from qwen2audio.weights import load_weights


@pytest.fixture(autouse=True)
def backstop():
    """If a case ever hangs where SIGALRM cannot reach it (inside native code), end the run with a traceback
    instead of hanging CI."""
    faulthandler.dump_traceback_later(300, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def scratch(tmp_path) -> Path:
    """Where the cases' files are written: memory (/dev/shm) where there is one, as a fuzzer writes thousands of
    files and a disk's file creation costs milliseconds each; else the test's tmp_path."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    folder = Path(tempfile.mkdtemp(prefix="qwen2audio-fuzz-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def report(name: str, result: dict) -> None:
    print(f"\n{name}: {result['cases']} cases in {result['seconds']:.1f} s (slowest {result['slowest_case_s']:.3f} s): "
          f"{result['outcomes']}")
    assert result["foreign"] == [], result["foreign"][:10]


def split(raw: bytes) -> tuple[int, dict, bytes]:
    length = struct.unpack("<Q", raw[:8])[0]
    return length, json.loads(raw[8:8 + length]), raw[8 + length:]


def mutated_safetensors(raw: bytes, rng) -> bytes:
    """A header edited as JSON (its length prefix fixed or not), or the file's bytes edited."""
    length, header, data = split(raw)
    if rng.random() < 0.35:
        return mutate_bytes(raw if rng.random() < 0.5 else raw[:8 + length + 64], rng) + \
            (data[64:] if rng.random() < 0.5 else b"")
    text = dump(mutate_json(header, rng), rng)
    prefix = len(text) if rng.random() < 0.85 else rng.choice([0, 1, length, len(text) + 1, 2**63, 2**64 - 1])
    return struct.pack("<Q", prefix) + text + data


def read_everything(path: Path) -> None:
    table = read_header(path)
    with open(path, "rb") as f:
        for entry in table.values():
            read_tensor(f, entry, path)  # every entry that passed the checks is readable


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("st") / "model.safetensors"
    save_file({"a": torch.randn(3, 4), "b": torch.zeros(5, dtype=torch.bfloat16), "c": torch.tensor(7),
               "d": torch.zeros(0, 3), "e": torch.ones(2, 2, dtype=torch.int8)}, path, metadata={"format": "pt"})
    return path.read_bytes()


def test_fuzz_safetensors_header(base_file, scratch):
    path = scratch / "model.safetensors"

    def case(rng):
        path.write_bytes(mutated_safetensors(base_file, rng))
        return lambda: read_everything(path)

    report("safetensors header", run_cases(4000, seed=1801, make_case=case))


def test_fuzz_index(base_file, scratch):
    tmp_path = scratch
    (tmp_path / "model-00001-of-00001.safetensors").write_bytes(base_file)
    index = {"metadata": {"total_size": 100}, "weight_map": dict.fromkeys("abcde", "model-00001-of-00001.safetensors")}

    def case(rng):
        raw = dump(mutate_json(index, rng), rng) if rng.random() < 0.8 else mutate_bytes(json.dumps(index).encode(), rng)
        (tmp_path / "model.safetensors.index.json").write_bytes(raw)
        return lambda: [read_header(p) for p in checkpoint_shards(tmp_path)]

    report("safetensors index", run_cases(3000, seed=1802, make_case=case))


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("fuzz_micro"), vocab_size=64, hidden_size=16,
                                intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                                bos_token_id=None, eos_token_id=None)


def test_fuzz_loader(micro_checkpoint, scratch):
    """The whole loader (index or file, headers against the model's names and shapes, reading) on a checkpoint
    of 0.3 MB whose file is mutated."""
    folder = Path(shutil.copytree(micro_checkpoint, scratch / "ckpt"))
    raw = (folder / "model.safetensors").read_bytes()

    def case(rng):
        (folder / "model.safetensors").write_bytes(mutated_safetensors(raw, rng))
        return lambda: load_weights(folder)

    report("loader", run_cases(600, seed=1803, make_case=case))


@pytest.fixture(scope="module")
def config_files(micro_checkpoint) -> dict:
    return {"config": json.loads((micro_checkpoint / "config.json").read_text()),
            "generation": {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.5, "repetition_penalty": 1.1,
                           "eos_token_id": [151643, 151645], "pad_token_id": 151643, "max_new_tokens": 64}}


def mutated_json_file(obj: dict, rng) -> bytes:
    return dump(mutate_json(obj, rng), rng) if rng.random() < 0.8 else mutate_bytes(json.dumps(obj).encode(), rng)


def test_fuzz_config_json(config_files, scratch):
    tmp_path = scratch
    def read(path):
        config = Qwen2AudioConfig.from_file(path)
        check_model_fits(config, None, torch.device("cpu"), False, path)  # its sizes, however odd, are countable

    def case(rng):
        (tmp_path / "config.json").write_bytes(mutated_json_file(config_files["config"], rng))
        return lambda: read(tmp_path / "config.json")

    report("config.json", run_cases(4000, seed=1804, make_case=case))


def test_fuzz_generation_and_preprocessor_config(config_files, scratch):
    folder = write_mini_tokenizer(scratch / "tok")
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())

    def case(rng):
        if rng.random() < 0.5:
            (folder / "generation_config.json").write_bytes(mutated_json_file(config_files["generation"], rng))
            return lambda: GenerationConfig.from_file(folder)
        (folder / "preprocessor_config.json").write_bytes(mutated_json_file(preprocessor, rng))
        return lambda: Processor.from_folder(folder)

    report("generation_config.json + preprocessor_config.json", run_cases(3000, seed=1805, make_case=case))


def use(processor: Processor) -> None:
    ids = processor.tokenizer.encode("the <|im_start|>user\n<|audio_bos|><|AUDIO|><|audio_eos|> in")
    processor.tokenizer.decode(ids, skip_special_tokens=True)


def test_fuzz_tokenizer_files(scratch):
    folder = write_mini_tokenizer(scratch / "tok")
    originals = {name: (folder / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json",
                                                               "vocab.json", "merges.txt")}
    parsed = {name: json.loads(raw) for name, raw in originals.items() if name.endswith(".json")}
    changed: list[str] = []

    def case(rng):
        for name in changed:  # put back what the last case changed
            (folder / name).write_bytes(originals[name])
        name = rng.choice(list(originals))
        changed[:] = [name, "tokenizer.json"]
        if name == "vocab.json" or rng.random() < 0.5:
            (folder / "tokenizer.json").unlink(missing_ok=True)  # read vocab.json + merges.txt instead
        if name in parsed and rng.random() < 0.75:
            (folder / name).write_bytes(dump(mutate_json(parsed[name], rng), rng))
        else:
            (folder / name).write_bytes(mutate_bytes(originals[name], rng))
        return lambda: use(Processor.from_folder(folder))

    report("tokenizer files", run_cases(3000, seed=1806, make_case=case))
