"""convert() / save() / tools/convert_weights.py: Hub layout that transformers loads, int8 folders, memory, safety."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import audio_prompt_ids, load_hf, save_tiny_checkpoint, test_signal
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qwen2audio
from qwen2audio.config import Qwen2AudioConfig
from qwen2audio.convert import convert, parse_size, save
from qwen2audio.errors import InputError, WeightsError
from qwen2audio.features import audio_token_count, extract_features
from qwen2audio.quantize import Int8Linear, int8_module_names, quantize_int8
from qwen2audio.checkpoint import checkpoint_shards

REPO = Path(__file__).resolve().parents[1]
DOWN = "language_model.model.layers.0.mlp.down_proj.weight"


def prompt(text_len: int, seconds: float = 2.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids (1, T), input_features, feature_attention_mask): random text around one audio clip."""
    feats, mask = extract_features([test_signal(seconds)])
    g = torch.Generator().manual_seed(0)
    texts = [torch.randint(0, 151000, (text_len,), generator=g).tolist() for _ in range(2)]
    return torch.tensor([audio_prompt_ids([audio_token_count(int(mask.sum()))], texts)]), feats, mask


@torch.no_grad()
def ours_logits(model, inputs) -> torch.Tensor:
    return model(inputs[0], None, inputs[1], inputs[2])


@torch.no_grad()
def hf_logits(model, inputs) -> torch.Tensor:
    return model(input_ids=inputs[0], input_features=inputs[1], feature_attention_mask=inputs[2]).logits


def tensors_on_disk(folder: Path) -> dict[str, tuple[str, torch.dtype, int]]:
    """key -> (file name, dtype, bytes), read from the safetensors headers."""
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I8": torch.int8}
    out = {}
    for path, keys in checkpoint_shards(folder).items():
        with safe_open(path, framework="pt") as f:
            for key in keys:
                dtype, shape = dtypes[f.get_slice(key).get_dtype()], f.get_slice(key).get_shape()
                out[key] = (path.name, dtype, torch.Size(shape).numel() * dtype.itemsize)
    return out


def test_parse_size():
    assert parse_size("500MB") == 500 * 10**6 and parse_size("2GB") == 2 * 10**9 and parse_size("2gb") == 2 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("123") == 123 and parse_size(4096) == 4096
    assert parse_size("64KiB") == 65536 and parse_size("10 MB") == 10**7
    for bad in ("2XB", "-1", "0", "abc", "", "1.5.2GB"):
        with pytest.raises(WeightsError, match="is not a size"):
            parse_size(bad)


def test_bf16_cast_loads_in_transformers_equal_to_its_own_cast(tiny_checkpoint, tmp_path):
    dst = convert(tiny_checkpoint, tmp_path / "bf16", dtype="bfloat16", max_shard_size="5MB")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    on_disk = tensors_on_disk(dst)
    files = sorted({name for name, _, _ in on_disk.values()})
    assert len(files) >= 3 and files == sorted(p.name for p in dst.glob("*.safetensors"))
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["weight_map"] == {k: name for k, (name, _, _) in on_disk.items()}  # and each shard holds its keys
    assert index["metadata"]["total_size"] == sum(b for _, _, b in on_disk.values())
    assert {dt for _, dt, _ in on_disk.values()} == {torch.bfloat16}
    with safe_open(tiny_checkpoint / "model.safetensors", framework="pt") as f:
        assert set(on_disk) == set(f.keys())
        fp32_bytes = sum(torch.Size(f.get_slice(k).get_shape()).numel() * 4 for k in f.keys())
    assert 2 * index["metadata"]["total_size"] == fp32_bytes
    config = json.loads((dst / "config.json").read_text())
    assert config["dtype"] == config["text_config"]["dtype"] == "bfloat16"
    assert not (dst / "pytorch_model.bin").exists() and all(p.suffix in (".json", ".safetensors")
                                                             for p in dst.iterdir())

    inputs = prompt(30)
    reference = hf_logits(load_hf(tiny_checkpoint, torch.bfloat16), inputs)
    from transformers import Qwen2AudioForConditionalGeneration

    hf = Qwen2AudioForConditionalGeneration.from_pretrained(dst).eval()  # dtype=None: the dtype config.json declares
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf_logits(hf, inputs), reference)
    ours = ours_logits(qwen2audio.load(dst).model, inputs)
    assert torch.equal(ours, ours_logits(qwen2audio.load(tiny_checkpoint, dtype="bfloat16").model, inputs))


