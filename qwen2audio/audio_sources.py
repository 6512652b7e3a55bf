"""Where audio bytes come from, and the policy that limits each source: local files, http(s) downloads, data: URIs.

`AudioPolicy` is chosen by the caller. The default suits a user on their own machine (the command line, scripts);
`AudioPolicy.strict()` is for a server that reads audio sent by others: no local files, no downloads unless it
switches them on, small size and duration caps. Every refusal is an AudioError naming the source and the limit.
"""

import base64
import binascii
import http.client  # also makes http.HTTPStatus available
import os
import socket
import ssl
import stat
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import AudioError

CHUNK = 1 << 20  # read size for files and downloads
REDIRECTS = (301, 302, 303, 307, 308)


@dataclass(frozen=True)
class AudioPolicy:
    """What `load_audio` may read, and how much. The defaults suit local use; `AudioPolicy.strict()` a server."""
    allow_local_files: bool = True  # paths and file:// URLs
    allow_downloads: bool = True  # http:// and https:// URLs
    download_hosts: frozenset[str] | None = None  # the only hosts a URL or a redirect may name; None: any host
    redirect_hosts: frozenset[str] = frozenset()  # hosts a redirect may go to besides the first URL's own host
    max_redirects: int = 3
    download_timeout_s: float = 120.0  # for the whole download (connect, headers, body), not per read
    max_bytes: int = 2 << 30  # the encoded audio from any source: file, download, data URI, bytes (2 GiB)
    max_seconds: float | None = 4 * 3600.0  # decoded duration; checked before samples are converted (4 hours)

    def __post_init__(self) -> None:  # validated once here, so every reader can trust the fields
        for field in ("allow_local_files", "allow_downloads"):
            _require(isinstance(getattr(self, field), bool), self, field, "True or False")
        if self.download_hosts is not None:
            object.__setattr__(self, "download_hosts", _host_set(self, "download_hosts"))
        object.__setattr__(self, "redirect_hosts", _host_set(self, "redirect_hosts"))
        for field, low in (("max_redirects", 0), ("max_bytes", 1)):
            value = getattr(self, field)
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= low, self, field,
                     f"an integer >= {low}")
        for field in ("download_timeout_s", "max_seconds"):
            value = getattr(self, field)
            seconds = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")
            _require(seconds or (field == "max_seconds" and value is None), self, field,
                     "a positive number of seconds")

    @classmethod
    def strict(cls, **changes: object) -> "AudioPolicy":
        """For audio from untrusted clients: no local files or downloads, 25 MiB (OpenAI's upload limit), 10 minutes
        (an 8k-token context holds about 5 minutes of audio). Pass changes, e.g. strict(allow_downloads=True)."""
        preset = dict(allow_local_files=False, allow_downloads=False, download_timeout_s=20.0, max_bytes=25 << 20,
                      max_seconds=600.0)
        return cls(**{**preset, **changes})


def _require(condition: bool, policy: AudioPolicy, field: str, what: str) -> None:
    if not condition:
        raise AudioError(f"AudioPolicy.{field} must be {what}, got {getattr(policy, field)!r}")


