"""Audio loading: WAV files written by independent writers (the stdlib `wave` module, soundfile, bytes packed by
hand) must read back to the samples that went in; every source kind works; every bad input is an AudioError that
names the file and the problem; long audio is split or truncated as documented."""

import base64
import http.client
import http.server
import io
import re
import socket
import struct
import sys
import threading
import warnings
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2audio import audio
from qwen2audio.audio import decode_wav, load_audio, split_long_audio, truncate_long_audio
from qwen2audio.errors import AudioError
from qwen2audio.features import N_SAMPLES, audio_token_count, extract_features, num_frames

sf = pytest.importorskip("soundfile")

SR = 16000
GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")


# ---------------------------------------------------------------------------------------------------- builders
def chunk(chunk_id: bytes, body: bytes, declared: int | None = None) -> bytes:
    """One RIFF chunk, padded to an even size; `declared` overrides the size field (for lying headers)."""
    size = len(body) if declared is None else declared
    return chunk_id + struct.pack("<I", size) + body + (b"\0" if len(body) % 2 else b"")


def fmt_body(tag: int = 1, channels: int = 1, rate: int = SR, bits: int = 16, subformat: int | None = None) -> bytes:
    block = channels * max(1, bits // 8)
    body = struct.pack("<HHIIHH", tag, channels, rate, (rate * block) & 0xFFFFFFFF, block & 0xFFFF, bits)
    if subformat is not None:  # WAVE_FORMAT_EXTENSIBLE: cbSize, valid bits, channel mask, subformat GUID
        body += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", subformat) + GUID_TAIL
    return body


def make_wav(payload: bytes, *, fmt: bytes | None = None, before: bytes = b"", after: bytes = b"",
             data_size: int | None = None, magic: bytes = b"RIFF") -> bytes:
    """A WAV file from its parts: fmt chunk, optional chunks before/after the data chunk, a chosen data size."""
    body = b"WAVE" + chunk(b"fmt ", fmt if fmt is not None else fmt_body()) + before
    body += chunk(b"data", payload, data_size) + after
    return magic + struct.pack("<I", len(body)) + body


def stdlib_wav(ints: np.ndarray, width: int, rate: int = SR) -> bytes:
    """Write frames (frames, channels) of integers with the stdlib `wave` module (an independent writer)."""
    frames = ints.reshape(len(ints), -1)
    if width == 1:
        raw = (frames + 128).astype(np.uint8).tobytes()  # 8-bit WAV is unsigned
    elif width == 3:
        raw = b"".join(int(v).to_bytes(3, "little", signed=True) for v in frames.reshape(-1))
    else:
        raw = frames.astype(f"<i{width}").tobytes()
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(frames.shape[1])
        writer.setsampwidth(width)
        writer.setframerate(rate)
        writer.writeframes(raw)
    return buffer.getvalue()


def random_ints(frames: int, channels: int, bits: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 2 ** (bits - 1)
    ints = rng.integers(-top, top, size=(frames, channels), dtype=np.int64)
    ints[:2] = [[-top] * channels, [top - 1] * channels]  # the extremes must map to -1 and 1 - 1 LSB
    return ints


def soundfile_wav(samples: np.ndarray, subtype: str, fmt: str = "WAV", rate: int = SR) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, subtype=subtype, format=fmt)
    return buffer.getvalue()


def tone_mix(seconds: float = 0.5, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    tones = [0.4 * np.sin(2 * np.pi * (220 + 110 * c) * t) + 0.05 * rng.standard_normal(t.size)
             for c in range(channels)]
    return np.stack(tones, axis=1).squeeze(1) if channels == 1 else np.stack(tones, axis=1)


# -------------------------------------------------------------------------------------- WAV: independent writers
@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2])
def test_stdlib_wave_pcm_reads_back_exactly(width: int, channels: int):
    bits = 8 * width
    ints = random_ints(1000, channels, bits, seed=width)
    samples, rate = decode_wav(stdlib_wav(ints, width))
    expected = (ints / 2.0 ** (bits - 1)).mean(axis=1)  # scale by 2^(bits-1), then average the channels
    assert rate == SR and samples.dtype == np.float32
    np.testing.assert_allclose(samples, expected, rtol=0, atol=2.0 ** -24)  # float32 rounding only
    if channels == 1 and bits <= 24:  # these are exact in float32
        np.testing.assert_array_equal(samples, expected.astype(np.float32))
    assert samples[0] == -1.0 and samples[1] == np.float32(1 - 2.0 ** -(bits - 1))


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE", "PCM_U8"])
@pytest.mark.parametrize("container", ["WAV", "WAVEX", "RF64"])
def test_soundfile_written_wavs_match_soundfile_read(subtype: str, container: str):
    data = soundfile_wav(tone_mix(0.25, channels=2), subtype, container)
    expected = sf.read(io.BytesIO(data), dtype="float64")[0].mean(axis=1)
    samples, rate = decode_wav(data)
    assert rate == SR
    np.testing.assert_allclose(samples, expected, rtol=0, atol=2e-7)  # below 1 LSB of every integer format
    np.testing.assert_array_equal(load_audio(data), samples)  # 16 kHz: no resampling on the way


