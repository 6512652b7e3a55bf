"""The processor's clips, each checked where it enters (Processor._check_call calls as_waveform), and the audio side
of the processor that must stay bounded however long the audio: token counts known before any feature is computed,
and log-mels computed a few 30 s windows at a time."""

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .chat_template import Waveform
from .errors import InputError
from .features import N_FRAMES, N_MELS, N_SAMPLES, SAMPLE_RATE, audio_token_count, extract_features, num_frames
from .tokenizer import AUDIO
FEATURE_BATCH = 8  # 30 s windows turned into log-mels at a time: the STFT of 8 windows takes ~40 MB
_FLOAT_DTYPES = (np.float16, np.float32, np.float64, torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_waveform(clip: object, index: int) -> Waveform:
    if isinstance(clip, (str, Path)):
        raise InputError(f"audio {index} is a path ({str(clip)!r}); the processor takes waveforms: decode it first "
                         "with qwen2audio.audio.load_audio(path), which also resamples to 16 kHz")
    if not isinstance(clip, (np.ndarray, Tensor)) or clip.ndim != 1:
        shape = tuple(clip.shape) if isinstance(clip, (np.ndarray, Tensor)) else type(clip).__name__
        raise InputError(f"audio {index} must be a mono 1-D float array or tensor at 16 kHz, got {shape}; "
                         "average the channels of a stereo clip")
    if isinstance(clip, Tensor) and clip.is_meta:
        raise InputError(f"audio {index} is a tensor on the meta device, which holds no samples")
    if clip.dtype not in _FLOAT_DTYPES:
        raise InputError(f"audio {index} must hold float samples in [-1, 1], got dtype {clip.dtype}; divide 16-bit "
                         "PCM by 32768 (qwen2audio.audio.load_audio decodes files to float32)")
    if isinstance(clip, Tensor):  # the log-mel is computed on the CPU, in float32
        clip = clip.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(torch.as_tensor(clip)).all()):
        raise InputError(f"audio {index} holds NaN or infinite samples")
    return clip


def clip_token_count(n_samples: int, long_audio: str) -> int:
    """The <|AUDIO|> tokens a clip of n_samples becomes, known before any feature is computed: one 30 s window
    (long_audio="truncate"), or one per 30 s and the rest ("chunk"; a rest too short for a token gives none)."""
    if long_audio != "chunk":
        return audio_token_count(num_frames(n_samples))
    full, rest = divmod(n_samples, N_SAMPLES)
    return full * audio_token_count(N_FRAMES) + audio_token_count(num_frames(rest))


def check_audio_fits(texts: list[str], clips: list[Waveform], long_audio: str, max_tokens: int) -> None:
    """Before the log-mel is computed (a 2-hour recording in "chunk" mode would need ~1 GB for it): each row's
    audio tokens must leave room in the model's max_tokens positions."""
    lengths = iter(len(clip) for clip in clips)
    for row, text in enumerate(texts):
        samples = [next(lengths) for _ in range(text.count(AUDIO))]
        tokens = sum(clip_token_count(n, long_audio) for n in samples)
        if tokens >= max_tokens:
            seconds = sum(samples) / SAMPLE_RATE
            raise InputError(f"the audio of prompt {row} ({seconds:.0f} s, long_audio={long_audio!r}) gives "
                             f"{tokens} audio tokens, but the model takes at most {max_tokens} positions "
                             "(max_position_embeddings) for the prompt and the reply: shorten the audio")


def windows_features(windows: list[Waveform]) -> tuple[Tensor, Tensor]:
    """extract_features over FEATURE_BATCH windows at a time, into one output: the memory of the STFT stays
    bounded however long the audio ((N, 128, 3000) float32 and (N, 3000) int32, as extract_features)."""
    features = torch.empty(len(windows), N_MELS, N_FRAMES)
    mask = torch.empty(len(windows), N_FRAMES, dtype=torch.int32)
    for start in range(0, len(windows), FEATURE_BATCH):
        stop = start + FEATURE_BATCH
        features[start:stop], mask[start:stop] = extract_features(windows[start:stop])
    return features, mask
