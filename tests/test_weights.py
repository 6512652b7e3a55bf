"""Loading checkpoints written by transformers: no renaming, strict names and shapes, clear errors."""

import json
import shutil

import pytest
import torch
from helpers import load_hf, save_tiny_checkpoint
from safetensors.torch import load_file, save_file

import qwen2audio
from qwen2audio.errors import ConfigError, WeightsError


def test_parameter_names_equal_the_checkpoint_keys(tiny_checkpoint):
    model = qwen2audio.load(tiny_checkpoint).model
    on_disk = load_file(tiny_checkpoint / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(on_disk)
    assert all(torch.equal(state[k], on_disk[k]) for k in on_disk)
    assert "audio_tower.layers.0.self_attn.k_proj.weight" in state and "language_model.lm_head.weight" in state


def test_sharded_checkpoint_loads(tiny_gqa_checkpoint):
    index = json.loads((tiny_gqa_checkpoint / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    model = qwen2audio.load(tiny_gqa_checkpoint).model
    hf = load_hf(tiny_gqa_checkpoint)
    assert torch.equal(model.language_model.lm_head.weight, hf.lm_head.weight)


def test_dtype_none_keeps_checkpoint_dtype_and_dtype_casts(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    assert qwen2audio.load(folder).model.audio_tower.conv1.weight.dtype == torch.bfloat16
    model = qwen2audio.load(folder, dtype="float32").model
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.is_meta for p in model.parameters())


def copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_is_named(tiny_gqa_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_gqa_checkpoint, tmp_path / "ckpt")
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(WeightsError, match=shard.name):
        qwen2audio.load(folder)


def test_missing_and_unexpected_keys_are_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    del state["audio_tower.layers.1.fc2.bias"]
    state["language_model.model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(WeightsError, match="missing keys: audio_tower.layers.1.fc2.bias") as e:
        qwen2audio.load(folder)
    assert "unexpected keys: language_model.model.layers.0.mlp.extra.weight" in str(e.value)


def test_shape_mismatch_is_named(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(folder / "model.safetensors")
    state["multi_modal_projector.linear.bias"] = torch.zeros(65)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(WeightsError, match=r"multi_modal_projector.linear.bias has shape \(65,\)"):
        qwen2audio.load(folder)


def test_corrupt_shard_and_missing_weights(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        qwen2audio.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no model.safetensors"):
        qwen2audio.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="config.json"):
        qwen2audio.load(folder)


def test_not_a_folder_nor_repo_id():
    with pytest.raises(WeightsError, match="neither a folder nor a Hub repo id"):
        qwen2audio.load("./no/such/folder")