def test_many_channels_are_averaged():
    data = soundfile_wav(tone_mix(0.1, channels=6), "PCM_16", "WAVEX")
    expected = sf.read(io.BytesIO(data), dtype="float64")[0].mean(axis=1)
    np.testing.assert_allclose(decode_wav(data)[0], expected, atol=2e-7)


def test_extensible_float_by_hand():
    values = np.array([0.5, -0.25, 1.5, -2.0] * 100, dtype="<f4")
    data = make_wav(values.tobytes(), fmt=fmt_body(0xFFFE, 1, SR, 32, subformat=3))
    np.testing.assert_array_equal(decode_wav(data)[0], values)  # float WAV is not clipped


def test_odd_chunks_padding_and_extra_chunks_are_skipped():
    payload = bytes(range(1, 256)) * 3  # 765 bytes: an odd data size, 8-bit mono
    odd_list = chunk(b"LIST", b"INFOISFT\x05\x00\x00\x00abcde")  # odd-sized body, padded
    fact = chunk(b"fact", struct.pack("<I", len(payload)))
    data = make_wav(payload, fmt=fmt_body(1, 1, SR, 8), before=odd_list + fact, after=chunk(b"LIST", b"xyz"))
    expected = (np.frombuffer(payload, np.uint8).astype(np.float32) - 128) / 128
    np.testing.assert_array_equal(decode_wav(data)[0], expected)


def test_streaming_data_size_marker_reads_what_is_there():
    payload = (np.arange(800, dtype="<i2") * 7).tobytes()
    data = make_wav(payload, data_size=0xFFFFFFFF)
    np.testing.assert_array_equal(decode_wav(data)[0], np.arange(800) * 7 / 32768)


def test_partial_last_frame_is_dropped():
    payload = np.arange(800, dtype="<i2").tobytes() + b"\x01"  # stereo 16-bit, plus one stray byte
    assert decode_wav(make_wav(payload, fmt=fmt_body(1, 2, SR, 16)))[0].shape == (400,)


# ------------------------------------------------------------------------------------ features and other formats
def test_features_match_whisper_feature_extractor(tmp_path: Path):
    from transformers import WhisperFeatureExtractor

    ints = (tone_mix(3.0) * 32767).astype(np.int16)
    path = tmp_path / "clip.wav"
    path.write_bytes(stdlib_wav(ints.astype(np.int64), 2))
    waveform = load_audio(path)
    samples = ints.astype(np.float32) / 32768
    np.testing.assert_array_equal(waveform, samples)
    reference = WhisperFeatureExtractor(feature_size=128)(samples, sampling_rate=16000, return_attention_mask=True,
                                                          padding="max_length", return_tensors="pt")
    features, mask = extract_features([waveform])
    assert torch.equal(mask, reference["attention_mask"].to(mask.dtype))
    torch.testing.assert_close(features, reference["input_features"], rtol=0, atol=1e-6)


def test_flac_through_an_optional_decoder(tmp_path: Path):
    ints = (tone_mix(1.0, channels=2) * 32767).astype(np.int16)
    path = tmp_path / "clip.flac"
    sf.write(path, ints, SR, subtype="PCM_16", format="FLAC")
    expected = (ints.astype(np.float64) / 32768).mean(axis=1)
    np.testing.assert_allclose(load_audio(path), expected, rtol=0, atol=2.0 ** -15)  # lossless: within 1 LSB


