"""Loading a checkpoint into a model: build it on the meta device (shapes, no memory), assemble a state dict from
the checkpoint's files (checkpoint.py reads them) and make those tensors the model's own with
`load_state_dict(strict=True, assign=True)`. The weights are never held twice, and nothing stays mapped unless
asked (mmap=True).

The model may be ours or one you built yourself (a subclass, a replaced module, an added head): names are checked
strictly, and parameters the checkpoint lacks are an error unless you allow them by name.
"""

import fnmatch
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .checkpoint import (HUGE_PAGE_MIN_BYTES, INDEX_FILE, TensorEntry, checkpoint_shards, map_file, mapped_tensor,
                         read_header, read_json_file, read_rows, read_tensor)
from .config import Qwen2AudioConfig
from .errors import WeightsError
from .model import Qwen2AudioForConditionalGeneration
from .quantize import QUANTIZE_BLOCK_ROWS, Int8Linear, check_quantize, int8_module_names, quantize_weight

# config.json `quantization_config.quant_method` of folders holding int8 decoder linears (written by convert.py).
INT8_QUANT_METHOD = "qwen2audio_int8"
# config.json key of a folder saved from a model whose modules were changed (save(..., allow_changed=True)).
CHANGED_MARKER = "qwen2audio_changed_model"
LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"
READ_THREADS = 4  # page faults and copies of several tensors at once (2 threads: 2x faster here)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto" or dtype in _DTYPES.values():
        return None if dtype == "auto" else dtype
    if dtype not in _DTYPES:
        raise WeightsError(f"unknown dtype {dtype!r}; use one of bfloat16, float16, float32 or auto")
    return _DTYPES[dtype]


def is_int8_checkpoint(folder: Path, ours: bool = True) -> bool:
    """Whether config.json declares the weight-only int8 layout of convert.py (int8 `X.weight` + `X.scales`).
    For our own model (ours=True), a folder saved from a changed model is an error that says how to load it."""
    raw = read_json_file(folder / "config.json") if (folder / "config.json").is_file() else {}
    raw = raw if isinstance(raw, dict) else {}
    changed = raw.get(CHANGED_MARKER)
    if ours and changed is not None:
        name = changed.get("class") if isinstance(changed, dict) else changed
        raise WeightsError(f"{folder} was saved from a changed model ({name!s:.100}): build that model and load the "
                           "folder into it with qwen2audio.load_model(path, model=...)")
    quant = raw.get("quantization_config")
    if quant is not None and (not isinstance(quant, dict) or quant.get("quant_method") != INT8_QUANT_METHOD):
        raise WeightsError(f"{folder / 'config.json'} declares quantization_config {quant}; qwen2audio reads only "
                           f"its own int8 format ({INT8_QUANT_METHOD!r}): use the unquantized checkpoint")
    return quant is not None


