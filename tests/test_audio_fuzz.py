"""Hostile bytes: mutated, truncated and spliced WAV files must only ever raise AudioError (no struct.error,
IndexError, MemoryError, numpy ValueError, warnings turned errors, ...), and a lying header must not make the
reader allocate what it claims. Fixed seeds: every run tries the same cases. No case can hang: the inputs are a few
kB, and the in-process readers (the WAV parser, soundfile) only walk what is there; ffmpeg, a subprocess, gets a
small fuzz of its own."""

import io
import shutil
import struct
import tracemalloc
import warnings
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qwen2audio import audio
from qwen2audio.audio import AudioPolicy, decode_wav, load_audio
from qwen2audio.errors import AudioError
from test_audio import chunk, fmt_body, make_wav

sf = pytest.importorskip("soundfile")

ITERATIONS = 3000
HEADER_FIELDS = [4, 16, 20, 22, 24, 28, 32, 34, 36, 40]  # RIFF size, fmt size, tag, channels, rate, ..., data size
EXTREMES = [0, 1, 2, 3, 7, 8, 12, 24, 0x7F, 0xFF, 0xFFFE, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFF0, 0xFFFFFFFF]


def _seed_files() -> list[bytes]:
    """Small valid WAVs of every encoding and container the reader knows, plus chunk-layout variants."""
    rng = np.random.default_rng(0)
    samples = 0.3 * rng.standard_normal((700, 2))
    seeds = []
    for subtype, container in [("PCM_16", "WAV"), ("PCM_24", "WAVEX"), ("PCM_32", "WAV"), ("FLOAT", "WAV"),
                               ("DOUBLE", "RF64"), ("PCM_U8", "WAV"), ("ULAW", "WAV"), ("IMA_ADPCM", "WAV")]:
        buffer = io.BytesIO()
        sf.write(buffer, samples, 16000, subtype=subtype, format=container)
        seeds.append(buffer.getvalue())
    payload = (rng.standard_normal(800) * 3000).astype("<i2").tobytes()
    seeds.append(make_wav(payload, before=chunk(b"LIST", b"INFOodd") + chunk(b"fact", b"\0" * 4)))
    seeds.append(make_wav(payload, fmt=fmt_body(0xFFFE, 2, 22050, 16, subformat=1), data_size=0xFFFFFFFF))
    seeds.append(make_wav(payload[:801], fmt=fmt_body(1, 1, 8000, 8), after=chunk(b"LIST", b"tail")))
    return seeds


def _mutate(data: bytearray, rng: np.random.Generator) -> bytearray:
    """One random damage: flipped bytes, an extreme header field, a cut, an insertion, a deletion, a splice."""
    if len(data) <= 12:  # cut down to the magic already: grow it back a little instead
        return data + rng.bytes(rng.integers(1, 40))
    kind = rng.integers(6)
    if kind == 0:  # flip a few bytes, mostly in the headers
        for _ in range(rng.integers(1, 6)):
            data[rng.integers(12, min(len(data), 120))] = rng.integers(256)
    elif kind == 1:  # an extreme value in a 16- or 32-bit header field
        pos = int(rng.choice(HEADER_FIELDS))
        width = 4 if pos in (4, 16, 24, 28, 40) else 2
        value = int(rng.choice(EXTREMES)) & (2 ** (8 * width) - 1)
        data[pos:pos + width] = value.to_bytes(width, "little")
    elif kind == 2:  # truncate anywhere
        data = data[:rng.integers(0, len(data))]
    elif kind == 3:  # insert random bytes (misaligns every chunk after them)
        pos = rng.integers(12, len(data))
        data[pos:pos] = rng.bytes(rng.integers(1, 40))
    elif kind == 4:  # delete a run of bytes
        pos = rng.integers(12, len(data))
        del data[pos:pos + rng.integers(1, 40)]
    else:  # a chunk with a lying size
        pos = rng.integers(12, min(len(data), 80))
        data[pos:pos] = rng.choice([b"LIST", b"data", b"fmt ", b"ds64"]) + struct.pack("<I", int(rng.choice(EXTREMES)))
    return data


