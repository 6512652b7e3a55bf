"""Reading the small files of a model folder safely: only regular files (opened without blocking, checked after
opening, so a FIFO, a device or a folder in their place is an error, never a read that waits forever), of bounded
size, UTF-8 JSON without a key twice or nesting deep enough to exhaust the stack; and existence tests that do not
raise where pathlib's do (a folder we may not enter)."""

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import Qwen2AudioError, WeightsError

MAX_JSON_BYTES = 64 << 20  # an index or a config is a few hundred kB; more is not a checkpoint's


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"the key {next(k for k in keys if keys.count(k) > 1)!r} appears twice")
    return dict(pairs)


def parse_json(raw: bytes, what: str) -> object:
    """JSON from bytes, any problem (not UTF-8, not JSON, nested too deep, a key twice) a ValueError naming it."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:200]
        raise ValueError(f"{what} is not valid JSON ({reason})") from None


def present(path: Path) -> bool:
    """Whether something is at path. True when that cannot be told (a folder we may not enter, a name too long),
    so that reading it then says why; pathlib's exists() raises PermissionError there."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except (OSError, ValueError):
        return True
    return True


def is_folder(path: Path) -> bool:
    """Whether path is a folder; False when it cannot be told (pathlib's is_dir() raises PermissionError)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def open_regular(path: Path) -> BinaryIO:
    """Open a file for reading only if it is a regular file: opened without blocking and checked after opening
    (fstat), so a FIFO, a device or a folder in its place is a ValueError instead of a read that never ends."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a regular file")
    return os.fdopen(fd, "rb")


def read_regular_file(path: Path, what: str = "", limit: int = MAX_JSON_BYTES,
                      error: type[Qwen2AudioError] = WeightsError) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; anything else (missing, unreadable, not a regular file,
    too large) is `error` with a sentence naming the file."""
    what = what or path.name
    try:
        with open_regular(path) as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"cannot read {what} ({path}): {e.strerror or e}") from None
    except ValueError as e:
        raise error(f"cannot read {what}: {e}") from None
    if len(raw) > limit:
        raise error(f"{path} is larger than {limit >> 20} MB; it cannot be the {what} of a model folder")
    return raw


def read_json_file(path: Path, what: str = "", error: type[Qwen2AudioError] = WeightsError) -> object:
    """A JSON file of a model folder: a regular file of at most MAX_JSON_BYTES, UTF-8, valid JSON."""
    raw = read_regular_file(path, what, MAX_JSON_BYTES, error)
    try:
        return parse_json(raw, str(path))
    except ValueError as e:
        raise error(str(e)) from None