class SkipInit(TorchFunctionMode):
    """Inside `with SkipInit():`, the random fills of parameter init (normal_, uniform_, ...) do nothing.

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
    """Our model on the meta device: shapes only, no memory, no random init."""
    with torch.device("meta"), SkipInit():
        return Qwen2AudioForConditionalGeneration(config)


def swap_in_int8(model: nn.Module) -> None:
    """Replace the decoder's nn.Linear layers by Int8Linear placeholders on the meta device, so that names, shapes
    and assignment see int8 weights + scales."""
    for name in int8_module_names(model):
        parent, _, child = name.rpartition(".")
        linear = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, Int8Linear(linear.in_features, linear.out_features,
                                                               linear.bias is not None, linear.weight.dtype, "meta"))


class Job(NamedTuple):
    """How to make one state-dict tensor: from `entry` of the shard, converted to `dtype`, int8 if `quantize`."""
    name: str
    entry: TensorEntry
    dtype: torch.dtype
    quantize: bool


def _describe(keys: set[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _count_layers(keys: set[str], prefix: str) -> int:
    return len({k[len(prefix):].split(".")[0] for k in keys if k.startswith(prefix)})


def check_layer_counts(config: Qwen2AudioConfig, keys: set[str], folder: Path) -> None:
    """Before building anything: a config whose layer counts the files do not hold is an error (a config of a
    million layers would otherwise take minutes to build before its keys are found missing)."""
    for what, n, prefix in (("decoder", config.text_config.num_hidden_layers, "language_model.model.layers."),
                            ("encoder", config.audio_config.encoder_layers, "audio_tower.layers.")):
        if n != _count_layers(keys, prefix):
            raise WeightsError(f"config.json in {folder} declares {n} {what} layers but the checkpoint holds "
                               f"{_count_layers(keys, prefix)}; the config and the weights are not from one model")


def plan_reads(model: nn.Module, shards: dict[Path, list[str]], dtype: torch.dtype | None, quantize_now: bool,
               allow_missing: tuple[str, ...], folder: Path) -> tuple[dict[Path, list[Job]], bool]:
    """Per shard, the tensors to read and how, and whether the lm_head is tied to the embedding and not stored;
    every name and shape is checked against the model first."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    quantized = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Int8Linear)} if quantize_now \
        else set()
    needed = set(expected) - {k.removesuffix("weight") + "scales" for k in quantized}
    found = {k for keys in shards.values() for k in keys}
    # A tied lm_head may be left out of the file: it is then the embedding's tensor.
    tied = model.language_model.lm_head.weight.shape == expected.get(EMBED) and LM_HEAD not in found and \
        EMBED in found and getattr(model, "cfg").text_config.tie_word_embeddings
    allowed = {k for k in needed - found if any(fnmatch.fnmatchcase(k, p) for p in allow_missing)}
    missing, unexpected = needed - found - allowed - ({LM_HEAD} if tied else set()), found - needed
    if missing or unexpected:
        parts = [f"missing keys: {_describe(missing)}" if missing else "",
                 f"unexpected keys: {_describe(unexpected)}" if unexpected else ""]
        raise WeightsError(f"checkpoint {folder} does not match the model ({'; '.join(p for p in parts if p)}); "
                           "is this a Qwen2-Audio checkpoint with its own config.json? (a model you changed can "
                           "allow its new parameters with allow_missing=[...])")
    jobs: dict[Path, list[Job]] = {}
    for path, keys in shards.items():
        header = read_header(path)
        absent = set(keys) - set(header)
        if absent:
            raise WeightsError(f"{path.name} lacks {_describe(absent)}, which {INDEX_FILE} places there; "
                               "the shard is incomplete or from another checkpoint")
        for key in keys:
            entry = header[key]
            if entry.shape != expected[key]:
                raise WeightsError(f"{path.name}: tensor {key} has shape {entry.shape}, the model expects "
                                   f"{expected[key]} (config.json disagrees with the weights)")
            target = dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype
            for name in [key, LM_HEAD] if tied and key == EMBED and LM_HEAD in quantized else [key]:
                jobs.setdefault(path, []).append(Job(name, entry, target, name in quantized))  # int8: its own copy
    return jobs, tied and LM_HEAD not in quantized


