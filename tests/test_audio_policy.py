"""AudioPolicy: its presets, its validation, local reading switched off, and the size and duration caps applied to
every source and every decoder (each limit named in the refusal)."""

import base64
import io
import shutil
import urllib.parse
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen2audio import audio
from qwen2audio.audio import AudioPolicy, AudioTooLong, decode_wav, load_audio
from qwen2audio.errors import AudioError
from test_audio import make_wav

sf = pytest.importorskip("soundfile")

SR = 16000
TWO_SECONDS = make_wav(np.zeros(2 * SR, "<i2").tobytes())
OFF = "reading local files is switched off (AudioPolicy.allow_local_files=False); send the audio itself"


def flac(seconds: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros((int(seconds * SR), 2), np.int16), SR, subtype="PCM_16", format="FLAC")
    return buffer.getvalue()


def test_presets():
    default, strict = AudioPolicy(), AudioPolicy.strict()
    assert (default.allow_local_files, default.allow_downloads, default.download_hosts, default.redirect_hosts,
            default.max_redirects, default.download_timeout_s, default.max_bytes, default.max_seconds) == \
        (True, True, None, frozenset(), 3, 120.0, 2 << 30, 4 * 3600.0)
    assert (strict.allow_local_files, strict.allow_downloads, strict.max_bytes, strict.max_seconds,
            strict.download_timeout_s, strict.max_redirects) == (False, False, 25 << 20, 600.0, 20.0, 3)
    opened = AudioPolicy.strict(allow_downloads=True, download_hosts=["CDN.example.com"])
    assert opened.allow_downloads and not opened.allow_local_files and opened.download_hosts == {"cdn.example.com"}
    assert AudioPolicy(redirect_hosts={"[::1]", "LocalHost"}).redirect_hosts == {"::1", "localhost"}  # as urlsplit
    assert hash(strict) == hash(AudioPolicy.strict())  # frozen: shareable between threads and requests


@pytest.mark.parametrize("changes, problem", [
    (dict(allow_local_files="no"), r"AudioPolicy.allow_local_files must be True or False, got 'no'"),
    (dict(redirect_hosts="localhost"), r"AudioPolicy.redirect_hosts must be a set of host names"),
    (dict(download_hosts={""}), r"AudioPolicy.download_hosts must be a set of host names"),
    (dict(redirect_hosts=None), r"AudioPolicy.redirect_hosts must be a set of host names"),
    (dict(download_hosts=3), r"AudioPolicy.download_hosts must be a set of host names, e.g. .*, got 3$"),
    (dict(max_redirects=-1), r"AudioPolicy.max_redirects must be an integer >= 0, got -1"),
    (dict(max_bytes=0), r"AudioPolicy.max_bytes must be an integer >= 1, got 0"),
    (dict(max_bytes=1.5e9), r"AudioPolicy.max_bytes must be an integer >= 1"),
    (dict(download_timeout_s=0), r"AudioPolicy.download_timeout_s must be a positive number of seconds, got 0"),
    (dict(download_timeout_s=float("inf")), r"AudioPolicy.download_timeout_s must be a positive number"),
    (dict(max_seconds=-1.0), r"AudioPolicy.max_seconds must be a positive number of seconds, got -1.0"),
    (dict(max_seconds="600"), r"AudioPolicy.max_seconds must be a positive number"),
])
def test_bad_policies_are_refused(changes: dict, problem: str):
    with pytest.raises(AudioError, match=f"^{problem}"):
        AudioPolicy(**changes)


def test_policy_argument_must_be_a_policy():
    with pytest.raises(AudioError, match=r"^policy must be a qwen2audio.audio.AudioPolicy, got str"):
        load_audio(TWO_SECONDS, policy="strict")
    with pytest.raises(TypeError):
        load_audio(TWO_SECONDS, None, AudioPolicy())  # keyword only: a policy never lands in sampling_rate


def test_local_reading_switched_off_refuses_paths_and_file_urls(tmp_path: Path):
    real = tmp_path / "clip.wav"
    real.write_bytes(TWO_SECONDS)
    for policy in (AudioPolicy(allow_local_files=False), AudioPolicy.strict()):
        for path in (real, tmp_path / "missing.wav", tmp_path):  # the same answer whether it exists or not
            for source, name in ((path, repr(str(path))), (str(path), repr(str(path))), (path.as_uri(), path.as_uri()),
                                 ("file://localhost" + urllib.parse.quote(str(path)), None)):
                with pytest.raises(AudioError) as caught:
                    load_audio(source, policy=policy)
                assert OFF in str(caught.value) and str(caught.value).startswith(name or "file://localhost")
        np.testing.assert_array_equal(load_audio(TWO_SECONDS, policy=policy), load_audio(real))  # bytes still read


