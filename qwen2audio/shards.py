"""Writing safetensors files and the Hub's shard layout, with plain file writes: every failure is an OSError that
names its cause (a full disk is ENOSPC), each file is created new (never over another) and synced before the
folder that holds it is put in place.

A .safetensors file is an 8-byte little-endian header length, a JSON header (`{key: {"dtype", "shape",
"data_offsets"}}` with offsets from the end of the header, plus "__metadata__"), padded with spaces to a multiple of
8 bytes, then the tensors' bytes one after another: what safetensors' save_file writes and checkpoint.read_header
reads.
"""

import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import DTYPES, INDEX_FILE, SINGLE_FILE
from .errors import WeightsError
from .folder_swap import step

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def safetensors_header(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """The length prefix and the padded JSON header for tensors laid out in the dict's order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """A new .safetensors file (an existing one is an error, never overwritten), synced to disk. Little-endian
    machines only, as the format (x86-64 and arm64)."""
    with open(path, "xb") as f:
        f.write(safetensors_header(tensors, metadata))
        for tensor in tensors.values():
            f.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, raw: dict) -> None:
    with open(path, "x") as f:
        f.write(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def write_shards(folder: Path, tensors: Iterable[tuple[str, Tensor]], max_shard_size: int) -> None:
    """Fill shards in order, starting a new one when the next tensor would overflow (a bigger tensor gets its own),
    then name them: one shard is `model.safetensors`, several are `model-i-of-n` with an index."""
    shards: list[list[str]] = []  # the keys of each written shard
    shard: dict[str, Tensor] = {}

    def flush() -> None:  # written under a temporary name until the number of shards is known
        write_safetensors(folder / f"shard-{len(shards)}.partial", shard, {"format": "pt"})
        step(f"shard-{len(shards)}-written")
        shards.append(list(shard))
        shard.clear()

    size = total = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_size:
            flush()
            size = 0
        shard[key] = tensor
        size, total = size + nbytes, total + nbytes
    if shard:
        flush()
    if not shards:
        raise WeightsError("there are no tensors to write")
    if len(shards) == 1:  # what transformers writes too: one file, no index
        (folder / "shard-0.partial").rename(folder / SINGLE_FILE)
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"shard-{i}.partial").rename(folder / name)
        weight_map.update(dict.fromkeys(keys, name))
    write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def shard_overhead(n_tensors: int, key_bytes: int) -> int:
    """An upper bound on the bytes besides tensor data: headers, the index, config and small files' slack."""
    return 200 * n_tensors + 2 * key_bytes + (1 << 20)
