"""Ready at once, fast soon after: weights mapped at load move into memory of their own in the background.

Mapping the files makes `load()` return in a fraction of a second, but decoding then streams the weights from the
4 kB pages of the page cache, ~20-40% slower than from memory of their own on 2 MB pages (see weights.py). So by
default `load()` maps, returns, and a background thread copies each mapped tensor into memory of its own and makes
that copy the parameter's data, one tensor at a time, while the first answer is already being computed.

Why this is safe under a running forward pass: the copy becomes a new Parameter set on its module (a Python
attribute, swapped under the GIL; no tensor is changed in place), both hold the same values, a pass that already
took the old Parameter keeps reading it, and the file mappings stay open for the model's lifetime, so the old
memory never goes away under a reader; its pages are only given back to the page cache (MADV_DONTNEED), from which
a late reader would fault them in again, unchanged. An in-place edit of a weight made before the move would be
lost, so `Qwen2Audio.model`, the way to the weights from outside, waits for `ready`.
"""

import atexit
import mmap
import threading
import weakref

import torch
from torch import nn

from .checkpoint import TensorEntry, empty_on_huge_pages

MappedTensor = tuple[str, mmap.mmap, TensorEntry]  # (parameter name, the file mapping, where it lies in it)
_RUNNING: "weakref.WeakSet[MoveIntoMemory]" = weakref.WeakSet()


@atexit.register
def _stop_at_exit() -> None:
    """At interpreter exit, stop every move between two tensors and wait for it: a daemon thread still inside a
    torch copy when the interpreter goes away aborts the process ("terminate called without an active exception")."""
    for mover in list(_RUNNING):
        mover.stop.set()
        mover.thread.join()


class MoveIntoMemory:
    """A daemon thread that moves the model's mapped tensors into memory of their own; `ready` is set when it is
    done (or at once when nothing is mapped)."""

    def __init__(self, model: nn.Module, mapped: list[MappedTensor]) -> None:
        self.model, self.mapped = model, mapped
        self.mappings = {id(m): m for _, m, _ in mapped}  # kept open while the model lives (see the module doc)
        self.ready, self.stop = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="qwen2audio-move-into-memory", daemon=True)
        _RUNNING.add(self)
        self.thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every mapped tensor is in memory of its own; False if the timeout passed first."""
        return self.ready.wait(timeout)

    def _run(self) -> None:
        try:
            for name, mapping, entry in self.mapped:
                if self.stop.is_set():
                    break
                params = dict(self.model.named_parameters(remove_duplicate=False))
                old = params[name]
                new = empty_on_huge_pages(entry)
                with torch.no_grad():
                    new.copy_(old)
                new = nn.Parameter(new, requires_grad=old.requires_grad)
                for twin in (n for n, p in params.items() if p.data_ptr() == old.data_ptr()):  # a tied lm_head too
                    owner, _, attr = twin.rpartition(".")
                    setattr(self.model.get_submodule(owner), attr, new)
                release_pages(mapping, entry)
        except BaseException as e:  # the model keeps working from the mapping; say why it stayed there
            self.error = e
        finally:
            self.ready.set()


def release_pages(mapping: mmap.mmap, entry: TensorEntry) -> None:
    """Drop this process's pages of a tensor's whole pages in the mapping (its RSS shrinks back to the copies)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return
    start = -(-entry.start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: the edges may hold a neighbour
    end = entry.end // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
