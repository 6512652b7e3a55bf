"""Hostile config files (issue 18): config.json, generation_config.json and preprocessor_config.json that are not
UTF-8, not JSON objects, of wrong types or ranges, deeply nested, too large, unreadable or not regular files. Each is
a ConfigError within a time bound, with a sentence naming the file and the field."""

import json
import os
import shutil
from pathlib import Path

import pytest
from hostile import refused
from mini_tokenizer import write_mini_tokenizer

from qwen2audio.config import GenerationConfig, Qwen2AudioConfig
from qwen2audio.errors import ConfigError
from qwen2audio.processor import Processor

GOOD = {"model_type": "qwen2_audio", "audio_token_index": 151646,
        "audio_config": {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 64},
        "text_config": {"vocab_size": 151936, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "eos_token_id": 151645}}


def text(**changes) -> dict:
    return dict(GOOD, text_config=dict(GOOD["text_config"], **changes))


def audio(**changes) -> dict:
    return dict(GOOD, audio_config=dict(GOOD["audio_config"], **changes))


def write(folder: Path, name: str, content: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    (folder / name).write_bytes(raw)
    return folder


def test_the_good_config_loads(tmp_path):
    assert Qwen2AudioConfig.from_file(write(tmp_path, "config.json", GOOD)).text_config.num_key_value_heads == 2


# (what is written as config.json, the field or phrase the error must name)
CONFIGS = {
    "not_utf8": (b'{"model_type": "qwen2_audio\xff"}', "not valid JSON"),
    "a_list": ([1, 2], "must be a JSON object"),
    "a_string": ("qwen2_audio", "must be a JSON object"),
    "null": (None, "must be a JSON object"),
    "text_config_list": (dict(GOOD, text_config=[1]), "text_config must be an object"),
    "audio_config_string": (dict(GOOD, audio_config="big"), "audio_config must be an object"),
    "size_as_string": (text(hidden_size="64"), "hidden_size must be an integer"),
    "size_as_float": (text(hidden_size=64.0), "hidden_size must be an integer"),
    "size_as_bool": (text(num_hidden_layers=True), "num_hidden_layers must be an integer"),
    "layers_null": (text(num_hidden_layers=None), "num_hidden_layers must be an integer"),
    "negative_size": (text(intermediate_size=-128), "intermediate_size must be at least 1"),
    "zero_heads": (text(num_attention_heads=0), "num_attention_heads must be at least 1"),
    "zero_kv_heads": (text(num_key_value_heads=0), "num_key_value_heads must be at least 1"),
    "zero_audio_heads": (audio(encoder_attention_heads=0), "encoder_attention_heads must be at least 1"),
    "negative_head_dim": (text(head_dim=-16), "head_dim -16 must be positive"),
    "eps_infinite": (text(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite number"),
    "theta_nan": (text(rope_theta=float("nan")), "rope_theta must be a finite number"),
    "theta_negative": (text(rope_theta=-1.0), "rope_theta"),
    "eos_outside_vocab": (text(eos_token_id=10**9), "eos_token_id 1000000000 is not a token id"),
    "eos_list_with_string": (text(eos_token_id=[1, "2"]), "eos_token_id must be a token id"),
    "pad_negative": (text(pad_token_id=-1), "pad_token_id -1 is not a token id"),
    "audio_token_string": (dict(GOOD, audio_token_index="151646"), "audio_token_index must be a token id"),
    "audio_token_negative": (dict(GOOD, audio_token_index=-5), "audio_token_index must be a token id"),
    "activation_list": (audio(activation_function=["gelu"]), "activation_function must be a string"),
    "sliding_window_string": (text(use_sliding_window="yes"), "use_sliding_window"),
    "rope_scaling_list": (text(rope_scaling=[1]), "rope_scaling must be an object"),
    "dtype_number": (dict(GOOD, dtype=16), "dtype must be a string"),
    "model_type_list": (dict(GOOD, model_type=["qwen2_audio"]), "model_type"),
    "deeply_nested": (b'{"text_config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "duplicate_key": (b'{"model_type": "qwen2_audio", "model_type": "llama"}', "appears twice"),
    "huge_int": (b'{"text_config": {"hidden_size": 1' + b"0" * 5000 + b"}}", "not valid JSON"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_hostile_config_json(tmp_path, name):
    content, phrase = CONFIGS[name]
    folder = write(tmp_path, "config.json", content)
    refused(lambda: Qwen2AudioConfig.from_file(folder), ConfigError, str(folder / "config.json"), phrase)


def test_config_json_that_is_not_a_regular_file(tmp_path):
    (tmp_path / "dir" / "config.json").mkdir(parents=True)
    refused(lambda: Qwen2AudioConfig.from_file(tmp_path / "dir"), ConfigError, "config.json", "not a regular file")
    os.mkfifo(tmp_path / "config.json")  # opening a FIFO for reading waits for a writer: it must not be opened so
    refused(lambda: Qwen2AudioConfig.from_file(tmp_path), ConfigError, "config.json", "not a regular file")
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").symlink_to("/dev/zero")  # endless bytes
    refused(lambda: Qwen2AudioConfig.from_file(tmp_path), ConfigError, "config.json", "not a regular file")


def test_config_json_too_large(tmp_path):
    with open(tmp_path / "config.json", "wb") as f:
        f.truncate(65 << 20)  # a sparse 65 MB file: costs no disk
    refused(lambda: Qwen2AudioConfig.from_file(tmp_path), ConfigError, "config.json", "larger than 64 MB")


def as_nobody(fn) -> str:
    """fn()'s outcome ("ok" or "Type: message") in a forked child that first drops to the user nobody: root
    reads every file whatever its permissions, so this is how a root test run meets "Permission denied"."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no torch work happens here, only file reads
        os.close(read)
        try:
            os.setgid(65534)
            os.setuid(65534)
            fn()
            outcome = "ok"
        except BaseException as e:
            outcome = f"{type(e).__name__}: {e}"
        os.write(write, outcome.encode()[:60000])
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        outcome = f.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_unreadable_config_json(tmp_path):
    write(tmp_path, "config.json", GOOD)
    (tmp_path / "config.json").chmod(0)
    if os.geteuid() == 0:
        outcome = as_nobody(lambda: Qwen2AudioConfig.from_file(tmp_path / "config.json"))
    else:
        try:
            Qwen2AudioConfig.from_file(tmp_path / "config.json")
            outcome = "ok"
        except ConfigError as e:
            outcome = f"ConfigError: {e}"
    assert outcome.startswith("ConfigError: cannot read config.json") and "Permission denied" in outcome, outcome


GENERATION = {
    "not_utf8": (b"\xfe\xff{}", "not valid JSON"),
    "a_list": ([0.7], "must be a JSON object"),
    "temperature_string": ({"temperature": "0.7"}, "temperature must be a finite number"),
    "temperature_infinite": ({"temperature": float("inf")}, "temperature must be a finite number"),
    "top_k_float": ({"top_k": 2.5}, "top_k must be an integer"),
    "do_sample_string": ({"do_sample": "true"}, "do_sample must be true or false"),
    "eos_string": ({"eos_token_id": "abc"}, "eos_token_id must be a token id"),
    "eos_object": ({"eos_token_id": {"id": 2}}, "eos_token_id must be a token id"),
    "max_new_tokens_float": ({"max_new_tokens": 5.5}, "max_new_tokens must be an integer"),
}


@pytest.mark.parametrize("name", GENERATION)
def test_hostile_generation_config_json(tmp_path, name):
    content, phrase = GENERATION[name]
    folder = write(tmp_path, "generation_config.json", content)
    refused(lambda: GenerationConfig.from_file(folder), ConfigError, str(folder / "generation_config.json"), phrase)


def test_generation_config_json_fifo(tmp_path):
    os.mkfifo(tmp_path / "generation_config.json")
    refused(lambda: GenerationConfig.from_file(tmp_path), ConfigError, "generation_config.json", "not a regular file")


PREPROCESSOR = {
    "a_list": ([128], "must hold a JSON object"),
    "null": (None, "must hold a JSON object"),
    "not_utf8": (b"\x80", "not valid JSON"),
    "feature_size": ({"feature_size": 80}, "feature_size is 80"),
    "sampling_rate_string": ({"sampling_rate": "16000"}, "sampling_rate is '16000'"),
    "hop_length": ({"hop_length": 320}, "hop_length is 320"),
    "chunk_length": ({"chunk_length": 10}, "chunk_length is 10"),
}


@pytest.mark.parametrize("name", PREPROCESSOR)
def test_hostile_preprocessor_config_json(tmp_path, name):
    content, phrase = PREPROCESSOR[name]
    folder = write_mini_tokenizer(tmp_path / "tok")
    write(folder, "preprocessor_config.json", content)
    refused(lambda: Processor.from_folder(folder), ConfigError, str(folder / "preprocessor_config.json"), phrase)


def test_preprocessor_config_json_fifo(tmp_path):
    folder = write_mini_tokenizer(tmp_path / "tok")
    (folder / "preprocessor_config.json").unlink()
    os.mkfifo(folder / "preprocessor_config.json")
    refused(lambda: Processor.from_folder(folder), ConfigError, "preprocessor_config.json", "not a regular file")
    shutil.rmtree(folder)


@pytest.mark.parametrize("generation, phrase", [
    ({"eos_token_id": [10**9]}, "token id 1000000000"), ({"pad_token_id": 600}, "token id 600"),
    ({"eos_token_id": [-1]}, "eos_token_ids must be token ids"), ({"do_sample": True, "temperature": 0.0},
                                                                   "temperature must be > 0 when sampling"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"), ({"max_new_tokens": -3}, "max_new_tokens must be at least 1"),
])
def test_generation_defaults_are_checked_against_the_model_at_load(tmp_path, generation, phrase):
    """generation_config.json's values go through the one check of generation options, and its ids against the
    model's vocabulary (512 here), when the pipeline is made: a ConfigError naming the file."""
    from qwen2audio.pipeline import Qwen2Audio
    from qwen2audio.weights import meta_model

    model = meta_model(Qwen2AudioConfig.from_dict(dict(GOOD, text_config=dict(GOOD["text_config"], vocab_size=512,
                                                                               eos_token_id=None))))
    config = GenerationConfig.from_dict(generation)
    refused(lambda: Qwen2Audio(model, tmp_path, config, None), ConfigError, str(tmp_path / "generation_config.json"),
            phrase)
