"""Whisper-style 128-bin log-mel frontend; matches transformers' WhisperFeatureExtractor (torch path).

Every clip is zero-padded (or cut) to 30 s before the STFT, as the reference does: the per-clip maximum and the
frames at the real/padding boundary depend on it, and the encoder's valid tokens depend on those frames.
"""

import math

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop
N_MELS = 128
CHUNK_LENGTH = 30  # seconds the encoder sees
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney scale: linear below 1 kHz, logarithmic above.
    f = np.asarray(f, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f < 1000.0, 3.0 * f / 200.0, log_part)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Slaney-normalised triangular mel filters, (n_fft // 2 + 1, n_mels) float32, computed in float64."""
    n_bins = n_fft // 2 + 1
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_bins)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2), n_mels + 2))  # (n_mels + 2,)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (fft_freqs[:, None] - lower) / (center - lower)  # (n_bins, n_mels)
    falling = (upper - fft_freqs[:, None]) / (upper - center)
    filters = np.maximum(0.0, np.minimum(rising, falling))
    filters *= 2.0 / (upper - lower)  # equal area per filter ("slaney" norm)
    return torch.from_numpy(filters).float()


_FILTERS: dict[tuple[int, str], Tensor] = {}


def _cached_filters(n_mels: int, device: torch.device) -> Tensor:
    key = (n_mels, str(device))
    if key not in _FILTERS:
        _FILTERS[key] = mel_filters(n_mels).to(device)
    return _FILTERS[key]


def num_frames(num_samples: int) -> int:
    """Valid mel frames for a clip: frame t is valid iff sample 160*t is real, capped at 30 s."""
    return min(math.ceil(num_samples / HOP_LENGTH), N_FRAMES)


def encoder_lengths(mel_frames: Tensor | int) -> tuple[Tensor | int, Tensor | int]:
    """(frames after conv2, audio tokens after the 2x average pool) for a number of valid mel frames."""
    after_conv = (mel_frames - 1) // 2 + 1  # conv2 has stride 2, padding 1, kernel 3
    tokens = (after_conv - 2) // 2 + 1  # AvgPool1d(2, 2)
    return after_conv, tokens


def audio_token_count(mel_frames: int) -> int:
    """Number of <|AUDIO|> tokens one clip becomes: 100 frames (1 s) -> 25, 3000 frames (30 s) -> 750."""
    return int(encoder_lengths(mel_frames)[1])


def pad_or_trim(waveform: Tensor, length: int = N_SAMPLES) -> Tensor:
    """Cut to `length` samples or zero-pad on the right."""
    if waveform.shape[-1] >= length:
        return waveform[..., :length]
    return torch.nn.functional.pad(waveform, (0, length - waveform.shape[-1]))


def log_mel_spectrogram(waveforms: Tensor, n_mels: int = N_MELS) -> Tensor:
    """(B, N_SAMPLES) float32 waveforms, already padded to 30 s -> (B, n_mels, N_FRAMES) log-mel."""
    window = torch.hann_window(N_FFT, device=waveforms.device)
    stft = torch.stft(waveforms, N_FFT, HOP_LENGTH, window=window, return_complex=True)  # (B, 201, 3001)
    power = stft[..., :-1].abs() ** 2  # drop the last frame, as the reference does
    mel = _cached_filters(n_mels, waveforms.device).T @ power  # (B, n_mels, 3000)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    clip_max = log_spec.amax(dim=(-2, -1), keepdim=True)  # per clip, padding included
    log_spec = torch.maximum(log_spec, clip_max - 8.0)
    return (log_spec + 4.0) / 4.0


def extract_features(waveforms: list | Tensor | np.ndarray, device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """Mono 16 kHz clips -> (input_features (B, 128, 3000) float32, feature_attention_mask (B, 3000) int32).

    `waveforms` is a list of clips (1-D arrays, tensors or lists of samples), or one clip given bare (a 1-D array
    or tensor, or a list of numbers), as transformers' feature extractor takes them. Clips longer than 30 s are cut
    to their first 30 s (the reference behaviour).
    """
    if isinstance(waveforms, (np.ndarray, Tensor)) and waveforms.ndim == 1 or \
            isinstance(waveforms, (list, tuple)) and waveforms and isinstance(waveforms[0], (int, float, np.number)):
        waveforms = [waveforms]  # one clip, given bare
    if len(waveforms) == 0:
        raise InputError("extract_features needs at least one clip")
    padded, lengths = [], []
    for i, w in enumerate(waveforms):
        try:
            w = torch.as_tensor(np.asarray(w, dtype=np.float32) if isinstance(w, (list, tuple)) else w)
        except (TypeError, ValueError):
            raise InputError(f"clip {i} is not a sequence of numbers") from None
        w = w.to(dtype=torch.float32, device=device)
        if w.ndim != 1:
            raise InputError(f"clip {i} has shape {tuple(w.shape)}; each clip must be mono and 1-D (a list of clips, "
                             "each a 1-D array of samples): average the channels of a stereo clip")
        padded.append(pad_or_trim(w))
        lengths.append(num_frames(w.shape[0]))
    features = log_mel_spectrogram(torch.stack(padded))
    frame_idx = torch.arange(N_FRAMES, device=device)
    mask = (frame_idx[None, :] < torch.tensor(lengths, device=device)[:, None]).to(torch.int32)
    return features, mask