def _host_set(policy: AudioPolicy, field: str) -> frozenset[str]:
    """A set of host names, lower-cased and without IPv6 brackets, as urlsplit's .hostname gives them."""
    value, what = getattr(policy, field), "a set of host names, e.g. {'cdn.example.com'}"
    _require(not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"), policy, field, what)
    hosts = list(value)
    _require(all(isinstance(h, str) and h for h in hosts), policy, field, what)
    return frozenset(h.lower().strip("[]") for h in hosts)


def check_policy(policy: object) -> "AudioPolicy":
    if not isinstance(policy, AudioPolicy):
        raise AudioError(f"policy must be a qwen2audio.audio.AudioPolicy, got {type(policy).__name__}")
    return policy


def check_size(size: int, name: str, policy: AudioPolicy) -> None:
    if size > policy.max_bytes:
        raise AudioError(f"{name}: {size} bytes is over the {policy.max_bytes}-byte limit (AudioPolicy.max_bytes)")


def read_capped(read: Callable[[int], bytes], limit: int, name: str, first: int = CHUNK) -> bytes:
    """Read until EOF, but never more than `limit` + 1 bytes: a size a header claims is never allocated."""
    parts, total, size = [], 0, first
    while chunk := read(size):
        parts.append(chunk)
        total += len(chunk)
        if total > limit:  # security: an endless body or a growing file stops here
            raise AudioError(f"{name}: more than {limit} bytes, over the limit (AudioPolicy.max_bytes)")
        size = CHUNK
    return parts[0] if len(parts) == 1 else b"".join(parts)


# ------------------------------------------------------------------------------------------------- local files
FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR,
              "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _refuse_special(mode: int, name: str) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((kind for test, kind in FILE_KINDS if test(mode)), "not a regular file")
    raise AudioError(f"{name}: is {kind}, not an audio file (only regular files are read)")


def read_local_file(path: Path, policy: AudioPolicy) -> bytes:
    """A regular file's bytes, within the policy's size limit. FIFOs, devices, sockets and directories are refused
    before anything is read from them, so none of them can block or stream forever."""
    name = f"'{path}'"
    if not policy.allow_local_files:  # security: a server switches this off; nothing is even checked for existence
        raise AudioError(f"{name}: reading local files is switched off (AudioPolicy.allow_local_files=False); send "
                         "the audio itself (bytes or a data: URI)")
    try:
        _refuse_special(os.stat(path).st_mode, name)  # security: a clear refusal before any open
        fd = os.open(path, OPEN_FLAGS)  # O_NONBLOCK: a file swapped for a FIFO meanwhile still cannot block
        try:
            info = os.fstat(fd)
            _refuse_special(info.st_mode, name)  # what was opened, not what was looked at
            check_size(info.st_size, name, policy)
            return read_capped(lambda n: os.read(fd, n), policy.max_bytes, name, first=info.st_size + 1)
        finally:
            os.close(fd)
    except AudioError:
        raise
    except FileNotFoundError:
        raise AudioError(f"{name}: no such file") from None
    except (OSError, ValueError) as error:  # permissions, a name too long or with a NUL byte, ...
        raise AudioError(f"{name}: cannot be read ({getattr(error, 'strerror', None) or error})") from None


def file_url_path(url: str, policy: AudioPolicy) -> Path:
    if not policy.allow_local_files:  # security: refused before the URL is even parsed
        raise AudioError(f"{url}: reading local files is switched off (AudioPolicy.allow_local_files=False); send "
                         "the audio itself (bytes or a data: URI)")
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise AudioError(f"{url}: a file:// URL must name a file on this machine (file:///path/to/clip.wav)")
    return Path(urllib.request.url2pathname(parts.path))


# -------------------------------------------------------------------------------------------------- data: URIs
def read_data_uri(uri: str, policy: AudioPolicy) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma:
        raise AudioError("<data URI>: no ',' separates the header from the data")
    base64_encoded = header.endswith(";base64")
    # The decoded size, known before decoding (exact for valid input; the check after decoding covers the rest).
    size = len(payload.rstrip("=")) * 3 // 4 if base64_encoded else len(payload) - 2 * payload.count("%")
    check_size(size, "<data URI>", policy)
    if not base64_encoded:
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:  # binascii names the rule broken, never the data
            raise AudioError(f"<data URI>: bad base64 ({error})") from None
    check_size(len(data), "<data URI>", policy)
    return data


# --------------------------------------------------------------------------------------------------- downloads
def _checked_url(url: str, first: str | None, policy: AudioPolicy) -> urllib.parse.SplitResult:
    """Parse a URL to fetch; `first` is the URL the user gave when `url` is where a redirect points."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):  # security: a redirect never reaches file:, ftp:, data:, ...
        raise AudioError(f"{first or url}: redirected to a {parts.scheme or 'relative'}: URL; only http(s) is "
                         "followed")
    parts.port  # noqa: B018 -- raises ValueError for a port that is not a number in range
    host = parts.hostname or ""
    if not host:
        raise AudioError(f"{first or url}: the URL names no host")
    if policy.download_hosts is not None and host not in policy.download_hosts:
        raise AudioError(f"{first or url}: host '{host}' is not one the audio policy allows "
                         f"(AudioPolicy.download_hosts: {sorted(policy.download_hosts)})")
    origin = urllib.parse.urlsplit(first).hostname if first else host
    if host != origin and host not in policy.redirect_hosts:  # security: 127.0.0.1 -> localhost is another host
        raise AudioError(f"{first}: redirected to another host ('{host}'); redirects are followed only to the same "
                         "host unless AudioPolicy.redirect_hosts names it")
    return parts


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase  # security: the standard phrase, not the text the server sent
    except ValueError:
        return "unknown status"


class _Download:
    """One download on a worker thread, so that the caller can give up at the deadline whatever the socket does
    (a server that drips a byte every second never trips a per-read timeout)."""

    def __init__(self, url: str, policy: AudioPolicy):
        self.url, self.policy = url, policy
        self.hint = "; download the file yourself and pass its path" if policy.allow_local_files else ""
        self.done, self.cancelled = threading.Event(), False
        self.connection: http.client.HTTPConnection | None = None
        self.sock: socket.socket | None = None  # kept: the connection lets go of it once a response owns it
        self.response: http.client.HTTPResponse | None = None
        self.data: bytes | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.data = self._fetch()
        except (OSError, ValueError, http.client.HTTPException) as error:  # no network, refused, bad URL, TLS, ...
            if not isinstance(error, AudioError):
                reason = getattr(error, "strerror", None) or error
                error = AudioError(f"{self.url}: download failed ({reason}){self.hint}")
            self.error = error
        except BaseException as error:  # handed to the caller's thread as it is
            self.error = error
        finally:
            self._close()
            self.done.set()

    def _close(self) -> None:
        for thing in (self.response, self.connection):
            if thing is not None:
                thing.close()

    def cancel(self) -> None:
        """Called from the caller's thread at the deadline: shutting the socket down wakes a blocked read."""
        self.cancelled = True  # first, so a connection opened after this line is closed by the worker itself
        if self.sock is not None:
            try:
                socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
            except OSError:  # already closed
                pass

    def _fetch(self) -> bytes:
        url, first = self.url, None
        for _ in range(self.policy.max_redirects + 1):
            parts = _checked_url(url, first, self.policy)
            response = self._request(parts)
            if response.status not in REDIRECTS:
                return self._body(response)
            location = response.getheader("Location")
            if not location:
                raise AudioError(f"{self.url}: HTTP {response.status} redirect without a Location header")
            url, first = urllib.parse.urljoin(url, location.strip()), self.url
        raise AudioError(f"{self.url}: more than {self.policy.max_redirects} redirects (AudioPolicy.max_redirects)")

    def _request(self, parts: urllib.parse.SplitResult) -> http.client.HTTPResponse:
        self._close()
        timeout = self.policy.download_timeout_s + 5  # a backstop per operation; the caller's deadline comes first
        if parts.scheme == "https":
            self.connection = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout,
                                                          context=ssl.create_default_context())
        else:
            self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.connection.connect()
        self.sock = self.connection.sock
        if self.cancelled:
            raise AudioError(f"{self.url}: cancelled")  # the caller has already reported the deadline
        target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self.connection.request("GET", target, headers={"User-Agent": "qwen2audio", "Accept-Encoding": "identity"})
        self.response = self.connection.getresponse()
        return self.response

    def _body(self, response: http.client.HTTPResponse) -> bytes:
        if response.status != 200:
            raise AudioError(f"{self.url}: download failed (HTTP {response.status} {_phrase(response.status)})"
                             f"{self.hint}")
        if response.length is not None:  # security: a declared size over the cap is refused before reading
            check_size(response.length, self.url, self.policy)
        data = read_capped(response.read1, self.policy.max_bytes, self.url)
        if response.length:  # the server closed the connection early
            raise AudioError(f"{self.url}: download failed (the connection closed {response.length} bytes short)")
        return data


def download(url: str, policy: AudioPolicy) -> bytes:
    """The body of an http(s) URL: redirects only as the policy allows, at most `max_bytes`, and all of it within
    `download_timeout_s`."""
    if not policy.allow_downloads:  # security: a server switches downloads on only on purpose
        raise AudioError(f"{url}: downloads are switched off (AudioPolicy.allow_downloads=False); send the audio "
                         "itself (bytes or a data: URI)")
    job = _Download(url, policy)
    threading.Thread(target=job.run, name="qwen2audio-download", daemon=True).start()
    try:
        finished = job.done.wait(policy.download_timeout_s)  # security: a total deadline, not a per-read timeout
    finally:
        if not job.done.is_set():  # the deadline, or Ctrl-C while waiting: wake the worker so that it ends
            job.cancel()
    if not finished:
        raise AudioError(f"{url}: the download did not finish within {policy.download_timeout_s:g} s "
                         "(AudioPolicy.download_timeout_s)")
    if job.error is not None:
        raise job.error
    return job.data
