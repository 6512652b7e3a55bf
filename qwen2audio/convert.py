"""Write checkpoints in the Hub layout: cast, reshard and int8-quantize a folder (`convert`), or save a model (`save`).

The output is what transformers' `save_pretrained` writes: `model.safetensors` when everything fits in one shard,
otherwise `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes of all tensors}, "weight_map": {key: file}}`); config.json with its `dtype`;
the tokenizer, processor and generation files copied as they are. Only safetensors, JSON and the tokenizer's text
files are ever written (never pickle). Tensors stream one at a time, so the peak memory is one output shard plus
the largest tensor, not the model. The folder is built beside `dst` and put in place only when complete, in one
atomic step where the system allows (folder_swap.py says how, and what a killed run leaves); the disk space it needs
is checked first, and a full disk midway is a WeightsError with the partial output removed.

Weight-only int8 on disk (`quantize="int8"`, or saving a model swapped by `quantize.quantize_int8`): for every
nn.Linear of the decoder and the lm_head (`quantize.int8_module_names`), `X.weight` is int8 (out, in) and
`X.scales` (out,) is in the model dtype, with w ~= scales[:, None] * weight; biases stay in the model dtype.
config.json carries INT8_CONFIG, which `weights.load_weights` reads to build Int8Linear modules before loading.
transformers cannot load such a folder: it warns "Unknown quantization type", ignores the scales and would treat
the int8 codes as weights. Converting an int8 folder with a dtype (and no quantize) dequantizes it: each weight
becomes scales[:, None] * weight computed in float32, then cast to the dtype.
"""

import dataclasses
import errno
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .files import is_folder, read_json_file
from .convert_plan import plan_jobs
from .config import Qwen2AudioConfig
from .errors import ConfigError, WeightsError
from .folder_swap import check_replaceable, destination_lock, new_partial, put_in_place, recover, remove
from .memory import size_text
from .model import Qwen2AudioForConditionalGeneration
from .kernels.cpu import is_int8_layer
from .quantize import check_quantize, int8_module_names
from .shards import shard_overhead, write_json, write_shards
from .weights import CHANGED_MARKER, INT8_QUANT_METHOD, meta_model, parse_dtype, swap_in_int8

INT8_CONFIG = {"quant_method": INT8_QUANT_METHOD, "bits": 8, "group": "per_output_channel",
               "modules": "decoder_linear"}

# The files besides the weights that a model folder may hold; config.json is rewritten, these are copied as they are.
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
              "chat_template.jinja")
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota reached, file size limit

