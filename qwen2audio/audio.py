"""Audio in from anywhere: a path, bytes, a file://, data: or http(s):// URL, a NumPy array or a torch tensor
becomes float32 mono at 16 kHz, the only input the feature extractor takes.

WAV is read by a small parser (wav.py, no dependency). Other formats (FLAC, MP3, OGG, M4A, ...) go to the first of
soundfile, torchaudio or the ffmpeg program that is installed. What may be read, and how much, is the caller's
`AudioPolicy` (audio_sources.py). Whatever goes wrong raises AudioError, with a message that names the source
('clip.wav', <bytes>, <array>) and the problem, never the file's contents.
"""

import io
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .audio_sources import (AudioPolicy, check_policy, check_size, download, file_url_path, read_data_uri,
                            read_local_file)
from .errors import AudioError
from .features import N_SAMPLES, SAMPLE_RATE, audio_token_count, num_frames
from .resample import resample
from .wav import AudioTooLong, UnsupportedWavEncoding, check_duration, check_rate, decode_wav, is_wav

__all__ = ["AudioPolicy", "AudioTooLong", "UnsupportedWavEncoding", "decode_wav", "load_audio", "split_long_audio",
           "truncate_long_audio"]

AudioSource = str | Path | bytes | bytearray | memoryview | np.ndarray | torch.Tensor
Decoder = Callable[[bytes, Path | None, str, float | None], tuple[np.ndarray, int]]

