"""Builders for random tiny checkpoints, written by transformers' own save_pretrained (the Hub's key names)."""

import random
import socket
from pathlib import Path

import numpy as np
import torch

AUDIO_TOKEN = 151646
AUDIO_BOS, AUDIO_EOS = 151647, 151648
TINY_VOCAB = 151936  # room for the real special-token ids


def tiny_hf_config(gqa: bool = False, **text_overrides):
    from transformers import Qwen2AudioConfig

    text = dict(model_type="qwen2", vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2 if gqa else 4, max_position_embeddings=2048,
                rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=151643,
                eos_token_id=151645)
    text.update(text_overrides)
    audio = dict(model_type="qwen2_audio_encoder", num_mel_bins=128, d_model=32, encoder_layers=2,
                 encoder_attention_heads=4, encoder_ffn_dim=64, max_source_positions=1500)
    return Qwen2AudioConfig(audio_config=audio, text_config=text, audio_token_index=AUDIO_TOKEN)


def save_tiny_checkpoint(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                         max_shard_size: str | None = None, **config_kwargs) -> Path:
    """A random Qwen2AudioForConditionalGeneration saved with save_pretrained; returns the folder."""
    from transformers import Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(tiny_hf_config(**config_kwargs)).to(dtype).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return Path(folder)


def load_hf(folder: Path, dtype: torch.dtype = torch.float32):
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()


def test_signal(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """A deterministic mixture of tones and noise, float32 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * (220 + 40 * seed) * t) + 0.2 * np.sin(2 * np.pi * 1870 * t) + 0.05 * rng.standard_normal(t.size)
    return x.astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    """A mono 16-bit PCM WAV of float samples in [-1, 1] (clipped), made with the stdlib `wave` module."""
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def write_wav(path: Path | str, samples: np.ndarray, rate: int = 16000) -> Path:
    """`wav_bytes` written to `path`."""
    Path(path).write_bytes(wav_bytes(samples, rate))
    return Path(path)


def hf_audio_rows(hf_model, input_features: torch.Tensor, feature_attention_mask: torch.Tensor) -> torch.Tensor:
    """The reference's projected, trimmed audio rows, as Qwen2AudioModel.forward computes them (5.24)."""
    from transformers.masking_utils import create_bidirectional_mask

    inner = hf_model.model
    tower = inner.audio_tower
    conv_lengths, token_lengths = tower._get_feat_extract_output_lengths(feature_attention_mask.sum(-1))
    n_positions = (input_features.shape[-1] - 2) // 2 + 1
    mask_2d = (torch.arange(n_positions)[None, :] < conv_lengths[:, None]).long()
    dummy = torch.zeros(input_features.shape[0], n_positions, 1, dtype=inner.multi_modal_projector.linear.weight.dtype)
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=dummy, attention_mask=mask_2d)
    states = tower(input_features, attention_mask=mask).last_hidden_state
    rows = inner.multi_modal_projector(states)
    keep = torch.arange(rows.shape[1])[None, :] < token_lengths[:, None]
    return rows[keep]


def audio_prompt_ids(token_counts: list[int], text_ids: list[list[int]]) -> list[int]:
    """Hand-built expanded ids: text_ids[0], then per audio <|audio_bos|> N x <|AUDIO|> <|audio_eos|> text_ids[i+1]."""
    ids = list(text_ids[0])
    for i, n in enumerate(token_counts):
        ids += [AUDIO_BOS] + [AUDIO_TOKEN] * n + [AUDIO_EOS] + list(text_ids[i + 1])
    return ids


def left_pad(rows: list[list[int]], pad_id: int = 151643) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with left padding."""
    longest = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


test_signal.__test__ = False  # a fixture maker, not a test


def two_conversations(text_seed: int = 0) -> dict[str, torch.Tensor]:
    """Model inputs for two conversations with audio, left-padded: row 0 one 1 s clip, row 1 two clips (2 s and
    3 s), between random text ids drawn with `text_seed`."""
    from qwen2audio.features import audio_token_count, extract_features

    feats, mask = extract_features([test_signal(1.0, seed=0), test_signal(2.0, seed=1), test_signal(3.0, seed=2)])
    counts = [audio_token_count(int(m)) for m in mask.sum(-1)]
    g = torch.Generator().manual_seed(text_seed)
    text = lambda n: torch.randint(0, 151000, (n,), generator=g).tolist()  # noqa: E731
    ids, attention_mask = left_pad([audio_prompt_ids(counts[:1], [text(5), text(12)]),
                                    audio_prompt_ids(counts[1:], [text(7), text(3), text(9)])])
    return dict(input_ids=ids, attention_mask=attention_mask, input_features=feats, feature_attention_mask=mask)


def free_port() -> int:
    """A port of 127.0.0.1 that nothing holds now, for a process started later (torchrun's --master_port).

    Port 0 would give one from the range the OS hands out for port 0 and for outgoing connections
    (ip_local_port_range), where the connections other tests open meanwhile (gloo's between ranks, HTTP clients) can
    take it before torchrun binds it. So the port is drawn from the 10,000 below that range, and a bind checks it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    draw = random.SystemRandom()  # not the tests' seeded generator: two test processes must not draw alike
    for _ in range(50):
        port = draw.randrange(max(1024, low - 10_000), max(1025, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port of 127.0.0.1 found below {low}")
