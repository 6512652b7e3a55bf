"""Audio in from anywhere: a path, bytes, a file://, data: or http(s):// URL, a NumPy array or a torch tensor
becomes float32 mono at 16 kHz, the only input the feature extractor takes.

WAV is read by a small parser here (no dependency). Other formats (FLAC, MP3, OGG, M4A, ...) go to the first of
soundfile, torchaudio or the ffmpeg program that is installed. Whatever goes wrong raises AudioError, with a message
that names the source ('clip.wav', <bytes>, <array>) and the problem.
"""

import base64
import binascii
import http.client
import io
import shutil
import struct
import subprocess
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import AudioError
from .features import N_SAMPLES, SAMPLE_RATE, audio_token_count, num_frames
from .resample import resample

AudioSource = str | Path | bytes | bytearray | memoryview | np.ndarray | torch.Tensor

MIN_SAMPLE_RATE = 1_000  # below this a "sample rate" is a corrupt header, not audio
MAX_SAMPLE_RATE = 1_000_000  # above the fastest real converters (768 kHz)
HTTP_TIMEOUT_S = 30
FFMPEG_TIMEOUT_S = 300

# WAV format tags (mmreg.h). WAVE_FORMAT_EXTENSIBLE stores the real tag in the first two bytes of a GUID whose
# other 14 bytes are fixed (KSDATAFORMAT_SUBTYPE_*: {0000xxxx-0000-0010-8000-00AA00389B71}, little-endian).
WAVE_FORMAT_PCM = 0x0001
WAVE_FORMAT_IEEE_FLOAT = 0x0003
WAVE_FORMAT_EXTENSIBLE = 0xFFFE
SUBFORMAT_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
TAG_NAMES = {0x0002: "Microsoft ADPCM", 0x0006: "A-law", 0x0007: "µ-law", 0x0011: "IMA ADPCM", 0x0031: "GSM 6.10",
             0x0055: "MPEG layer 3"}
SUPPORTED_BITS = {WAVE_FORMAT_PCM: (8, 16, 24, 32), WAVE_FORMAT_IEEE_FLOAT: (32, 64)}
STREAMING_SIZE = 0xFFFFFFFF  # data size written by streaming writers that cannot seek back to fix the header
RIFF_MAGICS = (b"RIFF", b"RF64", b"BW64")  # RF64/BW64: the same layout, with 64-bit sizes in a "ds64" chunk

INSTALL_HINT = "install one of: `pip install soundfile`, `pip install torchaudio`, or the ffmpeg program (on PATH)"


class UnsupportedWavEncoding(AudioError):
    """A well-formed WAV whose encoding the built-in reader does not decode (µ-law, ADPCM, 12-bit, ...)."""


# ---------------------------------------------------------------------------------------------- the WAV reader
def _parse_fmt(body: bytes, name: str) -> tuple[int, int, int, int]:
    """The "fmt " chunk -> (format tag, channels, sample rate, bits per sample), extensible format resolved."""
    if len(body) < 16:
        raise AudioError(f"{name}: the WAV 'fmt ' chunk is {len(body)} bytes, shorter than the 16 it needs")
    tag, channels, rate, _byte_rate, _block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        if len(body) < 40 or body[26:40] != SUBFORMAT_GUID_TAIL:
            raise UnsupportedWavEncoding(f"{name}: WAVE_FORMAT_EXTENSIBLE with a missing or unknown subformat GUID")
        tag = struct.unpack_from("<H", body, 24)[0]  # the subformat's own tag; `bits` is the container size
    if channels == 0:
        raise AudioError(f"{name}: the WAV header says the audio has zero channels")
    if bits not in SUPPORTED_BITS.get(tag, ()):
        kind = "PCM" if tag == WAVE_FORMAT_PCM else "float" if tag == WAVE_FORMAT_IEEE_FLOAT else None
        what = f"{bits}-bit {kind}" if kind else TAG_NAMES.get(tag, f"format tag 0x{tag:04x}")
        raise UnsupportedWavEncoding(
            f"{name}: {what} WAV is not supported by the built-in reader (it reads 8/16/24/32-bit PCM and 32/64-bit "
            "float); convert it, e.g. `ffmpeg -i in.wav -c:a pcm_s16le out.wav`")
    return tag, channels, rate, bits