def test_mutated_wavs_only_raise_audio_error(monkeypatch):
    monkeypatch.setattr(audio, "DECODERS", audio.DECODERS[:1])  # soundfile for µ-law/ADPCM; no ffmpeg subprocesses
    rng = np.random.default_rng(1234)
    seeds = _seed_files()
    policies = [AudioPolicy(), AudioPolicy(max_seconds=0.03, max_bytes=4000)]  # the second: the caps' paths too
    outcomes = {"decoded": 0, "AudioError": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow warning would escape as an exception under -W error
        for case in range(ITERATIONS):
            data = bytearray(seeds[rng.integers(len(seeds))])
            for _ in range(rng.integers(1, 4)):
                data = _mutate(data, rng)
            try:
                waveform = load_audio(bytes(data), policy=policies[case % 4 == 3])
            except AudioError:
                outcomes["AudioError"] += 1
                continue
            assert waveform.dtype == np.float32 and waveform.ndim == 1 and len(waveform) > 320
            assert np.isfinite(waveform).all()
            outcomes["decoded"] += 1
    assert outcomes["decoded"] > 100 and outcomes["AudioError"] > 1000, outcomes  # the fuzzer exercises both paths


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(body=st.binary(max_size=300), magic=st.sampled_from([b"RIFF", b"RF64"]))
def test_any_bytes_after_a_wave_header_only_raise_audio_error(body: bytes, magic: bytes):
    try:
        samples, rate = decode_wav(magic + b"\xff\xff\xff\xffWAVE" + body)
    except AudioError:
        return
    assert samples.dtype == np.float32 and samples.ndim == 1 and len(samples) > 0


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.binary(max_size=200))
def test_random_bytes_through_load_audio_only_raise_audio_error(data: bytes):
    with mock.patch.object(audio, "DECODERS", audio.DECODERS[:1]), pytest.raises(AudioError):
        load_audio(data)  # a real decoder could accept a few bytes only if they formed > 20 ms of audio


def test_mutated_files_through_ffmpeg_only_raise_audio_error(monkeypatch):
    if shutil.which("ffmpeg") is None:
        pytest.skip("the ffmpeg program is not on PATH (Debian: apt-get install ffmpeg)")
    monkeypatch.setattr(audio, "DECODERS", tuple(d for d in audio.DECODERS if d[0] == "ffmpeg"))
    rng = np.random.default_rng(99)
    buffer = io.BytesIO()
    sf.write(buffer, 0.3 * rng.standard_normal((1600, 2)), 16000, subtype="PCM_16", format="FLAC")
    seeds = [buffer.getvalue(), _seed_files()[6]]  # FLAC, and a µ-law WAV (the built-in reader hands it on)
    decoded = 0
    for case in range(24):  # a subprocess each: a small fuzz, for the decoder path and its output parsing
        data = bytearray(seeds[case % 2])
        for _ in range(rng.integers(1, 4)):
            data = _mutate(data, rng)
        try:
            waveform = load_audio(bytes(data), policy=AudioPolicy.strict())
        except AudioError:
            continue
        assert waveform.dtype == np.float32 and waveform.ndim == 1 and np.isfinite(waveform).all()
        decoded += 1
    assert 0 < decoded < 24  # both outcomes were reached


@pytest.mark.parametrize("fmt", [fmt_body(1, 65535, 16000, 32), fmt_body(3, 1, 16000, 64), fmt_body(1, 2, 16000, 24)])
def test_a_lying_header_allocates_only_what_is_present(fmt: bytes):
    data = make_wav(b"\0" * 4000, fmt=fmt, data_size=0x7FFFFFF0)
    streaming = make_wav(b"\0" * 4000, fmt=fmt, data_size=0xFFFFFFFF)
    tracemalloc.start()
    try:
        with pytest.raises(AudioError, match="truncated"):
            decode_wav(data)
        try:
            decode_wav(streaming)
        except AudioError as error:
            assert "no audio data" in str(error)  # 65535 channels x 4 bytes: not one whole frame in 4000 bytes
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # a few copies of the 4 kB present, never the 2 GB claimed
