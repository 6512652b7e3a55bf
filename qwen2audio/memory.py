"""What a model and its KV caches need in memory, computed from the config before anything is built, against what the
machine has: a config of a huge vocabulary, width or depth fails at once with a sentence saying both, instead of
an allocation that raises a foreign error, or one that succeeds lazily and gets the process killed later.

The counts follow the modules of encoder.py and decoder.py (tests/test_hostile_weights.py checks them against the
model built on the meta device).
"""

import math
from pathlib import Path

import torch

from .config import Qwen2AudioConfig
from .errors import ConfigError, InputError

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def encoder_parameters(cfg: Qwen2AudioConfig) -> int:
    """Elements of the audio encoder and the projector."""
    a, d, f = cfg.audio_config, cfg.audio_config.d_model, cfg.audio_config.encoder_ffn_dim
    convs = a.num_mel_bins * d * 3 + d + d * d * 3 + d
    layer = 4 * d * d + 3 * d + 2 * d * f + f + d + 4 * d  # attention (k without bias), two LayerNorms, fc1, fc2
    return convs + a.max_source_positions * d + a.encoder_layers * layer + 2 * d + d * cfg.text_config.hidden_size + \
        cfg.text_config.hidden_size


def decoder_parameters(cfg: Qwen2AudioConfig) -> tuple[int, int, int]:
    """(elements of the decoder's linear weights and the lm_head: what int8 stores in one byte each, their output
    rows: one scale each, every other decoder element)."""
    t = cfg.text_config
    h, q, kv, i = t.hidden_size, t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim, \
        t.intermediate_size
    linear = t.num_hidden_layers * (h * q + 2 * h * kv + q * h + 3 * h * i) + t.vocab_size * h
    rows = t.num_hidden_layers * (q + 2 * kv + 2 * h + 2 * i) + t.vocab_size
    other = t.vocab_size * h + t.num_hidden_layers * (q + 2 * kv + 2 * h) + h  # embedding, biases, norms
    return linear, rows, other


def parameter_count(cfg: Qwen2AudioConfig) -> int:
    linear, _, other = decoder_parameters(cfg)
    return encoder_parameters(cfg) + linear + other


def model_bytes(cfg: Qwen2AudioConfig, itemsize: int, int8: bool = False) -> int:
    """Bytes of the loaded weights: every element at `itemsize`, or the decoder's linear weights at one byte plus
    one scale per row (int8). A tied lm_head shares the embedding's memory unless it is int8."""
    linear, rows, other = decoder_parameters(cfg)
    shared = cfg.text_config.vocab_size * cfg.text_config.hidden_size if cfg.text_config.tie_word_embeddings else 0
    if int8:
        return linear + rows * itemsize + (encoder_parameters(cfg) + other) * itemsize
    return (encoder_parameters(cfg) + linear - shared + other) * itemsize


def available_memory(device: torch.device) -> int | None:
    """Bytes this process could still get on `device`: MemAvailable + SwapFree on Linux, the free memory of a CUDA
    device; None where it is not known (then nothing is refused)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu" or not Path("/proc/meminfo").is_file():
        return None
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    try:
        return sum(int(fields[k].split()[0]) * 1024 for k in ("MemAvailable", "SwapFree"))
    except (KeyError, ValueError, IndexError):
        return None


def size_text(n: int) -> str:
    """Bytes for people, even for sizes past any float."""
    return f"{n / 1e9:.1f} GB" if n < 10**18 else f"about 10^{int(n.bit_length() * math.log10(2))} bytes"


def check_model_fits(cfg: Qwen2AudioConfig, dtype: torch.dtype | None, device: torch.device, int8: bool,
                     config_file: Path | str) -> None:
    """A ConfigError naming the config when the model it describes cannot fit in the device's available memory.
    dtype None (the checkpoint's) counts the dtype config.json declares, or 2 bytes when it declares none."""
    itemsize = dtype.itemsize if dtype is not None else _ITEMSIZE.get(cfg.torch_dtype or "", 2)
    need, have = model_bytes(cfg, itemsize, int8), available_memory(device)
    if have is not None and need > have:
        count = parameter_count(cfg)
        count_text = f"{count / 1e9:.2f} billion" if count < 10**18 else \
            f"about 10^{int(count.bit_length() * math.log10(2))}"
        raise ConfigError(f"{config_file} describes a model of {count_text} parameters, which needs "
                          f"{size_text(need)} of memory{' (decoder in int8)' if int8 else ''}; this machine has "
                          f"{size_text(have)} available on {device}: check the config's sizes (text_config."
                          "vocab_size, hidden_size, num_hidden_layers, ...), or use quantize='int8' or a larger "
                          "machine")


def check_cache_fits(cfg: Qwen2AudioConfig, batch_size: int, length: int, dtype: torch.dtype,
                     device: torch.device) -> None:
    """An InputError before a KV cache that cannot fit is allocated (a large batch of long prompts)."""
    t = cfg.text_config
    need = 2 * t.num_hidden_layers * batch_size * t.num_key_value_heads * length * t.head_dim * dtype.itemsize
    have = available_memory(device)
    if have is not None and need > have:
        raise InputError(f"a batch of {batch_size} sequences of up to {length} tokens needs a KV cache of "
                         f"{size_text(need)}; {size_text(have)} are available on {device}: use smaller batches or "
                         "a smaller max_new_tokens")
