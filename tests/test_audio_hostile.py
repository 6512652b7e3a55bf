"""Hostile sources (issues 18 and 20): files that are not regular files, servers that never stop, lie about sizes,
drip, or redirect elsewhere, and local files whose contents must never reach an error message. Each case must end in
our AudioError naming the source and the limit, in bounded time. The HTTP server is real, on 127.0.0.1."""

import base64
import http.server
import os
import socket
import threading
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

from qwen2audio import audio
from qwen2audio.audio import AudioPolicy, load_audio
from qwen2audio.errors import AudioError
from test_audio import soundfile_wav, tone_mix

CLIP = soundfile_wav(tone_mix(0.5, channels=2), "PCM_16")
SECRET = "TOP-SECRET-7f3a9c"  # in every local file below; no message may contain it


def raises_within(seconds: float, call) -> AudioError:
    """Run `call` on a thread: it must raise AudioError and finish within `seconds` (a hang fails, not blocks)."""
    outcome = {}

    def run():
        try:
            call()
        except BaseException as error:  # noqa: BLE001 -- judged below, in the test's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s"
    assert isinstance(outcome.get("error"), AudioError), outcome
    return outcome["error"]


def no_download_threads_left(seconds: float = 10.0) -> bool:
    """A download given up at its deadline must not leave its worker blocked on the socket."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not any(t.name == "qwen2audio-download" for t in threading.enumerate()):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------------------------ the hostile server
class Hostile(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    requested: list = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        self.requested.append(self.path)
        route, _, argument = self.path.lstrip("/").partition("/")
        try:
            getattr(self, "route_" + route.replace("-", "_"), self.route_missing)(argument)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up, as it should
            pass

    def send(self, status: int, body: bytes = b"", headers: dict | None = None):
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def route_file(self, name):  # the bytes of a file registered by a test
        self.send(200, self.routes[name])

    def route_missing(self, _):
        self.send(404, b"nothing here")

    def route_endless(self, _):  # no Content-Length: the body ends when the connection does, so never
        self.send_response(200)
        self.end_headers()
        block = b"\0" * 65536
        for _ in range(100_000):
            self.wfile.write(block)

    def route_huge_length(self, _):  # claims a petabyte, sends a little
        self.send_response(200)
        self.send_header("Content-Length", str(10**15))
        self.end_headers()
        self.wfile.write(CLIP)

    def route_drip_body(self, every):  # honest headers, then one byte per interval
        self.send_response(200)
        self.send_header("Content-Length", str(len(CLIP)))
        self.end_headers()
        self.drip(CLIP, float(every))

    def route_drip_headers(self, every):  # even the status line comes one byte per interval
        self.drip(b"HTTP/1.0 200 OK\r\n" + b"X-Slow: " + b"a" * 1000 + b"\r\n\r\n" + CLIP, float(every))

    def drip(self, data: bytes, every: float):
        for byte in data[:200]:  # at most 200 bytes: the server thread ends by itself
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(every)

    def route_redirect(self, target):  # /redirect/<url-safe base64 of the Location>
        self.send(302, headers={"Location": base64.urlsafe_b64decode(target).decode()})

    def route_hops(self, n):  # n redirects (relative), then the clip
        self.send(302, headers={"Location": f"/hops/{int(n) - 1}" if int(n) > 1 else "/file/clip.wav"})


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    httpd.daemon_threads, httpd.block_on_close = True, False
    Hostile.routes["clip.wav"] = CLIP
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def redirect(server: str, location: str) -> str:
    return f"{server}/redirect/{base64.urlsafe_b64encode(location.encode()).decode()}"


# ------------------------------------------------------------------------------------ not regular files (files)
def test_a_fifo_is_refused_without_blocking(tmp_path: Path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)  # nobody writes to it: an open() for reading without O_NONBLOCK would wait forever
    for source in (fifo, str(fifo), fifo.as_uri()):
        error = raises_within(10, lambda source=source: load_audio(source))
        assert str(error) == f"'{fifo}': is a FIFO (named pipe), not an audio file (only regular files are read)"


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_are_refused(device: str, tmp_path: Path):
    if not os.path.exists(device):
        pytest.skip(f"{device} does not exist on this system")
    link = tmp_path / "innocent.wav"
    link.symlink_to(device)  # a symlink is followed, and what it points at is judged
    for source in (device, "file://" + device, link):
        error = raises_within(10, lambda source=source: load_audio(source))
        assert "is a character device, not an audio file" in str(error)


def test_directories_and_sockets_are_refused(tmp_path: Path):
    error = raises_within(10, lambda: load_audio(tmp_path))
    assert str(error).startswith(f"'{tmp_path}': is a directory, not an audio file")
    listener = socket.socket(socket.AF_UNIX)
    address = tmp_path / "s.wav"
    listener.bind(str(address))
    try:
        error = raises_within(10, lambda: load_audio(address))
        assert str(error).startswith(f"'{address}': is a socket, not an audio file")
    finally:
        listener.close()


def test_a_file_over_the_size_limit_is_refused_before_reading(tmp_path: Path):
    path = tmp_path / "big.wav"
    path.write_bytes(CLIP)
    error = raises_within(10, lambda: load_audio(path, policy=AudioPolicy(max_bytes=len(CLIP) - 1)))
    assert str(error) == f"'{path}': {len(CLIP)} bytes is over the {len(CLIP) - 1}-byte limit (AudioPolicy.max_bytes)"
    np.testing.assert_array_equal(load_audio(path, policy=AudioPolicy(max_bytes=len(CLIP))), load_audio(CLIP))


# ----------------------------------------------------------------------------------------- hostile servers
def test_a_good_download_still_works(server: str):
    np.testing.assert_array_equal(load_audio(f"{server}/file/clip.wav"), load_audio(CLIP))


def test_an_endless_body_stops_at_the_size_limit(server: str):
    policy = AudioPolicy(max_bytes=1 << 20, download_timeout_s=30)
    tracemalloc.start()
    try:
        error = raises_within(30, lambda: load_audio(f"{server}/endless", policy=policy))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error) == f"{server}/endless: more than 1048576 bytes, over the limit (AudioPolicy.max_bytes)"
    assert peak < 8 << 20  # a few 1 MiB chunks, never an unbounded buffer


def test_a_huge_content_length_is_refused_before_reading(server: str):
    tracemalloc.start()
    try:
        error = raises_within(30, lambda: load_audio(f"{server}/huge-length"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error) == (f"{server}/huge-length: 1000000000000000 bytes is over the {2 << 30}-byte limit "
                          "(AudioPolicy.max_bytes)")
    assert peak < 8 << 20


@pytest.mark.parametrize("route, every", [("drip-body", 2.0), ("drip-body", 0.05), ("drip-headers", 0.05)])
def test_a_dripping_server_is_cut_off_at_the_deadline(server: str, route: str, every: float):
    # Every 0.05 s a byte: no single read ever waits long, so only a deadline for the whole download ends it.
    url = f"{server}/{route}/{every}"
    error = raises_within(15, lambda: load_audio(url, policy=AudioPolicy(download_timeout_s=0.5)))
    assert str(error) == f"{url}: the download did not finish within 0.5 s (AudioPolicy.download_timeout_s)"
    assert no_download_threads_left()  # the worker was woken by the socket shutdown, not left dripping


def test_a_redirect_to_another_host_is_refused(server: str):
    port = server.rsplit(":", 1)[1]
    url = redirect(server, f"http://localhost:{port}/file/clip.wav")  # the same machine, but another host name
    before = len(Hostile.requested)
    error = raises_within(30, lambda: load_audio(url))
    assert str(error) == (f"{url}: redirected to another host ('localhost'); redirects are followed only to the "
                          "same host unless AudioPolicy.redirect_hosts names it")
    assert len(Hostile.requested) == before + 1  # the redirect was never followed
    # A host the policy names is followed ("127.1" is another spelling of 127.0.0.1, so no other address is used).
    allowed = redirect(server, f"http://127.1:{port}/file/clip.wav")
    np.testing.assert_array_equal(load_audio(allowed, policy=AudioPolicy(redirect_hosts={"127.1"})), load_audio(CLIP))


@pytest.mark.parametrize("location, scheme", [("file:///etc/passwd", "file"), ("ftp://127.0.0.1/a.wav", "ftp"),
                                              ("data:audio/wav;base64,AAAA", "data")])
def test_a_redirect_to_another_scheme_is_refused(server: str, location: str, scheme: str):
    url = redirect(server, location)
    error = raises_within(30, lambda: load_audio(url))
    assert str(error) == f"{url}: redirected to a {scheme}: URL; only http(s) is followed"


def test_redirects_are_limited(server: str):
    np.testing.assert_array_equal(load_audio(f"{server}/hops/3"), load_audio(CLIP))  # 3 redirects: the default limit
    error = raises_within(30, lambda: load_audio(f"{server}/hops/4"))
    assert str(error) == f"{server}/hops/4: more than 3 redirects (AudioPolicy.max_redirects)"
    error = raises_within(30, lambda: load_audio(f"{server}/hops/1", policy=AudioPolicy(max_redirects=0)))
    assert str(error) == f"{server}/hops/1: more than 0 redirects (AudioPolicy.max_redirects)"


def test_hosts_and_downloads_the_policy_does_not_allow_are_never_contacted(server: str):
    before = len(Hostile.requested)
    error = raises_within(30, lambda: load_audio(f"{server}/file/clip.wav",
                                                 policy=AudioPolicy(download_hosts={"cdn.example.com"})))
    assert str(error) == (f"{server}/file/clip.wav: host '127.0.0.1' is not one the audio policy allows "
                          "(AudioPolicy.download_hosts: ['cdn.example.com'])")
    error = raises_within(30, lambda: load_audio(f"{server}/file/clip.wav", policy=AudioPolicy.strict()))
    assert str(error) == (f"{server}/file/clip.wav: downloads are switched off (AudioPolicy.allow_downloads=False); "
                          "send the audio itself (bytes or a data: URI)")
    assert len(Hostile.requested) == before
    strict = AudioPolicy.strict(allow_downloads=True, download_hosts={"127.0.0.1"})
    np.testing.assert_array_equal(load_audio(f"{server}/file/clip.wav", policy=strict), load_audio(CLIP))


def test_http_errors_use_our_words_and_the_hint_fits_the_policy(server: str):
    error = raises_within(30, lambda: load_audio(f"{server}/missing"))
    assert str(error) == (f"{server}/missing: download failed (HTTP 404 Not Found); download the file yourself and "
                          "pass its path")
    error = raises_within(30, lambda: load_audio(f"{server}/missing", policy=AudioPolicy.strict(allow_downloads=True)))
    assert str(error) == f"{server}/missing: download failed (HTTP 404 Not Found)"  # a server client has no path


# ------------------------------------------------------------------------------- no file contents in messages
def secret_files(tmp_path: Path) -> list[Path]:
    """Local non-audio files holding SECRET, shaped to reach every reader: the WAV parser, each optional decoder,
    and ffmpeg's playlist demuxer (which would open the entries it lists)."""
    text = tmp_path / "notes.txt"
    text.write_text(f"user: admin\npassword: {SECRET}\n" * 20)
    rng = np.random.default_rng(0)
    contents = {
        "notes.txt": None,
        "blob.bin": rng.bytes(300) + SECRET.encode() + rng.bytes(300),
        "fake.wav": b"RIFF\xff\xff\xff\xffWAVE" + SECRET.encode() * 30,
        "fake_fmt.wav": b"RIFF\xff\xff\xff\xffWAVEfmt " + SECRET.encode() * 30,
        "fake.mp3": b"ID3\x03\0\0\0\0\0\x10" + SECRET.encode() * 30,
        "fake.flac": b"fLaC" + SECRET.encode() * 30,
        "fake.ogg": b"OggS\0\2" + SECRET.encode() * 30,
        "list.m3u8": (f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10,\n{text.as_uri()}?"
                      f"{SECRET}\n#EXTINF:10,\nhttp://127.0.0.1:9/{SECRET}.ts\n#EXT-X-ENDLIST\n").encode(),
    }
    paths = []
    for name, data in contents.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        paths.append(path)
    return paths


