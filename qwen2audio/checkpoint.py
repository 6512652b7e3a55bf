"""Reading a checkpoint folder's safetensors files: the index, each file's header, and tensors read or mapped.

A .safetensors file is an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the raw bytes. Everything a header or an index declares is checked before any tensor is read, so a
truncated, corrupt or hostile file is a WeightsError naming it, never a foreign exception, a huge allocation or two
tensors sharing bytes. Tensors are read with positioned reads straight into their own memory (large ones on
transparent huge pages), or mapped copy-on-write (load(mmap=True)).
"""

import math
import mmap
import os
import struct
import threading
import weakref
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch

from .errors import WeightsError
from .files import open_regular, parse_json, present, read_json_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a model folder needs for qwen2audio (weights are found through the index or the single file).
MODEL_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "vocab.json", "merges.txt", INDEX_FILE, "*.safetensors"]
MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit on a header
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
HUGE_PAGE_MIN_BYTES = 2 << 20  # the size of one transparent huge page on x86-64 and arm64


class TensorEntry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def _entry(key: str, info: object, base: int) -> TensorEntry:
    """One header entry, every field checked for type and range."""
    def ints(value: object, n: int | None) -> bool:
        return isinstance(value, list) and (n is None or len(value) == n) and \
            all(type(v) is int and v >= 0 for v in value)
    if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) or info["dtype"] not in DTYPES or \
            not ints(info.get("shape"), None) or \
            not ints(info.get("data_offsets"), 2) or info["data_offsets"][0] > info["data_offsets"][1]:
        raise ValueError(f"tensor {key!r} has a malformed entry (dtype, shape, data_offsets)")
    dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
    start, end = (base + o for o in info["data_offsets"])
    if end - start != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {key!r}: {end - start} bytes do not hold a {info['dtype']} tensor of shape {shape}")
    return TensorEntry(dtype, shape, start, end)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of a .safetensors file, checked against the file: every tensor inside it, no two sharing
    bytes."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 2 <= length <= min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"its header length does not fit a file of {size} bytes")
            raw = parse_json(f.read(length), "its header")
        if not isinstance(raw, dict):
            raise ValueError("its header is not a JSON object")
        table = {key: _entry(key, info, 8 + length) for key, info in raw.items() if key != "__metadata__"}
        spans = sorted((e.start, e.end, k) for k, e in table.items() if e.end > e.start)
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:
                raise ValueError(f"tensors {a!r} and {b!r} overlap")
        if spans and spans[-1][1] > size:
            raise ValueError(f"tensor {spans[-1][2]!r} runs past the end of the file")
        return table
    except (OSError, ValueError) as e:
        reason = getattr(e, "strerror", None) or e
        raise WeightsError(f"cannot read {path}: {reason}; the file may be truncated or corrupt") from None


def _plain_file_name(name: object) -> bool:
    """A name of a file in a folder: no separator, not . or .., no NUL, at most 255 bytes in the file system's
    encoding (a longer one, or one it cannot encode, makes every file call fail)."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/\\\0"):
        return False
    try:
        return len(os.fsencode(name)) <= 255 and not Path(name).is_absolute()
    except UnicodeError:
        return False


def shard_path(folder: Path, name: object) -> Path:
    """A shard named by the index: a plain file name in the folder, never a path that leads out of it.

    A symlink in the folder is followed wherever it points (the Hugging Face cache keeps every file as a symlink
    into its blobs folder): the folder's owner made it, while an index can only name files."""
    if not _plain_file_name(name):
        raise WeightsError(f"{folder / INDEX_FILE} names the shard {name!r:.80}, which is not a plain file name in "
                           "the model folder; a shard must be a file beside the index")
    return folder / name


