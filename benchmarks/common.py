"""Shared benchmark helpers: real-width checkpoints with fewer layers, timing, and table printing."""

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REAL_TEXT = dict(model_type="qwen2", vocab_size=156032, hidden_size=4096, intermediate_size=11008,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151645)
REAL_AUDIO = dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=1280, encoder_attention_heads=20,
                  encoder_ffn_dim=5120, max_source_positions=1500)
SMALL_TEXT = dict(REAL_TEXT, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)


def build_checkpoint(folder: Path, text_layers: int, audio_layers: int, dtype: torch.dtype = torch.bfloat16,
                     small_text: bool = False) -> Path:
    """A random Qwen2-Audio with the 7B's widths (or a tiny decoder) and fewer layers, saved by transformers."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    folder = Path(folder)
    marker = folder / "bench_spec.json"
    spec = {"text_layers": text_layers, "audio_layers": audio_layers, "dtype": str(dtype), "small_text": small_text}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder  # reuse a checkpoint built by an earlier run
    text = dict(SMALL_TEXT if small_text else REAL_TEXT, num_hidden_layers=text_layers)
    config = Qwen2AudioConfig(audio_config=dict(REAL_AUDIO, encoder_layers=audio_layers), text_config=text,
                              audio_token_index=151646)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Qwen2AudioForConditionalGeneration(config).to(dtype)
    model.save_pretrained(folder, max_shard_size="2GB")
    marker.write_text(json.dumps(spec))
    return folder


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time of `repeat` calls after `warmup` calls, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(f"\n{title}\n")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
