"""Putting a newly written folder in place of a destination, so that a process killed at any moment leaves the
destination either as it was or complete, and a folder that someone else made is never deleted.

The design, and why:
- The new folder is written as a hidden sibling, `.NAME.partial-XXXX`, on the destination's filesystem, while the
  writer holds an exclusive lock (flock) on `.NAME.lock`: one conversion into a destination at a time, and a
  leftover whose writer is gone can be told from one being written.
- When it is complete it takes the destination's name in ONE step. Linux's renameat2 can do that: RENAME_EXCHANGE
  swaps the new folder and an existing destination atomically (there is never a moment without a complete
  destination; the old one is then at the hidden name and is deleted), and RENAME_NOREPLACE moves the new folder to
  a free name but fails if another process created a folder there meanwhile (it is left alone).
- Where renameat2 is missing (other systems, some network filesystems), replacing takes two renames (the old one
  aside, the new one in), with a moment where the destination is absent. A journal, `.NAME.journal`, written
  before the first rename, lets the next run finish the move; without it the old folder would only survive under
  a hidden name.
- Every run first looks at what a killed run left (it holds the lock, so their writer is gone): it finishes a
  journal's move, deletes hidden partial and old folders, and says what it found (a warning).
QWEN2AUDIO_TEST_SIGNAL_AT=<step> kills the process at that step (the tests' way to interrupt it at every point).
"""

import ctypes
import errno
import json
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import WeightsError

try:
    import fcntl
except ImportError:  # Windows: no flock; conversions into one destination are then not kept apart
    fcntl = None

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2  # linux/fs.h
_AT_FDCWD = -100


def step(name: str) -> None:
    """A named point of the procedure, where the tests interrupt it: QWEN2AUDIO_TEST_SIGNAL_AT=NAME kills the
    process here (SIGKILL), NAME:STOP stops it (SIGSTOP) until the test has changed something and continues it."""
    at, _, how = os.environ.get("QWEN2AUDIO_TEST_SIGNAL_AT", "").partition(":")
    if at == name:
        os.kill(os.getpid(), signal.SIGSTOP if how == "STOP" else signal.SIGKILL)


def _renameat2_function():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError, TypeError):  # other C libraries and systems (Windows: CDLL(None) is an error)
        return None


_RENAMEAT2 = _renameat2_function()


def renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename with flags; False where the system or the filesystem cannot do it (then the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


@contextmanager
def destination_lock(dst: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside dst; a second conversion into dst at the same time is refused. The file is removed
    when the run ends (a killed run leaves it for the next, which takes it over)."""
    path = dst.parent / f".{dst.name}.lock"
    with open(path, "a") as lock:
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not path.exists() or os.fstat(lock.fileno()).st_ino != path.stat().st_ino:
                raise BlockingIOError  # the file was removed by the run that held it: another run has a new one
        except BlockingIOError:
            raise WeightsError(f"another process is writing {dst} right now; wait for it to finish") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still locked: whoever opened this file finds it gone


def _journal(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.journal"


def _read_journal(dst: Path) -> tuple[Path, Path] | None:
    """(new, old) from the journal; only sibling names of the shapes this module makes are ever followed."""
    try:
        moves = json.loads(_journal(dst).read_text())
        new, old = dst.parent / moves["new"], dst.parent / moves["old"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = new.name.startswith(f".{dst.name}.partial-") and old.name.startswith(f".{dst.name}.old-") and \
        "/" not in moves["new"] + moves["old"]
    return (new, old) if ok else None


def recover(dst: Path) -> list[str]:
    """Finish or undo what a killed run left beside dst (call with the lock held); returns what was found."""
    found, moves = [], _read_journal(dst) if _journal(dst).exists() else None
    if moves is not None and not dst.exists():  # killed between the two renames: the new folder was complete
        chosen = next((p for p in moves if p.is_dir()), None)
        if chosen is not None:
            chosen.rename(dst)
            found.append(f"a conversion was killed while replacing {dst}; it now holds the "
                         f"{'new' if chosen == moves[0] else 'previous'} model")
    _journal(dst).unlink(missing_ok=True)
    for leftover in sorted(dst.parent.glob(f".{dst.name}.partial-*")) + sorted(dst.parent.glob(f".{dst.name}.old-*")):
        kind = "the output of a conversion that did not finish, or the model it was replacing" \
            if ".partial-" in leftover.name else "the model a conversion replaced"
        remove(leftover)
        found.append(f"removed {leftover.name} ({kind}), left beside {dst} by a run that was killed")
    for message in found:
        warnings.warn(message, UserWarning, stacklevel=3)
    return found


def remove(path: Path) -> None:
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def check_replaceable(dst: Path, force: bool) -> bool:
    """Whether dst is there and must be replaced: refused when it is not a folder, not empty without force, or
    (even with force) not a model folder. False when dst is absent or an empty folder."""
    if dst.exists() and not dst.is_dir():
        raise WeightsError(f"{dst} exists and is not a folder; choose another destination")
    if not dst.is_dir() or not any(dst.iterdir()):
        return False
    if not force:
        raise WeightsError(f"{dst} exists and is not empty; pass --force (force=True) to replace it")
    if not (dst / "config.json").is_file() and not any(dst.glob("*.safetensors")):
        raise WeightsError(f"{dst} is not empty and is not a model folder (no config.json or safetensors); "
                           "refusing to replace it even with --force")
    return True


def new_partial(dst: Path) -> Path:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    tmp.chmod(0o755)
    return tmp


def _replace_in_two_steps(tmp: Path, dst: Path) -> None:
    """The fallback: a journal (written whole, then renamed), the old folder aside, the new one in, the old one
    deleted."""
    old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
    journal, draft = _journal(dst), tmp.with_name(tmp.name + ".journal")
    draft.write_text(json.dumps({"new": tmp.name, "old": old.name}))
    draft.rename(journal)
    step("journal-written")
    dst.rename(old)
    step("old-moved-aside")
    tmp.rename(dst)
    step("new-moved-in")
    journal.unlink()
    remove(old)


def _taken(dst: Path) -> WeightsError:
    return WeightsError(f"{dst} was created or filled by another process during the conversion; it was left as it "
                        "is and the conversion was not kept: remove it, or pass --force (force=True) to replace it")


def put_in_place(tmp: Path, dst: Path, force: bool, was_empty: bool) -> None:
    """Give the complete folder tmp the name dst, in one atomic step where the system allows. What is at dst then
    is replaced only if it may be: with force, a model folder; without, the empty folder that was there at the
    start (a folder another process created or filled during the run is left alone, and this is an error)."""
    step("complete")
    if dst.exists() and not force:
        try:
            if not was_empty:
                raise _taken(dst)
            dst.rmdir()  # only an empty folder goes: if someone wrote into it meanwhile, it stays
        except OSError:
            raise _taken(dst) from None
    if not dst.exists():
        try:
            if not renameat2(tmp, dst, RENAME_NOREPLACE):
                tmp.rename(dst)  # no renameat2: an empty folder created since the test above would be replaced
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise _taken(dst) from None
            raise
        return
    check_replaceable(dst, force)
    if renameat2(tmp, dst, RENAME_EXCHANGE):  # dst is now the new folder, tmp the old one
        step("exchanged")
        remove(tmp)
        return
    _replace_in_two_steps(tmp, dst)