def test_edited_model_saved_and_reloaded_by_transformers_and_us(tiny_checkpoint, tmp_path):
    model = qwen2audio.load(tiny_checkpoint).model
    inputs = prompt(20)
    before = ours_logits(model, inputs)
    model.get_parameter(DOWN).data[3, 5] += 1.0
    edited = ours_logits(model, inputs)
    assert (edited - before).abs().max() > 1e-3  # the edit is visible in the output

    derived = save(model, tmp_path / "derived", max_shard_size="4MB")  # config.json built from model.cfg
    copied = save(model, tmp_path / "copied", config=tiny_checkpoint)  # config.json and side files from the source
    assert (copied / "model.safetensors").is_file() and not (copied / "model.safetensors.index.json").exists()
    assert len(list(derived.glob("model-*.safetensors"))) > 1
    assert (copied / "generation_config.json").read_text() == (tiny_checkpoint / "generation_config.json").read_text()
    original = load_hf(tiny_checkpoint).model.language_model.layers[0].mlp.down_proj.weight
    for folder in (derived, copied):
        hf = load_hf(folder)
        weight = hf.model.language_model.layers[0].mlp.down_proj.weight
        assert weight[3, 5] == original[3, 5] + 1.0 and torch.equal(weight, model.get_parameter(DOWN))
        ours = qwen2audio.load(folder).model
        assert torch.equal(ours_logits(ours, inputs), edited)
        assert (hf_logits(hf, inputs) - edited).abs().max() < 1e-4

    assert Qwen2AudioConfig.from_file(derived) == model.cfg  # the derived config.json reads back as the same config


def test_save_derived_config_gqa_and_dtype(tiny_gqa_checkpoint, tmp_path):
    model = qwen2audio.load(tiny_gqa_checkpoint).model
    dst = save(model, tmp_path / "gqa", dtype="bfloat16")
    hf = load_hf(dst, torch.bfloat16)
    assert hf.config.text_config.rope_parameters["rope_theta"] == 123456.0
    inputs = prompt(20)
    assert torch.equal(hf_logits(hf, inputs), hf_logits(load_hf(tiny_gqa_checkpoint, torch.bfloat16), inputs))