def _find_chunks(data: bytes, name: str) -> tuple[tuple[int, int, int, int], memoryview]:
    """Walk the RIFF chunks -> (parsed fmt, the data chunk's bytes); LIST, fact, bext and other chunks are skipped."""
    fmt, ds64_data_size, pos = None, None, 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk_id == b"ds64" and size >= 16:
            ds64_data_size = struct.unpack_from("<Q", data, body + 8)[0] if body + 16 <= len(data) else None
        elif chunk_id == b"fmt ":
            fmt = _parse_fmt(data[body:body + size], name)
        elif chunk_id == b"data":
            if fmt is None:
                raise AudioError(f"{name}: the WAV data chunk comes before any 'fmt ' chunk")
            if size == STREAMING_SIZE and ds64_data_size is not None:
                size = ds64_data_size  # RF64: the real size lives in ds64
            present = len(data) - body
            if size > present:
                if size != STREAMING_SIZE:  # never trust a header's size: read only what is really there
                    raise AudioError(f"{name}: truncated WAV: the data chunk declares {size} bytes but the file holds "
                                     f"{present}")
                size = present  # a streaming writer's "until the end of the file"
            return fmt, memoryview(data)[body:body + size]
        pos = body + size + (size & 1)  # chunks are padded to an even size
    if pos > len(data):
        raise AudioError(f"{name}: truncated WAV: a chunk runs past the end of the file and no data chunk was found")
    raise AudioError(f"{name}: the WAV has a header but no " + ("data chunk" if fmt else "'fmt ' chunk"))


def _pcm_to_float(payload: memoryview, tag: int, bits: int, count: int) -> np.ndarray:
    """`count` little-endian samples -> float in [-1, 1): integers are divided by 2^(bits-1)."""
    if tag == WAVE_FORMAT_IEEE_FLOAT:
        return np.frombuffer(payload, dtype=f"<f{bits // 8}", count=count)
    if bits == 8:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(payload, dtype=np.uint8, count=count).astype(np.float32) - 128.0) / 128.0
    if bits == 24:  # no 3-byte dtype: assemble from bytes, the top one signed
        b = np.frombuffer(payload, dtype=np.uint8, count=3 * count).reshape(-1, 3)
        low, mid, high = b[:, 0].astype(np.int32), b[:, 1].astype(np.int32), b[:, 2].view(np.int8).astype(np.int32)
        ints = low | (mid << 8) | (high << 16)
        return ints.astype(np.float32) / np.float32(2**23)  # exact: 24-bit integers fit a float32 mantissa
    ints = np.frombuffer(payload, dtype=f"<i{bits // 8}", count=count)
    work = np.float64 if bits == 32 else np.float32  # float64 first so 32-bit values round only once
    return ints.astype(work) / work(2 ** (bits - 1))


