"""Checkpoint loading: Hub safetensors (single file or sharded), strict names, meta-device build, no pickle.

The model is built on the meta device (no memory) and each parameter is assigned a tensor read from its shard:
- on CPU in the file's dtype, straight into its final memory, tensors of 2 MB and more on transparent huge pages
  (decoding streams weights ~25% faster at batch 1 and ~40% at batch 8 from 2 MB pages than from the 4 kB pages of
  a memory-mapped file, as transformers uses), read by a few threads at once;
- otherwise (a cast, another device, or int8 quantization while loading) one tensor (for int8, one block of rows)
  at a time, converted and freed before the next.
Either way the weights are never held twice, and nothing stays mapped: the files may change once load() returns.
load(..., mmap=True) maps the files instead (see load_weights).
"""

import json
import math
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from torch.overrides import TorchFunctionMode

from .config import Qwen2AudioConfig
from .errors import WeightsError
from .model import Qwen2AudioForConditionalGeneration
from .quantize import QUANTIZE_BLOCK_ROWS, check_quantize, Int8Linear, int8_module_names, quantize_weight

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# config.json `quantization_config.quant_method` of folders holding int8 decoder linears (written by convert.py).
INT8_QUANT_METHOD = "qwen2audio_int8"

# Files a model folder needs for qwen2audio (weights are found through the index or the single file).
MODEL_FILES = ["config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
               "tokenizer_config.json", "vocab.json", "merges.txt", INDEX_FILE, "*.safetensors"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in _DTYPES:
        raise WeightsError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32 or auto")
    return _DTYPES[dtype]


def checkpoint_shards(folder: Path) -> dict[Path, list[str]]:
    """Map each safetensors file of the folder to the keys it holds (read from the index or the file headers)."""
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index} is not a valid safetensors index ({e!r})") from None
        shards: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            shards.setdefault(folder / name, []).append(key)
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise WeightsError(f"{folder} is missing shard(s) {', '.join(sorted(missing))} listed in {INDEX_FILE}; "
                               "download the complete checkpoint")
        return shards
    single = folder / SINGLE_FILE
    if single.is_file():
        return {single: list(read_header(single))}
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise WeightsError(f"{folder} holds only pickle checkpoints (.bin/.pt), which qwen2audio never loads; "
                           "use the safetensors files of the Hub repo")
    raise WeightsError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}; a model folder needs its safetensors weights")


def is_int8_checkpoint(folder: Path) -> bool:
    """Whether config.json declares the weight-only int8 layout of convert.py (int8 `X.weight` + `X.scales`)."""
    try:
        quant = json.loads((folder / "config.json").read_text()).get("quantization_config")
    except (OSError, json.JSONDecodeError):
        return False  # Qwen2AudioConfig.from_file reports an unreadable config.json
    if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != INT8_QUANT_METHOD):
        raise WeightsError(f"{folder / 'config.json'} declares quantization_config {quant}; qwen2audio reads only "
                           f"its own int8 format ({INT8_QUANT_METHOD!r}): use the unquantized checkpoint")
    return quant is not None


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
LM_HEAD = "language_model.lm_head.weight"
HUGE_PAGE_MIN_BYTES = 2 << 20  # the size of one transparent huge page on x86-64 and arm64
READ_THREADS = 4  # page faults and copies of several tensors at once (2 threads: 2x faster here)
EMBED = "language_model.model.embed_tokens.weight"


class TensorEntry(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensor table of a .safetensors file: an 8-byte little-endian header length, then a JSON header.

    Offsets are checked against the file size here, so a truncated or corrupt file is an error before any read.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if not 2 <= length <= size - 8:
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            raw = json.loads(f.read(length))
        table = {}
        for key, info in raw.items():
            if key == "__metadata__":
                continue
            start, end = (8 + length + int(o) for o in info["data_offsets"])
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            if not 8 + length <= start <= end <= size or end - start != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key} lies outside the file or has the wrong byte size")
            table[key] = TensorEntry(dtype, shape, start, end)
        return table
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"cannot read {path}: {e}; the file may be truncated or corrupt") from None


def read_tensor(f: BinaryIO, entry: TensorEntry, path: Path) -> torch.Tensor:
    """Read one tensor with plain file reads straight into its own memory (nothing stays mapped)."""
    return read_rows(f, entry, path, 0, entry.shape[0] if entry.shape else 1).view(entry.shape)