# Decimal units as transformers and huggingface_hub read them ("2GB" = 2e9 bytes); binary ones with an "i".
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(size: str | int) -> int:
    """'500MB', '2GB', '1.5GiB', '123456' or an int -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?)?B?\s*", str(size).upper())
    if isinstance(size, bool) or match is None or float(match[1]) <= 0:
        raise WeightsError(f"max shard size {size!r} is not a size; write e.g. 500MB, 2GB, 1.5GiB or a number of bytes")
    return max(1, int(float(match[1]) * _UNITS[match[2] or ""]))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # torch.bfloat16 -> "bfloat16", as config.json writes it


def set_config_dtype(raw: dict, dtype: torch.dtype) -> dict:
    """Declare `dtype` where transformers 5 writes it (top level and sub-configs); update any legacy `torch_dtype`."""
    for part in (raw, raw.get("text_config"), raw.get("audio_config")):
        if isinstance(part, dict):
            part["dtype"] = dtype_name(dtype)
            if "torch_dtype" in part:
                part["torch_dtype"] = dtype_name(dtype)
    return raw


def config_dict(cfg: Qwen2AudioConfig) -> dict:
    """A config.json that transformers 5 (and qwen2audio) read back as `cfg`."""
    text = {k: v for k, v in dataclasses.asdict(cfg.text_config).items() if v is not None}  # drops rope_scaling=None
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.text_config.rope_theta}  # transformers 5
    text.update(model_type="qwen2", use_sliding_window=False)
    audio = {"model_type": "qwen2_audio_encoder", **dataclasses.asdict(cfg.audio_config)}
    return {"architectures": ["Qwen2AudioForConditionalGeneration"], "model_type": "qwen2_audio",
            "audio_token_index": cfg.audio_token_index, "audio_config": audio, "text_config": text}


@contextmanager
def fresh_folder(dst: Path, force: bool, needed: int) -> Iterator[Path]:
    """Yield an empty hidden folder beside `dst`; when the block succeeds it takes dst's name (folder_swap.py), when
    it fails it is deleted. Holds dst's lock throughout, first cleans up what a killed run left (with a warning),
    refuses a destination it may not replace, and checks that `needed` bytes fit on the disk."""
    with writing_errors(dst, needed):
        check_replaceable(dst, force)
        dst.parent.mkdir(parents=True, exist_ok=True)
        with destination_lock(dst):
            recover(dst)
            was_empty = dst.is_dir() and not check_replaceable(dst, force)
            free = shutil.disk_usage(dst.parent).free
            if needed > free:
                raise WeightsError(f"writing {dst} needs about {size_text(needed)} ({needed} bytes) but the disk "
                                   f"holding {dst.parent} has {size_text(free)} free; free some space or write "
                                   "elsewhere")
            tmp = new_partial(dst)
            try:
                yield tmp
                put_in_place(tmp, dst, force, was_empty)
            except BaseException:
                remove(tmp)  # the partial output (or, after an exchange, the old folder)
                raise


@contextmanager
def writing_errors(dst: Path, needed: int) -> Iterator[None]:
    """OSErrors while writing dst become WeightsErrors: a full disk names the bytes the output needs."""
    try:
        yield
    except OSError as e:
        where = e.filename or dst
        if e.errno in NO_ROOM:
            raise WeightsError(f"no room to write {where} ({e.strerror}): the output needs about "
                               f"{size_text(needed)} ({needed} bytes); the partial output was removed") from None
        raise WeightsError(f"cannot write {where}: {e.strerror or e}") from None


def check_paths(src: Path, dst: Path) -> None:
    """The source must be a folder that neither is the destination nor holds it, nor lies inside it."""
    if not is_folder(src):
        raise WeightsError(f"source folder {src} does not exist or cannot be entered")
    s, d = src.resolve(), dst.resolve()
    if s == d or dst.exists() and os.path.samefile(src, dst):
        raise WeightsError(f"{dst} is the source folder itself; write the converted model to another folder")
    if s.is_relative_to(d):
        raise WeightsError(f"{dst} contains the source {src}; write the converted model elsewhere")
    if d.is_relative_to(s):
        raise WeightsError(f"{dst} is inside the source folder {src}; write the converted model elsewhere")


def copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def side_files_bytes(src: Path) -> int:
    return sum((src / name).stat().st_size for name in SIDE_FILES if (src / name).is_file())


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None, quantize: str | None = None,
            max_shard_size: str | int = "2GB", force: bool = False) -> Path:
    """Copy the checkpoint folder `src` to `dst`: floating tensors cast to `dtype` (None keeps them), the decoder's
    linear weights int8 if quantize="int8", in shards of at most `max_shard_size` (one bigger tensor gets its own).
    An int8 folder given a dtype and no quantize is dequantized to that dtype."""
    src, dst = Path(src), Path(dst)
    target, limit = parse_dtype(dtype), parse_size(max_shard_size)
    check_quantize(quantize)
    check_paths(src, dst)
    config = Qwen2AudioConfig.from_file(src)
    raw = read_json_file(src / "config.json", "config.json", ConfigError)
    jobs = plan_jobs(src, config, target, quantize)
    if quantize == "int8":
        raw["quantization_config"] = INT8_CONFIG
    elif target is not None and any(job.scales for job in jobs):
        raw.pop("quantization_config", None)  # dequantized: a plain checkpoint again
    needed = sum(job.nbytes() for job in jobs) + shard_overhead(len(jobs), sum(len(j.key) for j in jobs)) + \
        side_files_bytes(src)
    with fresh_folder(dst, force, needed) as tmp:
        write_shards(tmp, (item for job in jobs for item in job.tensors()), limit)
        write_json(tmp / "config.json", set_config_dtype(raw, target) if target is not None else raw)
        copy_side_files(src, tmp)
    return dst


def architecture_changes(model: Qwen2AudioForConditionalGeneration, quantized: bool) -> list[str]:
    """How the model's weights differ from those of the model its config describes: names added, missing, or of
    another shape (empty for a model whose values alone were edited)."""
    reference = meta_model(model.cfg)
    if quantized:
        swap_in_int8(reference)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    return [f"added {k}" for k in ours if k not in expected] + [f"missing {k}" for k in expected if k not in ours] + \
        [f"{k} is {ours[k]}, not {expected[k]}" for k in ours if k in expected and ours[k] != expected[k]]


def saved_config(model: Qwen2AudioForConditionalGeneration, config: str | Path | None,
                 allow_changed: bool) -> tuple[dict, Path | None]:
    """(the config.json to write for `model`, the folder its other files come from): derived from model.cfg, or
    taken from `config`'s folder; marked int8 or changed as the model is (see `save`)."""
    quantized = any(is_int8_layer(m) for m in model.language_model.modules())  # Int8Linear or the CPU's layer
    if quantized and int8_module_names(model):
        raise WeightsError(f"the model is partly int8 ({', '.join(int8_module_names(model)[:3])}... are not); "
                           "quantize all decoder linears with quantize_int8 or none")
    source = None
    if config is None:
        raw = config_dict(model.cfg)
    else:
        source = Path(config).parent if Path(config).is_file() else Path(config)
        declared = Qwen2AudioConfig.from_file(source)
        if (declared.audio_config, declared.text_config) != (model.cfg.audio_config, model.cfg.text_config):
            raise WeightsError(f"{source / 'config.json'} describes another architecture than the model; "
                               "pass config=None to write the model's own config")
        raw = read_json_file(source / "config.json", "config.json", ConfigError)
    raw.pop("quantization_config", None)
    if quantized:
        raw["quantization_config"] = INT8_CONFIG
    changes = architecture_changes(model, quantized)
    if changes and not allow_changed:
        raise WeightsError(f"the model's weights are not those its config describes ({'; '.join(changes[:4])}"
                           f"{'; ...' if len(changes) > 4 else ''}): neither qwen2audio.load() nor transformers could "
                           "load the folder. Pass allow_changed=True to write it anyway, and load it with "
                           "qwen2audio.load_model(path, model=YourModel(config))")
    raw.pop(CHANGED_MARKER, None)
    if changes:
        raw[CHANGED_MARKER] = {"class": f"{type(model).__module__}.{type(model).__qualname__}", "changes": changes}
    return raw, source