def test_mp3_through_an_optional_decoder(tmp_path: Path):
    if "MP3" not in sf.available_formats():
        pytest.skip(f"libsndfile {sf.__libsndfile_version__} has no MP3 support (needs >= 1.1)")
    t = np.arange(2 * SR) / SR
    source = 0.5 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 1234 * t)
    path = tmp_path / "clip.mp3"
    sf.write(path, source, SR, format="MP3")
    decoded = load_audio(str(path))
    n = min(len(decoded), len(source))
    assert abs(len(decoded) - len(source)) < SR // 10
    assert np.corrcoef(decoded[:n], source[:n])[0, 1] > 0.95  # lossy: the waveform, not the bits


def test_flac_at_44k_is_resampled(tmp_path: Path):
    path = tmp_path / "clip.flac"
    sf.write(path, np.sin(2 * np.pi * 1000 * np.arange(44100) / 44100), 44100, format="FLAC")
    waveform = load_audio(path)
    reference = np.sin(2 * np.pi * 1000 * np.arange(SR) / SR)
    assert waveform.shape == (SR,) and waveform.dtype == np.float32
    np.testing.assert_allclose(waveform[800:-800], reference[800:-800], atol=1e-3)


def test_mulaw_wav_goes_to_soundfile_or_names_the_encoding(monkeypatch):
    data = soundfile_wav(tone_mix(0.25), "ULAW")
    expected = sf.read(io.BytesIO(data), dtype="float32")[0]
    np.testing.assert_array_equal(load_audio(data), expected)
    monkeypatch.setattr(audio, "DECODERS", ())
    with pytest.raises(AudioError, match=r"<bytes>: µ-law WAV is not supported.*pip install soundfile"):
        load_audio(data)


def test_ffmpeg_is_asked_for_every_channel_as_float_wav(tmp_path: Path, monkeypatch):
    # A stand-in ffmpeg that records its arguments and "decodes" to a known stereo float WAV on stdout, written by
    # the stdlib-free writer of make_wav: the channels must come back averaged by us, at the rate ffmpeg reports.
    left, right = np.linspace(-0.5, 0.5, 1000, dtype="<f4"), np.linspace(0.25, -0.25, 1000, dtype="<f4")
    output = make_wav(np.stack([left, right], axis=1).tobytes(), fmt=fmt_body(3, 2, 22050, 32))
    fake = tmp_path / "bin" / "ffmpeg"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport sys\n"
                    "open(sys.argv[0] + '.args', 'w').write(' '.join(sys.argv[1:]))\n"
                    f"sys.stdout.buffer.write({output!r})\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    monkeypatch.setattr(audio, "DECODERS", audio.DECODERS[2:])
    assert audio.DECODERS[0][0] == "ffmpeg"
    path = _wav_file(tmp_path, "song.m4a", b"\0\0\0\x20ftypM4A " + b"\0" * 100)
    expected = (left + right) / 2  # exact in float32
    resampled = audio.resample(torch.from_numpy(expected), 22050, SR).numpy()
    np.testing.assert_array_equal(load_audio(path, policy=audio.AudioPolicy(max_seconds=60)), resampled)
    assert Path(str(fake) + ".args").read_text().split() == [
        "-nostdin", "-hide_banner", "-loglevel", "error", "-protocol_whitelist", "file", "-i", f"file:{path}",
        "-map", "0:a:0", "-c:a", "pcm_f32le", "-t", "61.000", "-f", "wav", "pipe:1"]
    load_audio(path.read_bytes(), policy=audio.AudioPolicy(max_seconds=None))  # bytes: through stdin, no limit
    assert Path(str(fake) + ".args").read_text().split() == [
        "-nostdin", "-hide_banner", "-loglevel", "error", "-protocol_whitelist", "pipe", "-i", "pipe:0",
        "-map", "0:a:0", "-c:a", "pcm_f32le", "-f", "wav", "pipe:1"]