def read_rows(f: BinaryIO, entry: TensorEntry, path: Path, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of a tensor's first dimension, (stop - start, *rest), read from the file (a 0-d tensor is one
    row)."""
    row_shape = entry.shape[1:]
    tensor = torch.empty((stop - start, *row_shape), dtype=entry.dtype)
    if tensor.numel():
        offset = entry.start + start * math.prod(row_shape) * entry.dtype.itemsize
        pread_into(f, memoryview(tensor.view(-1).view(torch.uint8).numpy()), offset, path)
    return tensor


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


def empty_on_huge_pages(entry: TensorEntry) -> torch.Tensor:
    """Uninitialized memory for the tensor: for 2 MB and more, an anonymous mapping marked for transparent huge
    pages (freed with the tensor), else torch.empty."""
    size = entry.end - entry.start
    if size < HUGE_PAGE_MIN_BYTES or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.empty(entry.shape, dtype=entry.dtype)
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=entry.dtype, count=math.prod(entry.shape)).view(entry.shape)


def map_file(path: Path) -> mmap.mmap:
    """The whole file mapped copy-on-write (load(mmap=True)): reads come from the page cache when first touched,
    writes stay in this process."""
    try:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError) as e:
        raise WeightsError(f"cannot map {path}: {e}") from None


def mapped_tensor(mapping: mmap.mmap, entry: TensorEntry) -> torch.Tensor | None:
    """A tensor over the entry's bytes in the mapping, no copy (it keeps the mapping alive); None when the data is
    not aligned to its element size (safetensors aligns them; a hand-made file might not) or is empty."""
    numel = math.prod(entry.shape)
    if numel == 0 or entry.start % entry.dtype.itemsize:
        return None
    return torch.frombuffer(mapping, dtype=entry.dtype, count=numel, offset=entry.start).view(entry.shape)


def read_direct(f: BinaryIO, entry: TensorEntry, path: Path) -> torch.Tensor:
    """One tensor read from the file into memory of its own (on huge pages when large)."""
    tensor = empty_on_huge_pages(entry)
    if tensor.numel():
        pread_into(f, memoryview(tensor.view(-1).view(torch.uint8).numpy()), entry.start, path)
    return tensor


def quantize_rows(f: BinaryIO, entry: TensorEntry, path: Path,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 of a (out, in) weight read from the file a block of rows at a time, each block first cast to
    `dtype`: (int8 (out, in), float32 scales (out,)), equal to quantize_weight on the whole cast matrix (each row
    has its own scale), so quantizing while loading gives what quantizing the loaded model gives."""
    q = torch.empty(entry.shape, dtype=torch.int8)
    scales = torch.empty(entry.shape[0], dtype=torch.float32)
    for start in range(0, entry.shape[0], QUANTIZE_BLOCK_ROWS):
        stop = min(start + QUANTIZE_BLOCK_ROWS, entry.shape[0])
        q[start:stop], scales[start:stop] = quantize_weight(read_rows(f, entry, path, start, stop).to(dtype))
    return q, scales


def _describe(keys: set[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _progress_bar(total: int, folder: Path):
    """A tqdm bar on stderr while tensors load, only when stderr is a terminal (tqdm comes with huggingface_hub)."""
    import sys

    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"Loading {folder.name}", unit="tensor", leave=False)


class SkipInit(TorchFunctionMode):
    """Inside `with SkipInit():`, the in-place random fills of parameter init (normal_, uniform_, ...) do nothing.

    For building a model on the meta device, whose values a checkpoint replaces anyway: the first normal_() on a
    meta tensor imports torch._dynamo (~2 s of a first load). Like `torch.device(...)`, a torch function mode
    lives on the current thread's stack only: no other thread, and nothing outside the block, sees it.
    """

    FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.nn.init.normal_, torch.nn.init.uniform_,
             torch.nn.init.kaiming_uniform_, torch.nn.init.trunc_normal_}  # what nn modules' reset_parameters call

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FILLS:
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def meta_model(config: Qwen2AudioConfig) -> Qwen2AudioForConditionalGeneration:
    """The model on the meta device: shapes only, no memory, no random init."""
    with torch.device("meta"), SkipInit():
        return Qwen2AudioForConditionalGeneration(config)