def test_int8_folder_loads_directly_and_agrees_with_bf16(tiny_checkpoint, tmp_path, caplog):
    dst = convert(tiny_checkpoint, tmp_path / "int8", dtype="bfloat16", quantize="int8")
    config = json.loads((dst / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "qwen2audio_int8"
    assert (dst / "model.safetensors").is_file() and not (dst / "model.safetensors.index.json").exists()
    on_disk = tensors_on_disk(dst)
    quant = qwen2audio.load_model(dst)  # the plain model: load() would put the CPU's int8 layers in their place
    names = [n for n, m in quant.named_modules() if isinstance(m, Int8Linear)]
    assert len(names) == 2 * 7 + 1 and not int8_module_names(quant)  # every decoder linear, lm_head included
    for n in names:
        assert on_disk[f"{n}.weight"][1] == torch.int8 and on_disk[f"{n}.scales"][1] == torch.bfloat16
    assert on_disk["language_model.model.layers.0.self_attn.q_proj.bias"][1] == torch.bfloat16
    assert on_disk["audio_tower.layers.0.fc1.weight"][1] == torch.bfloat16  # the encoder is not quantized

    # Bit for bit what load(dtype=bf16, quantize="int8") builds in memory, ...
    swapped = qwen2audio.load(tiny_checkpoint, dtype="bfloat16", quantize="int8").model
    a, b = quant.state_dict(), swapped.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    # ... and a quantized model saved with save() writes the same folder.
    saved = save(swapped, tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["quantization_config"] == config["quantization_config"]
    c = qwen2audio.load(saved).model.state_dict()
    assert all(torch.equal(a[k], c[k]) for k in a)
    # transformers does not understand the format: it only warns and would read the int8 codes as weights.
    with caplog.at_level(logging.WARNING, logger="transformers"):
        load_hf(dst)
    assert "Unknown quantization type, got qwen2audio_int8" in caplog.text

    bf16 = qwen2audio.load(tiny_checkpoint, dtype="bfloat16").model
    inputs = prompt(200, seconds=4.0)
    agreement = (ours_logits(quant, inputs).argmax(-1) == ours_logits(bf16, inputs).argmax(-1)).float().mean().item()
    print(f"int8 folder vs bf16: top-1 agreement {agreement:.3f} over {inputs[0].shape[1]} positions")
    assert agreement >= 0.95


def test_partly_quantized_model_is_refused(tiny_checkpoint, tmp_path):
    model = qwen2audio.load(tiny_checkpoint).model
    mlp = model.language_model.model.layers[0].mlp
    mlp.up_proj = Int8Linear.from_linear(mlp.up_proj)
    with pytest.raises(WeightsError, match="partly int8"):
        save(model, tmp_path / "partial")
    assert not (tmp_path / "partial").exists()


def test_tied_embeddings(tmp_path):
    # A tied checkpoint without an lm_head tensor (transformers 5 writes one anyway: it never ties Qwen2-Audio's).
    src = save_tiny_checkpoint(tmp_path / "tied", seed=2, tie_word_embeddings=True)
    state = load_file(src / "model.safetensors")
    del state["language_model.lm_head.weight"]
    save_file(state, src / "model.safetensors", metadata={"format": "pt"})
    model = qwen2audio.load(src).model
    saved = save(model, tmp_path / "saved")  # lm_head written out, so that transformers does not re-initialize it
    inputs = prompt(20)
    assert (hf_logits(load_hf(saved), inputs) - ours_logits(model, inputs)).abs().max() < 1e-4
    # int8 unties the lm_head: it is quantized from the embedding and stored as int8 + scales.
    int8 = convert(src, tmp_path / "int8", quantize="int8")
    assert tensors_on_disk(int8)["language_model.lm_head.weight"][1] == torch.int8
    a = qwen2audio.load(int8).model.state_dict()
    b = quantize_int8(qwen2audio.load(src).model).state_dict()
    c = qwen2audio.load(src, quantize="int8").model.state_dict()  # quantized while loading, from the embedding
    assert a.keys() == b.keys() == c.keys() and all(torch.equal(a[k], b[k]) and torch.equal(c[k], b[k]) for k in b)


# Peak RSS (VmHWM) minus the RSS after the imports. Not ru_maxrss: Linux carries the parent's high-water mark
# across fork + exec, so a child of a large pytest process reports pytest's peak, not its own.
MEASURE = textwrap.dedent("""
    import json, re, sys
    import torch
    from qwen2audio.convert import convert
    with torch.device("meta"):  # the first meta build imports torch's meta kernels and sympy (~70 MB of modules)
        torch.nn.Embedding(2, 2)
    def vm(field):
        return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read())[1]) * 1024
    base = vm("VmRSS")
    convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], quantize=sys.argv[4] or None, max_shard_size="50MB")
    print(json.dumps(vm("VmHWM") - base))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads peak RSS from /proc (Linux)")
def test_conversion_streams(decoder_heavy_checkpoint, tmp_path):
    src = decoder_heavy_checkpoint
    shard_sizes = [p.stat().st_size for p in src.glob("*.safetensors")]
    largest_tensor = max(b for _, _, b in tensors_on_disk(src).values())
    model_size = sum(shard_sizes)
    peaks = {}
    for dtype, quantize in (("bfloat16", ""), ("bfloat16", "int8")):
        dst = tmp_path / f"{dtype}{quantize}"
        # glibc keeps freed blocks under its dynamic mmap threshold (which grows to 32 MB) in per-thread heaps, so
        # this model's 4-17 MB tensors would measure the allocator's arenas (85-210 MB from run to run for int8).
        # The 7B's tensors (34-180 MB) are above that threshold; a fixed one makes these behave the same.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(dst), dtype, quantize],
                             capture_output=True, text=True, check=True, env=env)
        peaks[quantize or dtype] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"model {model_size / 1e6:.0f} MB, largest shard {max(shard_sizes) / 1e6:.0f} MB, largest tensor "
          f"{largest_tensor / 1e6:.1f} MB; peak RSS above baseline: "
          + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in peaks.items()))
    assert peaks["bfloat16"] < max(shard_sizes) + largest_tensor
    assert peaks["int8"] < max(shard_sizes) + 3 * largest_tensor  # quantize_weight's fp32 temporaries
    assert max(peaks.values()) < model_size / 2

    # Size: int8 weights take one byte per element where bf16 takes two; scales add 2 bytes per output row.
    bf16, int8 = tensors_on_disk(tmp_path / "bfloat16"), tensors_on_disk(tmp_path / "bfloat16int8")
    quantized = [k for k in bf16 if k.endswith(".weight") and int8[k][1] == torch.int8]
    scale_bytes = sum(int8[k.removesuffix("weight") + "scales"][2] for k in quantized)
    assert len(quantized) == 16 * 7 + 1
    assert sum(b for _, _, b in int8.values()) == sum(b for _, _, b in bf16.values()) - sum(
        bf16[k][2] // 2 for k in quantized) + scale_bytes
    size = {name: sum(p.stat().st_size for p in (tmp_path / name).glob("*.safetensors"))
            for name in ("bfloat16", "bfloat16int8")}
    ratio = size["bfloat16int8"] / size["bfloat16"]
    print(f"on disk: fp32 {model_size / 1e6:.0f} MB, bf16 {size['bfloat16'] / 1e6:.0f} MB, "
          f"int8 {size['bfloat16int8'] / 1e6:.0f} MB ({ratio:.3f} of bf16; scales {scale_bytes / 1e3:.0f} kB)")
    assert size["bfloat16int8"] < model_size / 4 + scale_bytes + 2 * largest_tensor  # embedding stays bf16
    assert ratio < 0.55


def test_refuses_to_overwrite_and_force_replaces(tiny_gqa_checkpoint, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    convert(tiny_gqa_checkpoint, dst)  # an empty folder is fine
    (dst / "stale.safetensors").write_bytes(b"old")
    with pytest.raises(WeightsError, match="not empty; pass --force"):
        convert(tiny_gqa_checkpoint, dst, dtype="float16")
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float32"
    convert(tiny_gqa_checkpoint, dst, dtype="float16", force=True)
    assert not (dst / "stale.safetensors").exists()
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"

    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(WeightsError, match="not a model folder"):
        convert(tiny_gqa_checkpoint, other, force=True)
    assert (other / "todo.txt").read_text() == "keep me"


def test_failure_midway_leaves_no_destination(tiny_gqa_checkpoint, tmp_path):
    src = Path(shutil.copytree(tiny_gqa_checkpoint, tmp_path / "src"))
    last = sorted(src.glob("model-*.safetensors"))[-1]  # read after the first shards were written
    last.write_bytes(last.read_bytes()[:-1000])
    with pytest.raises(WeightsError, match=last.name):
        convert(src, tmp_path / "dst", dtype="bfloat16", max_shard_size="1MB")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no dst, no leftover temporary folder

    good = convert(tiny_gqa_checkpoint, tmp_path / "good")
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    with pytest.raises(WeightsError):
        convert(src, good, dtype="bfloat16", force=True)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before  # the old folder survives a failed --force
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good", "src"]


def test_clear_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        convert(tmp_path / "nowhere", tmp_path / "dst")
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", empty)
    with pytest.raises(WeightsError, match="safetensors"):
        convert(empty, tmp_path / "dst")
    with pytest.raises(WeightsError, match="is not a size"):
        convert(tiny_checkpoint, tmp_path / "dst", max_shard_size="2 gigs")
    with pytest.raises(WeightsError, match="unknown dtype 'float64'"):
        convert(tiny_checkpoint, tmp_path / "dst", dtype="float64")
    with pytest.raises(InputError, match="quantize"):
        convert(tiny_checkpoint, tmp_path / "dst", quantize="int4")
    with pytest.raises(WeightsError, match="contains the source"):
        convert(tiny_checkpoint, tiny_checkpoint.parent, force=True)
    assert not (tmp_path / "dst").exists()


def test_cli(tiny_checkpoint, tmp_path):
    tool = REPO / "tools" / "convert_weights.py"
    dst = tmp_path / "fp16"
    run = subprocess.run([sys.executable, str(tool), str(tiny_checkpoint), str(dst), "--dtype", "float16",
                          "--max-shard-size", "10MB"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"wrote {dst}" in run.stdout and len(list(dst.glob("model-*-of-*.safetensors"))) > 1
    assert {dt for _, dt, _ in tensors_on_disk(dst).values()} == {torch.float16}

    sys.path.insert(0, str(tool.parent))
    try:
        import convert_weights
    finally:
        sys.path.remove(str(tool.parent))
    assert convert_weights.main([str(tiny_checkpoint), str(dst)]) == 1  # exists: one line, no traceback
    help_text = convert_weights.__doc__
    assert "NOT loadable by transformers" in help_text


def test_saving_a_changed_model_is_refused_or_recorded(tiny_checkpoint, tmp_path):
    """A model whose modules were changed (here a two-layer projector) cannot be described by config.json: save()
    refuses it with a sentence, or with allow_changed=True writes it so that load() says how to open it and
    load_model(path, model=...) opens it."""
    def two_layer_projector(model):
        d_audio, d_text = model.cfg.audio_config.d_model, model.cfg.text_config.hidden_size
        model.multi_modal_projector = torch.nn.Sequential()
        model.multi_modal_projector.add_module("linear", torch.nn.Linear(d_audio, d_text))
        model.multi_modal_projector.add_module("linear2", torch.nn.Linear(d_text, d_text))
        return model

    changed = two_layer_projector(qwen2audio.load_model(tiny_checkpoint, quiet=True))
    with pytest.raises(WeightsError, match="added multi_modal_projector.linear2.weight.*allow_changed=True"):
        save(changed, tmp_path / "changed", config=tiny_checkpoint)
    assert not (tmp_path / "changed").exists()
    save(changed, tmp_path / "changed", config=tiny_checkpoint, allow_changed=True)
    with pytest.raises(WeightsError, match="saved from a changed model.*load_model"):
        qwen2audio.load(tmp_path / "changed", quiet=True)
    config = qwen2audio.Qwen2AudioConfig.from_file(tmp_path / "changed")
    with torch.device("meta"):
        again = two_layer_projector(qwen2audio.Qwen2AudioForConditionalGeneration(config))
    qwen2audio.load_model(tmp_path / "changed", model=again, quiet=True)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in changed.state_dict().items())