def quantize_rows(f, entry: TensorEntry, path: Path, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only int8 of a (out, in) weight read from the file a block of rows at a time, each block first cast to
    `dtype`: equal to quantize_weight on the whole cast matrix (each row has its own scale), so quantizing while
    loading gives what quantizing the loaded model gives."""
    q = torch.empty(entry.shape, dtype=torch.int8)
    scales = torch.empty(entry.shape[0], dtype=torch.float32)
    for start in range(0, entry.shape[0], QUANTIZE_BLOCK_ROWS):
        stop = min(start + QUANTIZE_BLOCK_ROWS, entry.shape[0])
        q[start:stop], scales[start:stop] = quantize_weight(read_rows(f, entry, path, start, stop).to(dtype))
    return q, scales


def read_shard(path: Path, jobs: list[Job], device: torch.device, map_files: bool,
               mapped: list | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one shard. On CPU in the file's dtype: read by a few threads at once (or mapped, each
    mapped one recorded in `mapped` as (name, mapping, entry)); otherwise one at a time, converted (cast, moved or
    quantized) and the original freed before the next."""
    state: dict[str, torch.Tensor] = {}
    as_is = [j for j in jobs if device.type == "cpu" and j.dtype == j.entry.dtype and not j.quantize]
    with open(path, "rb") as f:
        for job in (j for j in jobs if j not in as_is):
            if job.quantize:
                q, scales = quantize_rows(f, job.entry, path, job.dtype)
                state[job.name], state[job.name.removesuffix("weight") + "scales"] = q.to(device), \
                    scales.to(device, job.dtype)
            else:
                state[job.name] = read_tensor(f, job.entry, path).to(device, job.dtype)
        if map_files:  # large tensors over the mapped file; small ones (or unaligned) read
            mapping = map_file(path)
            big = [j for j in as_is if j.entry.end - j.entry.start >= HUGE_PAGE_MIN_BYTES]
            state.update({j.name: t for j in big if (t := mapped_tensor(mapping, j.entry)) is not None})
            if mapped is not None:
                mapped += [(j.name, mapping, j.entry) for j in big if j.name in state]
            as_is = [j for j in as_is if j.name not in state]
        with ThreadPoolExecutor(READ_THREADS if hasattr(os, "preadv") else 1) as pool:
            state.update(zip((j.name for j in as_is), pool.map(lambda j: read_tensor(f, j.entry, path), as_is)))
    return state


def materialize_new(model: nn.Module, names: set[str], device: torch.device, dtype: torch.dtype | None) -> None:
    """Parameters the checkpoint does not hold (allowed by name): kept as built, or, still on the meta device,
    made real and initialised by their module's reset_parameters()."""
    by_module: dict[str, set[str]] = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        by_module.setdefault(module_name, set()).add(attr)
    for module_name, attrs in by_module.items():
        module = model.get_submodule(module_name)
        own = {n for n, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
               if t.is_meta}
        if not own:
            continue  # built on a real device: keeps the values it was built with
        if own - attrs or not hasattr(module, "reset_parameters"):
            raise WeightsError(f"new parameters of {module_name or 'the model'} ({', '.join(sorted(own))}) are on "
                               "the meta device and cannot be initialised: give them a module of their own with a "
                               "reset_parameters() method, or build the model on a real device")
        module.to_empty(device=device, recurse=False)
        module.reset_parameters()
        if dtype is not None:
            module.to(dtype)


def _progress_bar(total: int, folder: Path):
    """A tqdm bar on stderr while shards load, only when stderr is a terminal (tqdm comes with huggingface_hub)."""
    import sys

    if not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=f"Loading {folder.name}", unit="tensor", leave=False)


def load_weights(folder: str | Path, config: Qwen2AudioConfig | None = None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", progress: bool = False, quantize: str | None = None,
                 map_files: bool = False, model: nn.Module | None = None,
                 allow_missing: tuple[str, ...] = (), mapped: list | None = None) -> nn.Module:
    """Fill `model` (by default ours, built from config.json on the meta device) from the folder's safetensors.

    dtype casts floating tensors (None keeps the file's); quantize="int8" quantizes the decoder's linear weights as
    they are read, so the full-precision decoder is never in memory; map_files=True maps the files instead of
    reading tensors of 2 MB and more (load() returns at once, decoding is slower, the files must not change), and
    records them in `mapped` when given (resident.py can then move them into memory in the background).
    A model you built: on the meta device (`with torch.device("meta"):`) nothing is allocated twice; every name it
    has must be in the checkpoint except those matching an `allow_missing` pattern (fnmatch, e.g. "head.*").
    """
    folder = Path(folder)
    check_quantize(quantize)
    config, dtype, device = config or Qwen2AudioConfig.from_file(folder), parse_dtype(dtype), torch.device(device)
    shards = checkpoint_shards(folder)
    check_layer_counts(config, {k for keys in shards.values() for k in keys}, folder)
    int8_file = is_int8_checkpoint(folder, ours=model is None)
    model = meta_model(config) if model is None else model
    if int8_file or quantize == "int8":
        swap_in_int8(model)
    jobs, tied = plan_reads(model, shards, dtype, quantize == "int8" and not int8_file, allow_missing, folder)
    bar, state = _progress_bar(len(jobs), folder) if progress else None, {}
    for path, shard_jobs in jobs.items():
        state.update(read_shard(path, shard_jobs, device, map_files, mapped))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if tied:
        state[LM_HEAD] = state[EMBED]
    new = set(model.state_dict()) - set(state)
    model.load_state_dict(state, strict=not new, assign=True)
    materialize_new(model, new, device, dtype)
    return model