DEFAULT_POLICY = AudioPolicy()
FFMPEG_TIMEOUT_S = 300
INSTALL_HINT = "install one of: `pip install soundfile`, `pip install torchaudio`, or the ffmpeg program (on PATH)"
URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# ------------------------------------------------------------------------------------ optional decoders (lazy)
def _with_soundfile(data: bytes, path: Path | None, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import soundfile

    with soundfile.SoundFile(io.BytesIO(data)) as file:
        check_duration(file.frames, file.samplerate, max_seconds, name)  # from the header, before decoding
        samples = file.read(dtype="float32", always_2d=True)  # (frames, channels)
    return samples.mean(axis=1), file.samplerate


def _with_torchaudio(data: bytes, path: Path | None, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import torchaudio

    samples, rate = torchaudio.load(io.BytesIO(data))  # (channels, frames); its API has no frame count beforehand,
    check_duration(samples.shape[1], rate, max_seconds, name)  # so the duration is checked after decoding
    return samples.float().mean(dim=0).numpy(), rate


def _with_ffmpeg(data: bytes, path: Path | None, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    program = shutil.which("ffmpeg")
    if program is None:
        raise ImportError("ffmpeg is not on PATH")
    # A real path lets ffmpeg seek (M4A keeps its index at the end); bytes go through stdin. security: "file:" stops
    # a name like "http:x.mp3" from being read as a protocol, and the protocol whitelist stops a playlist inside the
    # input (HLS, concat) from making ffmpeg open any other file or URL.
    source = ["-protocol_whitelist", "file", "-i", f"file:{path}"] if path else \
        ["-protocol_whitelist", "pipe", "-i", "pipe:0"]
    # All channels at the native rate, as float WAV: the channels are averaged and the rate converted here, as for
    # every other reader (ffmpeg's own `-ac 1` sums stereo scaled by 1/sqrt(2), 1.414x the mean).
    limit = ["-t", f"{max_seconds + 1:.3f}"] if max_seconds is not None else []  # stop decoding past the limit
    command = [program, "-nostdin", "-hide_banner", "-loglevel", "error", *source, "-map", "0:a:0",
               "-c:a", "pcm_f32le", *limit, "-f", "wav", "pipe:1"]
    done = subprocess.run(command, input=None if path else data, capture_output=True, timeout=FFMPEG_TIMEOUT_S)
    if done.returncode != 0:  # security: ffmpeg's stderr can quote the input (playlist entries): never pass it on
        raise RuntimeError(f"ffmpeg exited with status {done.returncode}")
    try:
        return decode_wav(done.stdout, name, max_seconds)
    except AudioTooLong:
        raise
    except AudioError:
        raise RuntimeError("ffmpeg gave no audio") from None


DECODERS: tuple[tuple[str, Decoder], ...] = (
    ("soundfile", _with_soundfile), ("torchaudio", _with_torchaudio), ("ffmpeg", _with_ffmpeg))


def _decode_other(data: bytes, name: str, path: Path | None, max_seconds: float | None,
                  problem: AudioError) -> tuple[np.ndarray, int]:
    """Try each installed decoder in turn; `problem` says why the built-in WAV reader could not do it."""
    tried = []
    for decoder_name, decoder in DECODERS:
        try:
            return decoder(data, path, name, max_seconds)
        except ImportError:
            continue  # not installed
        except AudioTooLong:
            raise
        except Exception:  # "not my format", in the decoder's own words; security: they may quote the input, so
            tried.append(decoder_name)  # only the decoder's name is kept
    if not tried:
        raise AudioError(f"{problem}; to read other formats, {INSTALL_HINT}") from None
    raise AudioError(f"{problem}, and no installed decoder could read it (tried {' / '.join(tried)})") from None


def _decode_bytes(data: bytes, name: str, path: Path | None, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if len(data) == 0:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    if is_wav(data):
        try:
            return decode_wav(data, name, max_seconds)  # a broken WAV is reported as such, never handed on
        except UnsupportedWavEncoding as problem:  # a valid WAV in a codec an optional decoder may know
            return _decode_other(data, name, path, max_seconds, problem)
    return _decode_other(data, name, path, max_seconds, AudioError(f"{name}: not a WAV file"))


# ------------------------------------------------------------------------------------------------- the sources
def _read_source(source: str | Path, policy: AudioPolicy) -> tuple[bytes, str, Path | None]:
    """A path or URL -> (its bytes, its name in messages, the local path if it is one), as the policy allows."""
    if isinstance(source, str) and source.startswith("data:"):
        return read_data_uri(source, policy), "<data URI>", None
    match = URL_SCHEME.match(source) if isinstance(source, str) else None
    scheme = match.group(1).lower() if match else None
    if scheme in ("http", "https"):
        return download(source, policy), source, None
    if scheme == "file":
        source = file_url_path(source, policy)
    elif scheme is not None:
        raise AudioError(f"{source}: {scheme}:// URLs are not read; pass a path, an http(s):// or data: URL, or bytes")
    path = Path(source)
    return read_local_file(path, policy), f"'{path}'", path


def _array_to_float(array: np.ndarray, name: str) -> np.ndarray:
    """Any real array -> float32; integers scaled like PCM (int16 / 2^15, uint8 (x - 128) / 128, ...)."""
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind == "i":
        return (array.astype(np.float64) / 2.0 ** (8 * array.dtype.itemsize - 1)).astype(np.float32)
    if array.dtype.kind == "u":
        half = 2.0 ** (8 * array.dtype.itemsize - 1)
        return ((array.astype(np.float64) - half) / half).astype(np.float32)
    raise AudioError(f"{name}: samples of dtype {array.dtype} are not audio; pass floats or integer PCM")


def _array_to_mono(array: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    """1-D, or 2-D as (channels, samples) or (samples, channels): the smaller side is taken as the channels."""
    if isinstance(array, torch.Tensor):
        if array.is_meta or array.layout != torch.strided:
            raise AudioError(f"{name}: a {'meta' if array.is_meta else 'sparse'} tensor holds no samples to read")
        array = array.detach().cpu()
        array = (array.float() if array.is_floating_point() else array).numpy()
    if array.ndim not in (1, 2) or array.size == 0:
        raise AudioError(f"{name}: expected a non-empty 1-D or 2-D array of samples, got shape {tuple(array.shape)}")
    with np.errstate(all="ignore"):  # float64 beyond float32's range becomes inf; _finish reports it
        samples = _array_to_float(array, name)
        if samples.ndim == 2:
            samples = samples.mean(axis=0 if samples.shape[0] <= samples.shape[1] else 1)
    return samples


def _finish(samples: np.ndarray, rate: int, name: str, policy: AudioPolicy) -> np.ndarray:
    """Checks common to every source, then resampling to 16 kHz."""
    check_rate(rate, name)
    check_duration(len(samples), rate, policy.max_seconds, name)
    waveform = resample(torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32)), rate, SAMPLE_RATE).numpy()
    if not np.isfinite(waveform).all():  # NaN and inf survive resampling, so one check after it covers both
        raise AudioError(f"{name}: the audio contains NaN or infinite samples")
    if audio_token_count(num_frames(len(waveform))) == 0:  # <= 320 samples at 16 kHz: fewer than 3 mel frames
        raise AudioError(f"{name}: the audio is too short ({len(waveform) / SAMPLE_RATE * 1000:.1f} ms); it must be "
                         "longer than 20 ms to give even one audio token")
    return waveform


def _rate_argument(sampling_rate: int | None) -> int:
    if sampling_rate is None:
        raise AudioError("<array>: an array carries no sample rate; pass sampling_rate=... (e.g. 16000)")
    if not isinstance(sampling_rate, (int, float, np.integer, np.floating)) or not float(sampling_rate).is_integer():
        raise AudioError(f"<array>: sampling_rate must be a whole number of Hz, got {sampling_rate!r}")
    return int(sampling_rate)


def load_audio(source: AudioSource, sampling_rate: int | None = None, *,
               policy: AudioPolicy = DEFAULT_POLICY) -> np.ndarray:
    """Audio from a path, bytes, a file://, data: (base64) or http(s):// URL, or an array/tensor -> float32 mono
    16 kHz samples. `sampling_rate` is the rate of an array or tensor (required for them); files carry their own.
    `policy` says which sources may be read and how much (AudioPolicy(): local use; AudioPolicy.strict(): servers)."""
    policy = check_policy(policy)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _finish(_array_to_mono(source, "<array>"), _rate_argument(sampling_rate), "<array>", policy)
    if isinstance(source, (bytes, bytearray, memoryview)):
        check_size(memoryview(source).nbytes, "<bytes>", policy)
        data, name, path = bytes(source), "<bytes>", None
    elif isinstance(source, (str, Path)):
        data, name, path = _read_source(source, policy)
    else:
        raise AudioError(f"cannot read audio from a {type(source).__name__}; pass a path, URL, bytes or an array")
    return _finish(*_decode_bytes(data, name, path, policy.max_seconds), name, policy)


# ------------------------------------------------------------------------------------------------- long audio
def split_long_audio(waveform: np.ndarray, max_seconds: float = 30.0) -> list[np.ndarray]:
    """Cut a 16 kHz waveform into consecutive windows of `max_seconds` (at most 30 s, what the encoder sees); the
    last window may be shorter. A last window too short to give even one audio token (<= 320 samples, 20 ms) is
    dropped rather than merged, so every window can be encoded."""
    window = round(max_seconds * SAMPLE_RATE)
    if not 0 < window <= N_SAMPLES:
        raise AudioError(f"max_seconds must be in (0, {N_SAMPLES // SAMPLE_RATE}], got {max_seconds}")
    pieces = [waveform[start:start + window] for start in range(0, len(waveform), window)]
    if pieces and audio_token_count(num_frames(len(pieces[-1]))) == 0:
        pieces.pop()
    return pieces


def truncate_long_audio(waveform: np.ndarray, source_name: str) -> np.ndarray:
    """Keep the first 30 s (what transformers does, silently) and warn how much was dropped."""
    if len(waveform) <= N_SAMPLES:
        return waveform
    dropped = (len(waveform) - N_SAMPLES) / SAMPLE_RATE
    warnings.warn(f"{source_name} is {len(waveform) / SAMPLE_RATE:.1f} s long; only its first 30 s are used and "
                  f"{dropped:.1f} s are dropped. Pass long_audio=\"chunk\" to keep them as further 30 s pieces.",
                  UserWarning, stacklevel=2)
    return waveform[:N_SAMPLES]