def decode_wav(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """WAV bytes -> (mono float32 samples, sample rate). PCM 8/16/24/32-bit, float 32/64, plain or extensible,
    RIFF or RF64, any channel count (averaged). Raises AudioError (UnsupportedWavEncoding for other codecs)."""
    if len(data) < 12 or data[:4] not in RIFF_MAGICS or data[8:12] != b"WAVE":
        raise AudioError(f"{name}: not a WAV file (it starts with {bytes(data[:12])!r})")
    (tag, channels, rate, bits), payload = _find_chunks(data, name)
    frames = len(payload) // (channels * bits // 8)  # a partial frame at the end is dropped
    if frames == 0:
        raise AudioError(f"{name}: the WAV has a header but no audio data")
    with np.errstate(all="ignore"):  # huge float samples overflow to inf here; _finish reports them
        samples = _pcm_to_float(payload, tag, bits, frames * channels).reshape(frames, channels)
        mono = samples[:, 0] if channels == 1 else samples.mean(axis=1)
        return mono.astype(np.float32), rate


# ------------------------------------------------------------------------------------ optional decoders (lazy)
def _with_soundfile(data: bytes, path: Path | None) -> tuple[np.ndarray, int]:
    import soundfile

    samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (frames, channels)
    return samples.mean(axis=1), rate


def _with_torchaudio(data: bytes, path: Path | None) -> tuple[np.ndarray, int]:
    import torchaudio

    samples, rate = torchaudio.load(io.BytesIO(data))  # (channels, frames)
    return samples.float().mean(dim=0).numpy(), rate


def _with_ffmpeg(data: bytes, path: Path | None) -> tuple[np.ndarray, int]:
    program = shutil.which("ffmpeg")
    if program is None:
        raise ImportError("ffmpeg is not on PATH")
    # A real path lets ffmpeg seek (M4A keeps its index at the end); bytes go through stdin. "file:" stops a
    # name like "http:x.mp3" from being read as a protocol.
    command = [program, "-nostdin", "-loglevel", "error", "-i", f"file:{path}" if path else "pipe:0", "-vn",
               "-f", "f32le", "-ac", "1", "-ar", str(SAMPLE_RATE), "pipe:1"]
    done = subprocess.run(command, input=None if path else data, capture_output=True, timeout=FFMPEG_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.decode(errors="replace").strip()[-300:])
    return np.frombuffer(done.stdout, dtype="<f4").copy(), SAMPLE_RATE


DECODERS: tuple[tuple[str, Callable[[bytes, Path | None], tuple[np.ndarray, int]]], ...] = (
    ("soundfile", _with_soundfile), ("torchaudio", _with_torchaudio), ("ffmpeg", _with_ffmpeg))


def _decode_other(data: bytes, name: str, path: Path | None, problem: AudioError) -> tuple[np.ndarray, int]:
    """Try each installed decoder in turn; `problem` says why the built-in WAV reader could not do it."""
    tried = []
    for decoder_name, decoder in DECODERS:
        try:
            return decoder(data, path)
        except ImportError:
            continue  # not installed
        except Exception:  # a decoder's own error type for "not my format"; the next one may know it
            tried.append(decoder_name)
    if not tried:
        raise AudioError(f"{problem}; to read other formats, {INSTALL_HINT}") from None
    raise AudioError(f"{problem}, and {' / '.join(tried)} could not decode it either") from None


def _decode_bytes(data: bytes, name: str, path: Path | None = None) -> tuple[np.ndarray, int]:
    if len(data) == 0:
        raise AudioError(f"{name}: the file is empty (0 bytes)")
    if data[:4] in RIFF_MAGICS and data[8:12] == b"WAVE":
        try:
            return decode_wav(data, name)  # a broken WAV is reported as such, never handed on as "some other format"
        except UnsupportedWavEncoding as problem:  # a valid WAV in a codec an optional decoder may know
            return _decode_other(data, name, path, problem)
    return _decode_other(data, name, path, AudioError(f"{name}: not a WAV file (starts with {bytes(data[:8])!r})"))


# ------------------------------------------------------------------------------------------------- the sources
def _read_path(path: Path) -> bytes:
    name = f"'{path}'"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise AudioError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise AudioError(f"{name}: is a directory, not an audio file") from None
    except (OSError, ValueError) as error:  # permissions, a name too long or with a NUL byte, ...
        raise AudioError(f"{name}: cannot be read ({getattr(error, 'strerror', None) or error})") from None


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
            return response.read()
    except (OSError, ValueError, http.client.HTTPException) as error:  # no network, 404, timeout, bad URL
        raise AudioError(f"{url}: download failed ({getattr(error, 'reason', error)}); download the file yourself "
                         "and pass its path") from None


def _data_uri(uri: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma:
        raise AudioError("<data URI>: no ',' separates the header from the data")
    if not header.endswith(";base64"):
        return urllib.parse.unquote_to_bytes(payload)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise AudioError(f"<data URI>: bad base64 ({error})") from None


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


def _array_to_mono(array: np.ndarray, name: str) -> np.ndarray:
    """1-D, or 2-D as (channels, samples) or (samples, channels): the smaller side is taken as the channels."""
    if array.ndim not in (1, 2) or array.size == 0:
        raise AudioError(f"{name}: expected a non-empty 1-D or 2-D array of samples, got shape {tuple(array.shape)}")
    with np.errstate(all="ignore"):  # float64 beyond float32's range becomes inf; _finish reports it
        samples = _array_to_float(array, name)
        if samples.ndim == 2:
            samples = samples.mean(axis=0 if samples.shape[0] <= samples.shape[1] else 1)
    return samples


def _finish(samples: np.ndarray, rate: int, name: str) -> np.ndarray:
    """Checks common to every source, then resampling to 16 kHz."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}: a sample rate of {rate} Hz is not plausible (expected {MIN_SAMPLE_RATE} to "
                         f"{MAX_SAMPLE_RATE} Hz)")
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


def load_audio(source: AudioSource, sampling_rate: int | None = None) -> np.ndarray:
    """Audio from a path, bytes, a file://, data: (base64) or http(s):// URL, or an array/tensor -> float32 mono
    16 kHz samples. `sampling_rate` is the rate of an array or tensor (required for them); files carry their own."""
    if isinstance(source, (np.ndarray, torch.Tensor)):
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu()
            source = (source.float() if source.is_floating_point() else source).numpy()
        return _finish(_array_to_mono(source, "<array>"), _rate_argument(sampling_rate), "<array>")
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _finish(*_decode_bytes(bytes(source), "<bytes>"), "<bytes>")
    if isinstance(source, str) and source.startswith("data:"):
        return _finish(*_decode_bytes(_data_uri(source), "<data URI>"), "<data URI>")
    if isinstance(source, str) and source.startswith(("http://", "https://")):
        return _finish(*_decode_bytes(_download(source), source), source)
    if isinstance(source, str) and source.startswith("file://"):
        source = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
    if isinstance(source, (str, Path)):
        path = Path(source)
        return _finish(*_decode_bytes(_read_path(path), f"'{path}'", path), f"'{path}'")
    raise AudioError(f"cannot read audio from a {type(source).__name__}; pass a path, URL, bytes or an array")


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