def test_a_missing_decoder_is_skipped_and_a_failing_one_reported(monkeypatch):
    def not_installed(*args):
        raise ImportError("No module named 'soundfile'")

    def fails(*args):
        raise RuntimeError("Format not recognised")

    monkeypatch.setattr(audio, "DECODERS", (("soundfile", not_installed), ("ffmpeg", fails)))
    with pytest.raises(AudioError, match=r"^<bytes>: not a WAV file, and no installed decoder could read it "
                                         r"\(tried ffmpeg\)$"):
        load_audio(b"fLaC" + b"\0" * 100)
    monkeypatch.setattr(audio, "DECODERS", (("soundfile", not_installed),))
    with pytest.raises(AudioError, match=r"install one of: `pip install soundfile`, `pip install torchaudio`, or the"):
        load_audio(b"fLaC" + b"\0" * 100)


# --------------------------------------------------------------------------------------------- the source kinds
def test_every_source_kind_gives_the_same_samples(tmp_path: Path):
    data = soundfile_wav(tone_mix(0.5), "PCM_16")
    expected = decode_wav(data)[0]
    path = tmp_path / "a clip.wav"
    path.write_bytes(data)
    sources = [data, bytearray(data), memoryview(data), path, str(path), path.as_uri(),
               "data:audio/wav;base64," + base64.b64encode(data).decode()]
    for source in sources:
        np.testing.assert_array_equal(load_audio(source), expected, err_msg=type(source).__name__)


def test_http_download_from_a_local_server(tmp_path: Path):
    data = soundfile_wav(tone_mix(0.5), "PCM_16")
    (tmp_path / "clip.wav").write_bytes(data)
    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        np.testing.assert_array_equal(load_audio(f"{url}/clip.wav"), decode_wav(data)[0])
        with pytest.raises(AudioError, match=r"/missing.wav: download failed.*pass its path"):
            load_audio(f"{url}/missing.wav")
    finally:
        server.shutdown()
        server.server_close()