def messages(error: BaseException) -> str:
    """The error's text and that of every exception chained to it, shown or not."""
    texts = []
    while error is not None:
        texts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n".join(texts)


def test_no_message_quotes_a_local_file(tmp_path: Path, server: str):
    decoders = [name for name, decoder in audio.DECODERS if name != "torchaudio" or _installed("torchaudio")]
    assert "soundfile" in decoders  # the test extra installs it; ffmpeg runs where it is on PATH
    checked = 0
    for path in secret_files(tmp_path):
        data = path.read_bytes()
        Hostile.routes[path.name] = data
        sources = [path, str(path), path.as_uri(), data, "data:;base64," + base64.b64encode(data).decode(),
                   f"{server}/file/{path.name}"]
        for source in sources:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    load_audio(source)
                except AudioError as error:
                    text = messages(error)
                    assert SECRET not in text and "password" not in text, (path.name, type(source), text)
                    checked += 1
            assert all(SECRET not in str(w.message) for w in caught)
    assert checked == 8 * 6  # every file through every source kind was refused


def test_etc_passwd_is_not_quoted():
    if not os.path.isfile("/etc/passwd"):
        pytest.skip("no /etc/passwd on this system")
    first_line = Path("/etc/passwd").read_text().splitlines()[0]
    for source in ("file:///etc/passwd", "/etc/passwd"):
        error = raises_within(60, lambda source=source: load_audio(source))
        assert messages(error).startswith("AudioError: '/etc/passwd': not a WAV file, and no installed decoder")
        assert first_line[:6] not in messages(error)
        error = raises_within(60, lambda source=source: load_audio(source, policy=AudioPolicy.strict()))
        assert str(error).startswith(f"{source if source[0] == 'f' else repr(source)}: reading local files is "
                                     "switched off (AudioPolicy.allow_local_files=False)")


def test_a_playlist_cannot_make_ffmpeg_read_another_file(tmp_path: Path, monkeypatch):
    if audio.shutil.which("ffmpeg") is None:
        pytest.skip("the ffmpeg program is not on PATH")
    clip = tmp_path / "clip.wav"
    clip.write_bytes(CLIP)  # readable audio: without the protocol whitelist, ffmpeg would decode it
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXT-X-MEDIA-SEQUENCE:0\n#EXTINF:10,\n"
                        f"{clip.as_uri()}\n#EXT-X-ENDLIST\n")
    monkeypatch.setattr(audio, "DECODERS", tuple(d for d in audio.DECODERS if d[0] == "ffmpeg"))
    for source in (playlist.read_bytes(), "data:;base64," + base64.b64encode(playlist.read_bytes()).decode()):
        with pytest.raises(AudioError, match=r"not a WAV file, and no installed decoder could read it \(tried ffmpeg"):
            load_audio(source, policy=AudioPolicy.strict())


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
