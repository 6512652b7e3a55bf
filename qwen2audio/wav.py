"""The built-in WAV reader: RIFF/RF64 bytes -> (mono float32 samples, sample rate), with no dependency.

PCM 8/16/24/32-bit and float 32/64, plain or WAVE_FORMAT_EXTENSIBLE, any channel count (averaged). Every problem is
an AudioError naming the source and what is wrong; a message never quotes the file's bytes (a server would send it
back to the client), only sizes and format fields of a file that is a WAV.
"""

import struct

import numpy as np

from .errors import AudioError

MIN_SAMPLE_RATE = 1_000  # below this a "sample rate" is a corrupt header, not audio
MAX_SAMPLE_RATE = 1_000_000  # above the fastest real converters (768 kHz)

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


class UnsupportedWavEncoding(AudioError):
    """A well-formed WAV whose encoding the built-in reader does not decode (µ-law, ADPCM, 12-bit, ...)."""


class AudioTooLong(AudioError):
    """Audio longer than the policy's max_seconds; a decoder that finds this stops, the next one is not tried."""


def is_wav(data: bytes) -> bool:
    return len(data) >= 12 and data[:4] in RIFF_MAGICS and data[8:12] == b"WAVE"


def check_rate(rate: int, name: str) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{name}: a sample rate of {rate} Hz is not plausible (expected {MIN_SAMPLE_RATE} to "
                         f"{MAX_SAMPLE_RATE} Hz)")


def check_duration(frames: int, rate: int, max_seconds: float | None, name: str) -> None:
    """Refuse audio over the policy's duration before its samples are converted (a decompression bomb stops here)."""
    if max_seconds is not None and frames > max_seconds * rate:
        raise AudioTooLong(f"{name}: the audio is longer than the {max_seconds:g} s allowed (AudioPolicy.max_seconds); "
                         "cut it, or pass a policy with a larger max_seconds")


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


def decode_wav(data: bytes, name: str = "<bytes>", max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """WAV bytes -> (mono float32 samples, sample rate). Raises AudioError (UnsupportedWavEncoding for codecs this
    reader does not know); audio longer than `max_seconds` is refused before any sample is converted."""
    if not is_wav(data):
        raise AudioError(f"{name}: not a WAV file (no RIFF/RF64 'WAVE' header)")  # security: never quote the bytes
    (tag, channels, rate, bits), payload = _find_chunks(data, name)
    frames = len(payload) // (channels * bits // 8)  # a partial frame at the end is dropped
    if frames == 0:
        raise AudioError(f"{name}: the WAV has a header but no audio data")
    check_rate(rate, name)
    check_duration(frames, rate, max_seconds, name)
    with np.errstate(all="ignore"):  # huge float samples overflow to inf here; the caller reports them
        samples = _pcm_to_float(payload, tag, bits, frames * channels).reshape(frames, channels)
        mono = samples[:, 0] if channels == 1 else samples.mean(axis=1)
        return mono.astype(np.float32), rate