def checkpoint_shards(folder: Path) -> dict[Path, list[str]]:
    """Map each safetensors file of the folder to the keys it holds (read from the index or the file header)."""
    index = folder / INDEX_FILE
    if present(index):
        weight_map = read_json_file(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise WeightsError(f"{index} has no 'weight_map' object naming the shard of each tensor")
        shards: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            shards.setdefault(shard_path(folder, name), []).append(key)
        missing = [p.name for p in shards if not present(p)]
        if missing:
            raise WeightsError(f"{folder} is missing shard(s) {', '.join(sorted(missing))} listed in {INDEX_FILE}; "
                               "download the complete checkpoint")
        return shards
    single = folder / SINGLE_FILE
    if present(single):  # read_header refuses what is not a regular file
        return {single: list(read_header(single))}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise WeightsError(f"{folder} holds only pickle checkpoints (.bin/.pt), which qwen2audio never loads; "
                           "use the safetensors files of the Hub repo")
    raise WeightsError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; a model folder needs its safetensors weights")


# -- reading tensors ------------------------------------------------------------------------------------------------

def pread_into(f: BinaryIO, buffer: memoryview, offset: int, path: Path) -> None:
    """Fill buffer from the file at offset: positioned reads, so threads can share the file (where the OS has no
    preadv, the loader reads with one thread and this seeks)."""
    done = 0
    while done < len(buffer):
        if hasattr(os, "preadv"):
            n = os.preadv(f.fileno(), [buffer[done:]], offset + done)
        else:
            f.seek(offset + done)
            n = f.readinto(buffer[done:])
        if not n:
            raise WeightsError(f"cannot read {path}: the file ended inside a tensor; it may be truncated")
        done += n


def read_rows(f: BinaryIO, entry: TensorEntry, path: Path, start: int, stop: int,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows start:stop of a tensor's first dimension, (stop - start, *rest), read from the file (a 0-d tensor is one
    row), into `out` when given."""
    row_shape = entry.shape[1:]
    tensor = torch.empty((stop - start, *row_shape), dtype=entry.dtype) if out is None else out
    if tensor.numel():
        offset = entry.start + start * math.prod(row_shape) * entry.dtype.itemsize
        pread_into(f, memoryview(tensor.view(-1).view(torch.uint8).numpy()), offset, path)
    return tensor


def empty_on_huge_pages(entry: TensorEntry) -> torch.Tensor:
    """Uninitialized memory for the tensor: for 2 MB and more, an anonymous mapping marked for transparent huge
    pages (decoding streams weights ~25% faster from them than from 4 kB pages; freed with the tensor), else
    torch.empty."""
    size = entry.end - entry.start
    if size < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(entry.shape, dtype=entry.dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=entry.dtype, count=math.prod(entry.shape)).view(entry.shape)


def read_tensor(f: BinaryIO, entry: TensorEntry, path: Path) -> torch.Tensor:
    """One tensor read from the file into memory of its own (on huge pages when large)."""
    out = empty_on_huge_pages(entry)
    rows = entry.shape[0] if entry.shape else 1
    read_rows(f, entry, path, 0, rows, out.view(rows, *entry.shape[1:]))
    return out


class MappedFile:
    """A file mapped by map_file, as it was when mapped: its size and modification time, read again through a file
    descriptor of the same file (the same inode even if the path is replaced) to tell whether it changed."""

    def __init__(self, path: Path, fd: int, mapping: mmap.mmap) -> None:
        st = os.fstat(fd)
        self.path, self.fd, self.size, self.mtime_ns = path, fd, st.st_size, st.st_mtime_ns
        self.start = torch.frombuffer(mapping, dtype=torch.uint8, count=1).data_ptr()  # the mapping's addresses
        self.end = self.start + len(mapping)
        weakref.finalize(self, os.close, fd)

    def check(self) -> None:
        """A WeightsError if the file shrank (reading a page past its new end kills the process with SIGBUS) or was
        written since it was mapped (pages not yet read would hold the new bytes)."""
        st = os.fstat(self.fd)
        if st.st_size < self.size or st.st_mtime_ns != self.mtime_ns:
            change = f"was truncated ({self.size} -> {st.st_size} bytes)" if st.st_size < self.size else "was written"
            raise WeightsError(f"{self.path} {change} after the model mapped it (load(mmap=True)); reading its "
                               "weights now could crash the process (SIGBUS) or use other values: load the model "
                               "again, and do not change weight files while a model maps them")


_MAPPED: "weakref.WeakKeyDictionary[mmap.mmap, MappedFile]" = weakref.WeakKeyDictionary()  # live mappings
_MAPPED_LOCK = threading.Lock()


def map_file(path: Path) -> mmap.mmap:
    """The whole file mapped copy-on-write (load(mmap=True)): reads come from the page cache when first touched,
    writes stay in this process. The file must not shrink while mapped: reading a page past its new end is
    SIGBUS; `mapped_files` and MappedFile.check tell whether it did (see docs/reliability.md)."""
    try:
        with open_regular(path) as f:
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            record = MappedFile(path, os.dup(f.fileno()), mapping)
        with _MAPPED_LOCK:
            _MAPPED[mapping] = record
        return mapping
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot map {path}: {e}") from None


def mapped_files(tensors: list[torch.Tensor]) -> list[MappedFile]:
    """The mapped files that hold the data of any of these tensors (none unless loaded with mmap=True)."""
    with _MAPPED_LOCK:
        files = list(_MAPPED.values())
    pointers = [t.data_ptr() for t in tensors if t.device.type == "cpu"]
    return [m for m in files if any(m.start <= p < m.end for p in pointers)]


def mapped_tensor(mapping: mmap.mmap, entry: TensorEntry) -> torch.Tensor | None:
    """A tensor over the entry's bytes in the mapping, no copy (it keeps the mapping alive); None when the data is
    not aligned to its element size (safetensors aligns them; a hand-made file might not) or is empty."""
    numel = math.prod(entry.shape)
    if numel == 0 or entry.start % entry.dtype.itemsize:
        return None
    return torch.frombuffer(mapping, dtype=entry.dtype, count=numel, offset=entry.start).view(entry.shape)
