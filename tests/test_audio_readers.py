"""Every reader gives the same samples for the same content (issue 19): the built-in WAV reader, soundfile,
torchaudio and the ffmpeg program. Stereo and 5.1 are averaged over the channels by each (ffmpeg's own `-ac 1` would
sum stereo scaled by 1/sqrt(2), 1.414x louder), and other rates go through the same resampler."""

import importlib.util
import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from qwen2audio import audio
from qwen2audio.audio import load_audio

sf = pytest.importorskip("soundfile")

READERS = ["soundfile", "torchaudio", "ffmpeg"]


def skip_if_absent(reader: str) -> None:
    if reader == "ffmpeg" and shutil.which("ffmpeg") is None:
        pytest.skip("the ffmpeg program is not on PATH (Debian: apt-get install ffmpeg)")
    if reader != "ffmpeg" and importlib.util.find_spec(reader) is None:
        pytest.skip(f"{reader} is not installed (an optional decoder; `pip install {reader}`)")


def pcm(channels: int, rate: int, seconds: float = 0.5) -> np.ndarray:
    """(frames, channels) int16 with different content in every channel, the extremes included."""
    rng = np.random.default_rng(channels)
    t = np.arange(int(seconds * rate)) / rate
    waves = [np.sin(2 * np.pi * (200 + 150 * c) * t + c) * (0.3 + 0.1 * c) for c in range(channels)]
    ints = np.round(np.stack(waves, axis=1) * 32767 + rng.integers(-50, 50, (t.size, channels))).clip(-32768, 32767)
    ints[:2] = [[-32768] * channels, [32767] * channels]
    return ints.astype(np.int16)


def encoded(ints: np.ndarray, rate: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, ints, rate, subtype="PCM_16", format=fmt)  # FLAC is lossless: the same integers come back
    return buffer.getvalue()


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("channels, rate", [(2, 16000), (6, 16000), (2, 44100)])
def test_every_reader_gives_the_built_in_readers_samples(reader: str, channels: int, rate: int, tmp_path: Path,
                                                         monkeypatch):
    skip_if_absent(reader)
    ints = pcm(channels, rate)
    reference = load_audio(encoded(ints, rate, "WAV"))  # the built-in reader: mean of the channels, then 16 kHz
    expected_mono = (ints.astype(np.float64) / 32768).mean(axis=1)  # the math, independent of any reader
    if rate == 16000:
        np.testing.assert_allclose(reference, expected_mono, rtol=0, atol=2.0 ** -24)
    flac = encoded(ints, rate, "FLAC")
    path = tmp_path / "clip.flac"
    path.write_bytes(flac)
    monkeypatch.setattr(audio, "DECODERS", tuple(d for d in audio.DECODERS if d[0] == reader))
    for source in (flac, path):  # bytes (ffmpeg: through stdin) and a path (ffmpeg: reads the file)
        np.testing.assert_array_equal(load_audio(source), reference, err_msg=f"{reader}, {type(source).__name__}")


def test_stereo_through_ffmpeg_is_not_louder():
    # The reported bug, stated directly: a full-scale stereo tone, identical in both channels, stays at full scale.
    skip_if_absent("ffmpeg")
    tone = np.round(np.sin(2 * np.pi * 440 * np.arange(16000) / 16000) * 32767).astype(np.int16)
    decoded, _ = audio._with_ffmpeg(encoded(np.stack([tone, tone], axis=1), 16000, "FLAC"), None, "<bytes>", None)
    np.testing.assert_array_equal(decoded, tone / np.float32(32768))
    assert np.abs(decoded).max() <= 1.0