def test_no_network_says_download_it_yourself(monkeypatch):
    def offline(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(http.client.HTTPConnection, "connect", offline)
    with pytest.raises(AudioError, match=r"https://example.com/a.wav: download failed .*name resolution.*download the "
                                         r"file yourself and pass its path"):
        load_audio("https://example.com/a.wav")


def test_arrays_and_tensors():
    mono = tone_mix(0.5).astype(np.float32)
    np.testing.assert_array_equal(load_audio(mono, sampling_rate=SR), mono)
    stereo = np.stack([mono, -mono + 0.5])
    np.testing.assert_allclose(load_audio(stereo, sampling_rate=SR), stereo.mean(axis=0), atol=1e-7)
    np.testing.assert_allclose(load_audio(stereo.T, sampling_rate=SR), stereo.mean(axis=0), atol=1e-7)
    ints = (mono * 32767).astype(np.int16)
    np.testing.assert_array_equal(load_audio(ints, sampling_rate=SR), ints / np.float32(32768))
    np.testing.assert_array_equal(load_audio(np.array([0, 128, 255] * 200, np.uint8), sampling_rate=SR)[:3],
                                  [-1.0, 0.0, 127 / 128])
    np.testing.assert_array_equal(load_audio(torch.from_numpy(mono), sampling_rate=SR), mono)
    torch_ints = torch.from_numpy(ints)
    np.testing.assert_array_equal(load_audio(torch_ints, sampling_rate=np.int64(SR)), ints / np.float32(32768))
    half = torch.from_numpy(mono).bfloat16()
    np.testing.assert_array_equal(load_audio(half, sampling_rate=SR), half.float().numpy())
    assert load_audio(np.zeros(44100), sampling_rate=44100).shape == (SR,)


# -------------------------------------------------------------------------------------------------- bad input
def _wav_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


ONE_SECOND = np.zeros(SR, "<i2").tobytes()
BAD_FILES = {  # name: (file bytes, what the message must say)
    "empty.wav": (b"", r"empty \(0 bytes\)"),
    "header_only.wav": (make_wav(b"")[:-8], r"header but no data chunk"),
    "no_samples.wav": (make_wav(b""), r"header but no audio data"),
    "truncated.wav": (make_wav(ONE_SECOND, data_size=64000), r"truncated WAV.*declares 64000 bytes.*holds 32000"),
    "huge_claim.wav": (make_wav(b"\0" * 100, data_size=0x7FFFFFF0), r"truncated WAV.*declares 2147483632 bytes"),
    "huge_list.wav": (make_wav(ONE_SECOND, before=chunk(b"LIST", b"ab", 0x7FFFFFF0)), r"truncated WAV.*past the end"),
    "no_fmt.wav": (b"RIFF\0\0\0\0WAVE" + chunk(b"data", ONE_SECOND), r"data chunk comes before any 'fmt '"),
    "alaw.wav": (make_wav(ONE_SECOND, fmt=fmt_body(6, 1, SR, 8)), r"A-law WAV is not supported"),
    "twelve_bit.wav": (make_wav(ONE_SECOND, fmt=fmt_body(1, 1, SR, 12)), r"12-bit PCM WAV is not supported"),
    "odd_guid.wav": (make_wav(ONE_SECOND, fmt=fmt_body(0xFFFE, 1, SR, 16) + b"\0" * 24), r"unknown subformat GUID"),
    "short_fmt.wav": (make_wav(ONE_SECOND, fmt=b"\1\0\1\0"), r"'fmt ' chunk is 4 bytes"),
    "zero_channels.wav": (make_wav(ONE_SECOND, fmt=fmt_body(1, 0, SR, 16)), r"zero channels"),
    "rate_zero.wav": (make_wav(ONE_SECOND, fmt=fmt_body(1, 1, 0, 16)), r"sample rate of 0 Hz is not plausible"),
    "rate_huge.wav": (make_wav(ONE_SECOND, fmt=fmt_body(1, 1, 2_000_000, 16)), r"2000000 Hz is not plausible"),
    "rate_tiny.wav": (make_wav(ONE_SECOND, fmt=fmt_body(1, 1, 999, 16)), r"999 Hz is not plausible"),
    "nan.wav": (make_wav(np.array([0.1, np.nan] * 500, "<f4").tobytes(), fmt=fmt_body(3, bits=32)), r"NaN or inf"),
    "inf.wav": (make_wav(np.array([0.1, -np.inf] * 500, "<f8").tobytes(), fmt=fmt_body(3, bits=64)), r"NaN or inf"),
    "overflow.wav": (make_wav(np.full(1000, 1e300, "<f8").tobytes(), fmt=fmt_body(3, bits=64)), r"NaN or inf"),
    "too_short.wav": (make_wav(np.zeros(320, "<i2").tobytes()), r"too short \(20.0 ms\)"),
    "too_short_48k.wav": (make_wav(np.zeros(960, "<i2").tobytes(), fmt=fmt_body(1, 1, 48000, 16)), r"too short"),
    "not_audio.wav": (b"hello, this is a text file, not audio" * 10, r"not a WAV file; to read other formats, install"),
    "riff_avi.wav": (b"RIFF\x10\0\0\0AVI LIST\x04\0\0\0abcd", r"not a WAV file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_name_the_file_and_the_problem(tmp_path: Path, name: str, monkeypatch):
    monkeypatch.setattr(audio, "DECODERS", ())  # the built-in reader's own verdict (soundfile can read A-law)
    data, problem = BAD_FILES[name]
    path = _wav_file(tmp_path, name, data)
    with pytest.raises(AudioError, match=f"^'{re.escape(str(path))}': .*{problem}"):
        load_audio(path)
    if data:
        with pytest.raises(AudioError, match=f"^<bytes>: .*{problem}"):
            load_audio(data)


def test_garbage_without_any_decoder_says_what_to_install(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(audio, "DECODERS", ())
    path = _wav_file(tmp_path, "song.mp3", b"ID3\x04\0\0\0\0\0\0" + b"\xff" * 100)
    with pytest.raises(AudioError, match=r"song.mp3': not a WAV file.*pip install soundfile.*torchaudio.*ffmpeg"):
        load_audio(path)


def test_garbage_that_soundfile_rejects_says_so(tmp_path: Path):
    path = _wav_file(tmp_path, "noise.ogg", b"OggS" + bytes(range(256)) * 4)
    with pytest.raises(AudioError, match=r"noise.ogg': not a WAV file, and no installed decoder could read it "
                                         r"\(tried soundfile"):
        load_audio(path)


def test_truncating_a_real_wav_anywhere_is_an_audio_error():
    data = make_wav(ONE_SECOND, before=chunk(b"LIST", b"INFOabc"))
    for end in range(0, 80):
        with pytest.raises(AudioError):
            load_audio(data[:end])


def test_missing_paths_and_directories(tmp_path: Path):
    with pytest.raises(AudioError, match=r"nowhere.wav': no such file"):
        load_audio(tmp_path / "nowhere.wav")
    with pytest.raises(AudioError, match=r"nowhere.wav': no such file"):
        load_audio((tmp_path / "nowhere.wav").as_uri())
    with pytest.raises(AudioError, match=f"'{tmp_path}': is a directory"):
        load_audio(str(tmp_path))
    with pytest.raises(AudioError, match=r"cannot be read"):
        load_audio("bad\0name.wav")


def test_bad_arrays_and_arguments():
    cases = [
        (np.zeros(1000), None, r"<array>: an array carries no sample rate; pass sampling_rate"),
        (np.zeros(0), SR, r"<array>: expected a non-empty.*shape \(0,\)"),
        (np.zeros((2, 0)), SR, r"<array>: expected a non-empty"),
        (np.zeros((2, 3, 400)), SR, r"<array>: expected a non-empty 1-D or 2-D"),
        (np.array([0.1, np.nan] * 500), SR, r"<array>: the audio contains NaN"),
        (np.array([0.1, np.inf] * 500, np.float32), SR, r"<array>: the audio contains NaN"),
        (np.zeros(320, np.float32), SR, r"<array>: the audio is too short"),
        (np.zeros(1000, np.complex64), SR, r"<array>: samples of dtype complex64 are not audio"),
        (np.array(["a"] * 1000), SR, r"<array>: samples of dtype <U1 are not audio"),
        (np.zeros(1000, bool), SR, r"<array>: samples of dtype bool are not audio"),
        (np.zeros(1000), 0, r"<array>: a sample rate of 0 Hz"),
        (np.zeros(1000), 16000.5, r"<array>: sampling_rate must be a whole number"),
        (np.zeros(1000), "16000", r"<array>: sampling_rate must be a whole number"),
        (torch.full((1000,), float("nan")), SR, r"<array>: the audio contains NaN"),
    ]
    for array, rate, problem in cases:
        with pytest.raises(AudioError, match=problem):
            load_audio(array, sampling_rate=rate)
    with pytest.raises(AudioError, match=r"cannot read audio from a int"):
        load_audio(12)
    with pytest.raises(AudioError, match=r"<data URI>: bad base64"):
        load_audio("data:audio/wav;base64,@@@@")


# -------------------------------------------------------------------------------------------------- long audio
def test_split_75_seconds_into_30_30_15():
    waveform = np.zeros(75 * SR, np.float32)
    pieces = split_long_audio(waveform)
    assert [len(p) for p in pieces] == [30 * SR, 30 * SR, 15 * SR]
    assert [audio_token_count(num_frames(len(p))) for p in pieces] == [750, 750, 375]
    assert sum(audio_token_count(num_frames(len(p))) for p in pieces) == 1875
    np.testing.assert_array_equal(np.concatenate(pieces), waveform)


def test_split_drops_a_last_window_with_no_token():
    assert [len(p) for p in split_long_audio(np.zeros(N_SAMPLES + 320))] == [N_SAMPLES]
    assert [len(p) for p in split_long_audio(np.zeros(N_SAMPLES + 321))] == [N_SAMPLES, 321]
    assert [len(p) for p in split_long_audio(np.zeros(25 * SR), max_seconds=10)] == [10 * SR, 10 * SR, 5 * SR]
    assert [len(p) for p in split_long_audio(np.zeros(5 * SR))] == [5 * SR]
    with pytest.raises(AudioError, match="max_seconds"):
        split_long_audio(np.zeros(10), max_seconds=31)


def test_truncate_keeps_30_seconds_and_warns():
    waveform = np.arange(75 * SR, dtype=np.float32)
    with pytest.warns(UserWarning, match=r"talk.wav is 75.0 s long.*45.0 s are dropped.*long_audio=\"chunk\""):
        kept = truncate_long_audio(waveform, "talk.wav")
    np.testing.assert_array_equal(kept, waveform[:N_SAMPLES])
    short = np.zeros(30 * SR, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning when nothing is dropped
        assert truncate_long_audio(short, "short.wav") is short