def save(model: Qwen2AudioForConditionalGeneration, dst: str | Path, max_shard_size: str | int = "2GB",
         config: str | Path | None = None, dtype: str | torch.dtype | None = None, force: bool = False,
         allow_changed: bool = False) -> Path:
    """Write `model` (possibly edited, possibly int8-quantized) as a Hub-layout folder that transformers loads
    (unless quantized) and qwen2audio loads.

    config.json is derived from `model.cfg`, or, given `config` (a model folder, e.g. `pipeline.path`), taken from
    that folder together with its tokenizer, processor and generation files. `dtype` casts the floating tensors.
    A model whose modules you changed (added, removed or reshaped weights) cannot be described by config.json, so
    it is refused unless allow_changed=True: the folder then records the change, and `load()` tells whoever opens
    it to build the changed model and load it with `load_model(path, model=...)`.
    """
    dst, limit = Path(dst), parse_size(max_shard_size)
    target = parse_dtype(dtype) or model.language_model.model.embed_tokens.weight.dtype
    raw, source = saved_config(model, config, allow_changed)
    state = model.state_dict()
    head = "language_model.lm_head.weight"
    tied = state[head].data_ptr() == state["language_model.model.embed_tokens.weight"].data_ptr()

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for key, tensor in state.items():
            tensor = tensor.detach().cpu()
            if key == head and tied:  # transformers 5 never ties Qwen2-Audio's lm_head: it reads both; safetensors
                tensor = tensor.clone()  # refuses shared storage
            yield key, tensor.to(target) if tensor.is_floating_point() else tensor

    needed = sum(t.numel() * (target.itemsize if t.is_floating_point() else t.element_size()) for t in state.values())
    with fresh_folder(dst, force, needed + shard_overhead(len(state), sum(map(len, state)))) as tmp:
        write_shards(tmp, tensors(), limit)
        write_json(tmp / "config.json", set_config_dtype(raw, target))
        if source is not None:
            copy_side_files(source, tmp)
    return dst
