"""Hostile weight files (issues 18, 20): an index that leads out of the model folder, safetensors headers with
overlapping, out-of-range or ill-typed entries, duplicate keys, deep nesting, FIFOs in place of files; mapped files
changed under a model; configs describing a model that cannot fit in memory."""

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hostile import refused
from safetensors.torch import save_file
from test_config import HUB_CONFIG

import qwen2audio
from qwen2audio.checkpoint import checkpoint_shards, read_header
from qwen2audio.config import Qwen2AudioConfig
from qwen2audio.errors import ConfigError, InputError, WeightsError
from qwen2audio.memory import model_bytes, parameter_count
from qwen2audio.weights import meta_model


def safetensors_bytes(header: dict | bytes, data: bytes = b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("name", ["../elsewhere/model.safetensors", "/etc/passwd", "sub/x.safetensors", "..", "",
                                  "a\\b.safetensors", "x\0.safetensors", 5, None, ["model.safetensors"]])
def test_an_index_naming_a_shard_outside_the_folder_is_refused(tmp_path, name):
    folder, elsewhere = tmp_path / "model", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    save_file({"w": torch.zeros(2)}, elsewhere / "model.safetensors")  # a real file it must not reach
    index = {"metadata": {}, "weight_map": {"language_model.lm_head.weight": name}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(lambda: checkpoint_shards(folder), WeightsError, str(folder / "model.safetensors.index.json"),
            f"names the shard {name!r:.80}", "not a plain file name")


# (header, data): each a way a header can lie about the bytes that follow it.
HEADERS = {
    "overlapping": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                     "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24), "overlap"),
    "past_the_end": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, bytes(8), "past the end"),
    "start_after_end": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, bytes(8), "malformed entry"),
    "size_mismatch": ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, bytes(16), "do not hold"),
    "negative_shape": ({"a": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}, bytes(16), "malformed"),
    "float_offsets": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0.0, 16.0]}}, bytes(16), "malformed"),
    "unknown_dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, bytes(16), "malformed"),
    "entry_a_list": ({"a": [1, 2]}, b"", "malformed"),
    "header_a_list": ([1, 2], b"", "not a JSON object"),
    "huge_shape": ({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 16]}}, bytes(16), "do not hold"),
    "infinite_offset": (b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, Infinity]}}', bytes(16), "malformed"),
    "duplicate_key": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                      b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', bytes(8), "appears twice"),
    "deeply_nested": (b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"", "nested too deeply"),
    "not_utf8": (b'{"\xff": 1}', b"", "not valid JSON"),
}


@pytest.mark.parametrize("name", HEADERS)
def test_a_lying_header_is_refused(tmp_path, name):
    header, data, phrase = HEADERS[name]
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes(header, data))
    refused(lambda: read_header(path), WeightsError, str(path), phrase)


def test_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    refused(lambda: read_header(path), WeightsError, str(path), "header length does not fit")
    path.write_bytes(b"\x01")
    refused(lambda: read_header(path), WeightsError, str(path), "header length does not fit")


def test_overlapping_tensors_are_refused_by_the_loader(tiny_checkpoint, tmp_path):
    """Two tensors sharing bytes would load silently aliased: the whole loader refuses the file."""
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    a, b = "language_model.model.layers.0.input_layernorm.weight", "language_model.model.layers.1.input_layernorm.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]  # b aliases a
    new = json.dumps(header).encode().ljust(length)
    path.write_bytes(raw[:8] + new + raw[8 + length:])
    refused(lambda: qwen2audio.load_model(folder, quiet=True), WeightsError, str(path), "overlap")


