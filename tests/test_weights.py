"""Loading checkpoints written by transformers: no renaming, strict names and shapes, clear errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

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


def test_loaded_weights_are_the_models_own(tiny_checkpoint, tmp_path):
    # Nothing stays mapped: changing a loaded weight leaves the file alone, and changing the file (here: deleting
    # it) leaves the loaded model alone.
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    before = (folder / "model.safetensors").read_bytes()
    on_disk = load_file(folder / "model.safetensors")
    model = qwen2audio.load(folder).model  # waits until the weights are in memory of their own
    with torch.no_grad():
        model.language_model.lm_head.weight.zero_()
    assert (folder / "model.safetensors").read_bytes() == before
    again = qwen2audio.load(folder).model
    (folder / "model.safetensors").unlink()
    assert all(torch.equal(v, on_disk[k]) for k, v in again.state_dict().items())


def test_mmap_maps_large_tensors_copy_on_write(tiny_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    before = (folder / "model.safetensors").read_bytes()
    on_disk = load_file(folder / "model.safetensors")
    model = qwen2audio.load(folder, mmap=True).model
    assert all(torch.equal(v, on_disk[k]) for k, v in model.state_dict().items())
    head = model.language_model.lm_head.weight  # 40 MB: mapped
    with torch.no_grad():
        head.zero_()  # stays in this process
    assert (folder / "model.safetensors").read_bytes() == before
    assert not qwen2audio.load(folder, mmap=True).model.language_model.lm_head.weight.eq(0).all()


def test_large_tensors_go_to_huge_page_memory():
    import mmap

    from qwen2audio.checkpoint import HUGE_PAGE_MIN_BYTES, TensorEntry, empty_on_huge_pages

    big = empty_on_huge_pages(TensorEntry(torch.bfloat16, (1024, 1024), 0, HUGE_PAGE_MIN_BYTES))
    small = empty_on_huge_pages(TensorEntry(torch.float32, (16,), 0, 64))
    assert big.shape == (1024, 1024) and big.dtype == torch.bfloat16 and small.shape == (16,)
    if hasattr(os, "preadv"):  # an anonymous mapping of its own (marked for huge pages where the OS has them)
        assert big.data_ptr() % mmap.PAGESIZE == 0
    big.fill_(1.5)
    assert big.sum().item() == 1.5 * 1024 * 1024


# Peak RSS (VmHWM) above the RSS after the imports, in a fresh process (see test_convert.MEASURE), after every
# weight has been touched: mapped pages count once they are read.
MEASURE_LOAD = textwrap.dedent("""
    import json, re, sys
    import torch
    import qwen2audio
    with torch.device("meta"):
        torch.nn.Embedding(2, 2)
    torch.ones(2**20).sum()  # starts torch's thread pool
    from qwen2audio.kernels.cpu import int8_kernel
    int8_kernel()  # loads the int8 kernel's library where it runs: code (~6 MB), not weights
    def vm(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
    base = vm("VmRSS")
    pipe = qwen2audio.load(sys.argv[1], dtype=sys.argv[2], quantize=sys.argv[3] or None, quiet=True)
    assert pipe.wait_until_ready(60) and pipe.moving.error is None
    state = pipe.model.state_dict()
    for t in state.values():
        t.reshape(-1)[::1024].float().sum()  # reads every page (4 kB) of every weight
    print(json.dumps({"peak": vm("VmHWM") - base, "weights": sum(t.numel() * t.element_size()
                                                                  for t in state.values())}))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak RSS from /proc (Linux)")
@pytest.mark.parametrize("dtype, quantize", [("float32", ""), ("bfloat16", ""), ("float32", "int8")])
def test_load_holds_the_weights_once(decoder_heavy_checkpoint, dtype, quantize):
    # The bound: peak memory while loading at most 1.15x the loaded weights. As stored (mapped), cast while
    # reading (one fp32 tensor at a time), and quantized while reading (one block of rows at a time).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # as in test_convert: measure tensors, not glibc arenas
    out = subprocess.run([sys.executable, "-c", MEASURE_LOAD, str(decoder_heavy_checkpoint), dtype, quantize],
                         capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{dtype} {quantize or ''}: weights {result['weights'] / 1e6:.0f} MB, peak RSS above baseline "
          f"{result['peak'] / 1e6:.0f} MB ({result['peak'] / result['weights']:.2f}x)")
    assert result["peak"] <= 1.15 * result["weights"]


# -- a model you changed ---------------------------------------------------------------------------------------------

class ScaledAttention(qwen2audio.decoder.Attention):
    """A researcher's attention: the same parameters, its output scaled by a learnable (new) gate."""

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.gate = torch.nn.Linear(1, 1, bias=False)  # new: not in any checkpoint

    def forward(self, x, *args, **kwargs):
        return super().forward(x, *args, **kwargs) * self.gate.weight[0, 0]


class GatedModel(qwen2audio.Qwen2AudioForConditionalGeneration):
    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        for layer in self.language_model.model.layers:
            layer.self_attn = ScaledAttention(cfg.text_config)


def test_load_into_a_subclass_with_a_replaced_module(tiny_checkpoint):
    config = qwen2audio.Qwen2AudioConfig.from_file(tiny_checkpoint)
    with torch.device("meta"):
        model = GatedModel(config)
    with pytest.raises(WeightsError, match=r"missing keys: language_model.model.layers.0.self_attn.gate.weight"):
        qwen2audio.load_model(tiny_checkpoint, model=model, quiet=True)
    qwen2audio.load_model(tiny_checkpoint, model=model, allow_missing=["*.self_attn.gate.weight"], quiet=True)
    assert not any(t.is_meta for t in model.state_dict().values())
    on_disk = load_file(tiny_checkpoint / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in on_disk.items())
    with torch.no_grad():
        for layer in model.language_model.model.layers:
            layer.self_attn.gate.weight.fill_(1.0)  # gate 1: the original model
        ids = torch.tensor([[100, 200, 300]])
        torch.testing.assert_close(model(ids), qwen2audio.load_model(tiny_checkpoint, quiet=True)(ids), rtol=0, atol=0)


def test_load_into_a_model_with_an_extra_head_built_on_cpu(tiny_checkpoint):
    config = qwen2audio.Qwen2AudioConfig.from_file(tiny_checkpoint)
    model = qwen2audio.Qwen2AudioForConditionalGeneration(config)
    model.value_head = torch.nn.Linear(config.text_config.hidden_size, 1)
    head = model.value_head.weight.detach().clone()
    qwen2audio.load_model(tiny_checkpoint, model=model, allow_missing=["value_head.*"], quiet=True)
    assert torch.equal(model.value_head.weight, head)  # built on a real device: kept as built
    assert model.audio_tower.conv1.weight.requires_grad  # a plain, trainable module


def test_a_checkpoint_key_the_model_lacks_is_named(tiny_checkpoint):
    config = qwen2audio.Qwen2AudioConfig.from_file(tiny_checkpoint)
    with torch.device("meta"):
        model = qwen2audio.Qwen2AudioForConditionalGeneration(config)
    del model.multi_modal_projector.linear.bias
    model.multi_modal_projector.linear.register_parameter("bias", None)
    with pytest.raises(WeightsError, match="unexpected keys: multi_modal_projector.linear.bias"):
        qwen2audio.load_model(tiny_checkpoint, model=model, quiet=True)


def test_loading_touches_nothing_outside_our_model(tiny_checkpoint):
    """Building our model on the meta device skips its random init with a thread-local torch function mode: a
    model built at the same time in another thread, and nn.init itself, are untouched."""
    import threading

    init = torch.nn.init.normal_
    done = threading.Event()
    seen = []

    def build_elsewhere() -> None:
        while not done.is_set():
            torch.manual_seed(0)
            layer = torch.nn.Embedding(64, 8)  # normal_ init: N(0, 1)
            seen.append(float(layer.weight.detach().std()))

    worker = threading.Thread(target=build_elsewhere)
    worker.start()
    try:
        for _ in range(3):
            model = qwen2audio.load(tiny_checkpoint, quiet=True).model
    finally:
        done.set()
        worker.join()
    assert torch.nn.init.normal_ is init and len(seen) > 0 and len(set(seen)) == 1 and 0.8 < seen[0] < 1.2
    assert type(torch.nn.Linear(2, 2)) is torch.nn.Linear
    plain = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    assert all(type(m) is torch.nn.Linear for n, m in plain.named_modules() if n.endswith(("_proj", "lm_head")))
    assert model is not None


def mapping_range(mapping) -> range:
    import ctypes

    start = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    return range(start, start + len(mapping))


def test_mapped_weights_move_into_memory_while_the_model_answers(tiny_checkpoint):
    """load() maps the files and returns; a background thread moves each mapped tensor into memory of its own and
    swaps it in. Replies computed while tensors are swapped under them equal the replies before and after."""
    import threading

    from qwen2audio.resident import MoveIntoMemory
    from qwen2audio.weights import load_weights

    on_disk = load_file(tiny_checkpoint / "model.safetensors")
    pipe = qwen2audio.load(tiny_checkpoint, quiet=True)
    assert pipe.wait_until_ready(30) and pipe.moving.error is None
    moved = {name for name, _, _ in pipe.moving.mapped}
    assert {"language_model.lm_head.weight", "language_model.model.embed_tokens.weight"} <= moved
    params = dict(pipe.model.named_parameters())
    for name, mapping, _ in pipe.moving.mapped:
        assert params[name].data_ptr() not in mapping_range(mapping)  # in memory of its own now
        assert torch.equal(params[name], on_disk[name])

    # The same by hand, with generation running in another thread while the tensors are swapped under it.
    mapped: list = []
    model = load_weights(tiny_checkpoint, map_files=True, mapped=mapped)
    pipe = qwen2audio.Qwen2Audio(model, tiny_checkpoint, None)
    ids = torch.tensor([[100, 200, 300, 400]])
    expected = pipe.generate(ids, max_new_tokens=12, do_sample=False, ignore_eos=True)
    replies = []
    reader = threading.Thread(target=lambda: replies.extend(
        pipe.generate(ids, max_new_tokens=12, do_sample=False, ignore_eos=True) for _ in range(8)))
    reader.start()
    mover = MoveIntoMemory(model, mapped)
    reader.join()
    assert mover.wait(30) and mover.error is None and len(replies) == 8
    assert all(torch.equal(r, expected) for r in replies)
    assert all(dict(model.named_parameters())[name].data_ptr() not in mapping_range(m) for name, m, _ in mapped)
    assert torch.equal(pipe.generate(ids, max_new_tokens=12, do_sample=False, ignore_eos=True), expected)
