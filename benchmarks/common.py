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
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: an fp32 copy of the 7B's widths would double the RAM
    try:
        with torch.device("cpu"):
            model = Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(folder, max_shard_size="2GB")
    marker.write_text(json.dumps(spec))
    return folder


def signal(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 330 * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def best_time(fn: Callable[[], object], repeat: int = 3, warmup: int = 3,
              reduce: Callable[[list[float]], float] = statistics.median) -> float:
    """The median (or `reduce`, e.g. min) wall time of `repeat` calls after `warmup` calls, in seconds. oneDNN
    settles its kernels for a new shape over the first calls (the first of ours at 30 s took 0.66 s, the fourth
    0.37 s), hence 3 warm-up calls by default."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return reduce(times)


def copy_bandwidth_gbs(device: str = "cpu", size: int = 2**30, repeat: int = 5) -> float:
    """Best (read + write) bytes per second of a large tensor copy: the memory system's practical limit."""
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = best_time(lambda: (dst.copy_(src), sync(device)), repeat, warmup=1, reduce=min)  # warm-up: the pages
    return 2 * size / seconds / 1e9


def machine() -> str:
    """The CPU's name, cores and the instruction sets that decide the kernels, torch and its threads."""
    from qwen2audio.kernels.cpu import cpu_features

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    features = cpu_features()
    flags = [f for f in ("avx2", "fma3", "avx512_f", "avx512_bf16", "avx512_vnni", "amx_bf16") if f in features]
    missing = [f for f in ("avx512_f", "avx512_bf16", "amx_bf16") if f not in features]
    return (f"{cpu}, {os.cpu_count()} cores ({' '.join(flags)}{'; no ' + ', '.join(missing) if missing else ''}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def print_table(title: str, header: list[str], rows: list[list[str]], markdown: bool = False) -> None:
    """A pipe table (valid Markdown either way); markdown=True prints the title in bold, ready to paste."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(f"\n**{title}**\n" if markdown else f"\n{title}\n")
    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))


# ---------------------------------------------------------------------------------------------------------------
# Generation inputs and timing, shared by bench_generate.py and run.py.

AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS, PAD_ID = 151646, 151647, 151648, 151643
# "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nAudio 1: " and, after the audio,
# "What's that sound?<|im_end|>\n<|im_start|>assistant\n", as Qwen2 token ids (any ids would do on random weights).
PROMPT_PREFIX = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198, 151644, 872, 198, 14755, 220, 16,
                 25, 220]
PROMPT_SUFFIX = [198, 3838, 594, 429, 5112, 30, 151645, 198, 151644, 77091, 198]
BATCH_SECONDS = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0)  # the batch-8 prompts: one clip each, all lengths differ


def audio_prompts(seconds: list[float] | tuple[float, ...]) -> dict[str, torch.Tensor]:
    """One prompt per clip length, built without a processor: text, <|audio_bos|> N x <|AUDIO|> <|audio_eos|>, text;
    left-padded. Returns input_ids, attention_mask, input_features, feature_attention_mask."""
    from qwen2audio.features import audio_token_count, extract_features

    features, frame_mask = extract_features([signal(s, seed=i) for i, s in enumerate(seconds)])
    rows = [PROMPT_PREFIX + [AUDIO_BOS] + [AUDIO_TOKEN] * audio_token_count(int(f)) + [AUDIO_EOS] + PROMPT_SUFFIX
            for f in frame_mask.sum(-1).tolist()]
    T = max(map(len, rows))
    return {"input_ids": torch.tensor([[PAD_ID] * (T - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows]),
            "input_features": features, "feature_attention_mask": frame_mask}


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the GPU (its work is asynchronous): a clock read after this counts the work before it."""
    if torch.device(device or "cpu").type == "cuda":
        torch.cuda.synchronize()


def _rates(start: float, stamps: list[float], batch: int) -> dict[str, float]:
    """Time to first token, and decode tokens/s over the steps after it (all rows counted)."""
    ttft = stamps[0] - start
    decode = (len(stamps) - 1) * batch / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {"ttft_s": ttft, "decode_tok_s": decode, "total_s": stamps[-1] - start}


def ours_generate(pipe, inputs: dict[str, torch.Tensor], new_tokens: int,
                  capture_logits: bool = False) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """Greedy, exactly new_tokens (eos ignored), through pipe.generate_stream; (timings, tokens (B, n), first-step
    logits (B, V) fp32 or None)."""
    import qwen2audio.generate as gen

    captured = {}
    original_prefill = gen.prefill
    if capture_logits:  # keep the prefill's logits without a second prefill: wrap the module-level function
        def prefill(*args, **kwargs):
            captured["logits"] = original_prefill(*args, **kwargs)
            return captured["logits"]
        gen.prefill = prefill
    try:
        tokens, stamps = [], []
        sync(inputs["input_ids"].device)
        start = time.perf_counter()
        options = pipe.options(max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0, ignore_eos=True)
        pipe.forget_prefixes()  # the runs repeat one prompt: each must prefill it whole, as transformers does
        for token, _ in pipe.generate_stream(**inputs, options=options):
            sync(token.device)
            stamps.append(time.perf_counter())
            tokens.append(token)
    finally:
        gen.prefill = original_prefill
    return _rates(start, stamps, inputs["input_ids"].shape[0]), torch.stack(tokens, 1), captured.get("logits")


def hf_generate(hf, inputs: dict[str, torch.Tensor], new_tokens: int,
                capture_logits: bool = False) -> tuple[dict[str, float], torch.Tensor, torch.Tensor | None]:
    """transformers' generate, greedy, exactly new_tokens (its generation_config's eos removed, so nothing stops
    a row and no logits processor runs), timed with a streamer: (timings, tokens (B, n), first-step logits)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:  # generate() first puts the prompt, then each step's tokens
                sync(value.device)
                self.stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    hf.generation_config.eos_token_id = None
    clock = Clock()
    extra = dict(return_dict_in_generate=True, output_logits=True) if capture_logits else {}
    sync(inputs["input_ids"].device)
    start = time.perf_counter()
    out = hf.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                      pad_token_id=PAD_ID, streamer=clock, **extra)
    sequences = out.sequences if capture_logits else out
    tokens = sequences[:, inputs["input_ids"].shape[1]:]
    if tokens.shape[1] != new_tokens:
        raise RuntimeError(f"transformers generated {tokens.shape[1]} tokens, expected {new_tokens}")
    return (_rates(start, clock.stamps, inputs["input_ids"].shape[0]), tokens,
            out.logits[0].float() if capture_logits else None)


def leading_agreement(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Per row: how many leading tokens two (B, n) results share."""
    same = (a == b).long().cumprod(dim=1)
    return same.sum(dim=1).tolist()


def prefill_gflop(config: dict, prompt_tokens: int, mel_frames: int, encoder_positions: int,
                  logit_rows: int) -> float:
    """Multiply-adds x 2 of one prefill, matrix products only (convolutions, linears, attention scores and sums).

    config is config.json; mel_frames the log-mel frames fed to the encoder, encoder_positions its positions after
    conv2 (transformers: always 3000 and 1500; ours: what the clip needs), logit_rows the positions whose logits are
    computed (transformers 5.24's Qwen2-Audio has no logits_to_keep, so all of them; ours: the last one).
    """
    a, t = config["audio_config"], config["text_config"]
    d, ffn, S = a["d_model"], a["encoder_ffn_dim"], encoder_positions
    audio = mel_frames * a.get("num_mel_bins", 128) * d * 3 + S * d * d * 3  # conv1, conv2 (kernel 3)
    audio += a["encoder_layers"] * (S * (4 * d * d + 2 * d * ffn) + 2 * S * S * d)  # linears; q k^T and p v
    audio += (S // 2) * d * t["hidden_size"]  # projector
    h, L, T = t["hidden_size"], t["num_hidden_layers"], prompt_tokens
    kv = h // t["num_attention_heads"] * t.get("num_key_value_heads", t["num_attention_heads"])
    layer = h * h * 2 + h * kv * 2 + 3 * h * t["intermediate_size"]  # q, o; k, v; gate, up, down
    text = L * (T * layer + T * T * h) + logit_rows * h * t["vocab_size"]  # causal attention: about half of 2 T^2 h
    return 2 * (audio + text) / 1e9