def test_fifos_in_place_of_weight_files_do_not_block(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    os.mkfifo(folder / "model.safetensors")
    refused(lambda: checkpoint_shards(folder), WeightsError, "model.safetensors", "not a regular file")
    os.mkfifo(folder / "model.safetensors.index.json")
    refused(lambda: checkpoint_shards(folder), WeightsError, "model.safetensors.index.json", "not a regular file")


@pytest.mark.parametrize("index, phrase", [([1], "no 'weight_map'"), ({"weight_map": []}, "no 'weight_map'"),
                                           ({"weight_map": {}}, "no 'weight_map'")])
def test_an_index_of_the_wrong_shape_is_refused(tmp_path, index, phrase):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(lambda: checkpoint_shards(tmp_path), WeightsError, "model.safetensors.index.json", phrase)


MMAP_CHANGES = textwrap.dedent("""
    import sys, torch, qwen2audio
    from qwen2audio.errors import WeightsError
    folder, change = sys.argv[1], sys.argv[2]
    resident = change == "truncate-after-the-move"  # the default load: mapped, then moved into memory
    pipe = qwen2audio.load(folder, mmap=None if resident else True, quiet=True)
    ids = torch.tensor([[100, 200, 300]])
    pipe.generate(ids, max_new_tokens=2)
    if resident:
        assert pipe.wait_until_ready(timeout=120)
    path = f"{folder}/model.safetensors"
    with open(path, "r+b") as f:
        if change.startswith("truncate"):
            f.truncate(f.seek(0, 2) // 2)
        else:
            f.seek(-4096, 2)
            f.write(bytes(4096))
    try:
        pipe.generate(ids, max_new_tokens=2)
        print("generated")
    except WeightsError as e:
        print("refused:", e)
""")


@pytest.mark.parametrize("change", ["truncate", "overwrite", "truncate-after-the-move"])
def test_a_mapped_file_changed_after_loading_is_detected_before_generating(tiny_checkpoint, tmp_path, change):
    """With mmap=True, reading a page past a truncated file's end kills the process (SIGBUS): the pipeline checks
    the mapped files before each generation. In a subprocess, so that a miss would not take the test run along."""
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    out = subprocess.run([sys.executable, "-c", MMAP_CHANGES, str(folder), change], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, (out.returncode, out.stderr[-2000:])  # -7 would be SIGBUS
    if change == "truncate-after-the-move":  # the weights no longer read the file: nothing to refuse
        assert out.stdout.strip().endswith("generated"), out.stdout
        return
    assert "refused:" in out.stdout and f"{folder}/model.safetensors" in out.stdout
    assert ("was truncated" if change == "truncate" else "was written") in out.stdout


@pytest.mark.parametrize("config", [
    HUB_CONFIG,  # the 7B: 8.4 billion parameters
    dict(HUB_CONFIG, text_config=dict(HUB_CONFIG["text_config"], tie_word_embeddings=True, num_key_value_heads=8,
                                      hidden_size=512, intermediate_size=1000, num_hidden_layers=3)),
    {"audio_config": {"d_model": 48, "encoder_layers": 3, "encoder_attention_heads": 6, "encoder_ffn_dim": 40,
                      "num_mel_bins": 80, "max_source_positions": 100},
     "text_config": {"vocab_size": 77, "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": 2,
                     "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 10}},
])
def test_parameter_count_from_the_config_equals_the_built_model(config):
    cfg = Qwen2AudioConfig.from_dict(config)
    model = meta_model(cfg)
    assert parameter_count(cfg) == sum(v.numel() for v in model.state_dict().values())
    linear = sum(m.weight.numel() for m in model.language_model.modules() if isinstance(m, torch.nn.Linear))
    tied = cfg.text_config.vocab_size * cfg.text_config.hidden_size if cfg.text_config.tie_word_embeddings else 0
    assert model_bytes(cfg, 2) == 2 * (parameter_count(cfg) - tied)
    rows = sum(m.weight.shape[0] for m in model.language_model.modules() if isinstance(m, torch.nn.Linear))
    assert model_bytes(cfg, 2, int8=True) == 2 * parameter_count(cfg) - linear + 2 * rows


@pytest.mark.parametrize("field, value", [("vocab_size", 10**12), ("hidden_size", 2**40), ("num_hidden_layers", 10**9)])
def test_a_model_too_large_for_the_machine_fails_fast(tiny_checkpoint, tmp_path, field, value):
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))
    raw = json.loads((folder / "config.json").read_text())
    raw["text_config"][field] = value
    (folder / "config.json").write_text(json.dumps(raw))
    refused(lambda: qwen2audio.load(folder, quiet=True), ConfigError, str(folder / "config.json"), "parameters",
            "of memory", "this machine has", "available on cpu")


def test_a_kv_cache_too_large_for_the_machine_is_refused(tiny_checkpoint):
    pipe = qwen2audio.load(tiny_checkpoint, quiet=True)
    ids = torch.full((10**6, 1), 100)  # a million rows of one token, 2040 new tokens each: terabytes of cache
    refused(lambda: pipe.generate(ids, max_new_tokens=2040), InputError, "KV cache", "available on cpu")