def load_weights(folder: str | Path, config: Qwen2AudioConfig | None = None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", progress: bool = False, quantize: str | None = None,
                 map_files: bool = False) -> Qwen2AudioForConditionalGeneration:
    """Build the model on the meta device and fill it from the folder's safetensors, strictly by name.

    map_files=True (`load(..., mmap=True)`) maps the files instead of reading the weights kept in the file's dtype
    on CPU (tensors of 2 MB and more): load() returns at once and pages come in when first used, as with
    transformers, but decoding reads them from 4 kB page-cache pages (measured ~20-40% slower here), and the files
    must not be overwritten in place while the model lives.

    quantize="int8" quantizes the decoder's linear weights as they are read (what `quantize.quantize_int8` does to a
    built model, with the same values), so the full-precision decoder is never in memory.
    """
    folder = Path(folder)
    config = config or Qwen2AudioConfig.from_file(folder)
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    check_quantize(quantize)
    model = meta_model(config)
    int8_file = is_int8_checkpoint(folder)
    quantize_now = quantize == "int8" and not int8_file  # an int8 folder is already quantized
    # The keys the files must hold: plain names, or for an int8 folder each decoder linear's int8 weight + scales.
    quantized = {f"{name}.weight" for name in int8_module_names(model)} if quantize_now else set()
    if int8_file or quantize_now:  # swap in Int8Linear (still on meta): names, shapes and assignment see int8 + scales
        before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for name in int8_module_names(model):
            parent, _, child = name.rpartition(".")
            linear = model.get_submodule(name)
            setattr(model.get_submodule(parent), child, Int8Linear(
                linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, "meta"))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if quantize_now:
        expected = before

    shards = checkpoint_shards(folder)
    found = {k for keys in shards.values() for k in keys}
    # A tied lm_head may be left out of the file (transformers writes it anyway; an int8 lm_head is always stored).
    tied = config.text_config.tie_word_embeddings and LM_HEAD not in found and not int8_file
    missing, unexpected = set(expected) - found - ({LM_HEAD} if tied else set()), found - set(expected)
    if missing or unexpected:
        parts = [f"missing keys: {_describe(missing)}" if missing else "",
                 f"unexpected keys: {_describe(unexpected)}" if unexpected else ""]
        raise WeightsError(f"checkpoint {folder} does not match config.json ({'; '.join(p for p in parts if p)}); "
                           "is this a Qwen2-Audio checkpoint with its own config.json?")

    state: dict[str, torch.Tensor] = {}
    bar = _progress_bar(len(found), folder) if progress else None
    for path, keys in shards.items():
        header = read_header(path)
        absent = set(keys) - set(header)
        if absent:
            raise WeightsError(f"{path.name} lacks {_describe(absent)}, which {INDEX_FILE} places there; "
                               "the shard is incomplete or from another checkpoint")
        direct: list[tuple[str, TensorEntry]] = []  # read as they are, several at a time, after the loop
        with open(path, "rb") as f:
            for key in keys:
                entry = header[key]
                if entry.shape != expected[key]:
                    raise WeightsError(f"{path.name}: tensor {key} has shape {entry.shape}, config.json implies "
                                       f"{expected[key]}")
                queued = len(direct)
                for name in [key, LM_HEAD] if tied and key == EMBED else [key]:
                    target = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
                    if name in quantized:
                        q, scales = quantize_rows(f, entry, path, target)
                        state[name] = q.to(device)
                        state[name.removesuffix("weight") + "scales"] = scales.to(device, target)
                    elif tied and name == LM_HEAD:
                        continue  # shares the embedding's tensor, set below
                    elif device.type == "cpu" and target == entry.dtype:
                        direct.append((name, entry))
                    else:  # a cast or another device: read, convert, free
                        state[name] = read_tensor(f, entry, path).to(device, target)
                if bar is not None and len(direct) == queued:  # done; a queued tensor counts once read
                    bar.update(1)
            if map_files and direct:
                mapping = map_file(path)
                for name, entry in direct:
                    tensor = mapped_tensor(mapping, entry) if entry.end - entry.start >= HUGE_PAGE_MIN_BYTES else None
                    state[name] = tensor if tensor is not None else read_direct(f, entry, path)
                    if bar is not None:
                        bar.update(1)
                direct = []
            with ThreadPoolExecutor(READ_THREADS if hasattr(os, "preadv") else 1) as pool:
                for (name, _), tensor in zip(direct, pool.map(lambda job: read_direct(f, job[1], path), direct)):
                    state[name] = tensor
                    if bar is not None:
                        bar.update(1)
    if bar is not None:
        bar.close()
    if tied and LM_HEAD not in state:  # not quantized on its own: the same tensor as the embedding
        state[LM_HEAD] = state[EMBED]
    model.load_state_dict(state, strict=True, assign=True)
    return model