def test_urls_that_are_not_read(tmp_path: Path):
    with pytest.raises(AudioError, match=r"^file://server/share/a.wav: a file:// URL must name a file on this machine"):
        load_audio("file://server/share/a.wav")
    with pytest.raises(AudioError, match=r"^ftp://127.0.0.1/a.wav: ftp:// URLs are not read; pass a path"):
        load_audio("ftp://127.0.0.1/a.wav")
    path = tmp_path / "clip.wav"
    path.write_bytes(TWO_SECONDS)
    assert len(load_audio("file://localhost" + urllib.parse.quote(str(path)))) == 2 * SR


def test_size_cap_applies_to_bytes_and_data_uris():
    size = len(TWO_SECONDS)
    under, exact = AudioPolicy(max_bytes=size - 1), AudioPolicy(max_bytes=size)
    for source in (TWO_SECONDS, bytearray(TWO_SECONDS), memoryview(TWO_SECONDS)):
        with pytest.raises(AudioError, match=f"^<bytes>: {size} bytes is over the {size - 1}-byte limit "
                                             r"\(AudioPolicy.max_bytes\)$"):
            load_audio(source, policy=under)
        assert len(load_audio(source, policy=exact)) == 2 * SR
    b64 = "data:audio/wav;base64," + base64.b64encode(TWO_SECONDS).decode()
    percent = "data:audio/wav," + urllib.parse.quote_from_bytes(TWO_SECONDS)
    for uri in (b64, percent):
        with pytest.raises(AudioError, match=r"^<data URI>: \d+ bytes is over the \d+-byte limit"):
            load_audio(uri, policy=under)
        assert len(load_audio(uri, policy=exact)) == 2 * SR
    with pytest.raises(AudioError, match=r"^<data URI>: 75000 bytes is over the 1000-byte limit"):
        load_audio("data:audio/wav;base64," + "A" * 100_000, policy=AudioPolicy(max_bytes=1000))  # before decoding


def test_duration_cap_in_the_wav_reader_comes_before_any_conversion():
    with pytest.raises(AudioTooLong, match=r"^<bytes>: the audio is longer than the 1.5 s allowed "
                                           r"\(AudioPolicy.max_seconds\); cut it, or pass a policy"):
        load_audio(TWO_SECONDS, policy=AudioPolicy(max_seconds=1.5))
    assert len(load_audio(TWO_SECONDS, policy=AudioPolicy(max_seconds=2))) == 2 * SR  # exactly at the limit
    assert len(load_audio(TWO_SECONDS, policy=AudioPolicy(max_seconds=None))) == 2 * SR
    # A streaming header over 4 GB of "data" is never converted: the check uses the frame count, not the samples.
    streaming = make_wav(np.zeros(4 * SR, "<i2").tobytes(), data_size=0xFFFFFFFF)
    with pytest.raises(AudioTooLong):
        decode_wav(streaming, max_seconds=3)


@pytest.mark.parametrize("reader", ["soundfile", "ffmpeg"])
def test_duration_cap_in_each_decoder(reader: str, monkeypatch, tmp_path: Path):
    if reader == "ffmpeg" and shutil.which("ffmpeg") is None:
        pytest.skip("the ffmpeg program is not on PATH (Debian: apt-get install ffmpeg)")
    monkeypatch.setattr(audio, "DECODERS", tuple(d for d in audio.DECODERS if d[0] == reader))
    path = tmp_path / "long.flac"
    path.write_bytes(flac(3.0))
    for source, name in ((path.read_bytes(), "<bytes>"), (path, repr(str(path)))):
        with pytest.raises(AudioTooLong, match=f"^{name}: the audio is longer than the 2 s allowed"):
            load_audio(source, policy=AudioPolicy(max_seconds=2))  # not "could not decode": the limit is named
        assert len(load_audio(source, policy=AudioPolicy(max_seconds=3))) == 3 * SR


def test_duration_cap_on_arrays_and_tensors():
    with pytest.raises(AudioTooLong, match=r"^<array>: the audio is longer than the 1 s allowed"):
        load_audio(np.zeros(44101, np.float32), sampling_rate=44100, policy=AudioPolicy(max_seconds=1))
    assert len(load_audio(np.zeros(44100, np.float32), sampling_rate=44100, policy=AudioPolicy(max_seconds=1))) == SR
    with pytest.raises(AudioError, match=r"^<array>: a meta tensor holds no samples"):
        load_audio(torch.empty(1000, device="meta"), sampling_rate=SR)
    with pytest.raises(AudioError, match=r"^<array>: a sparse tensor holds no samples"):
        load_audio(torch.zeros(1000).to_sparse(), sampling_rate=SR)
