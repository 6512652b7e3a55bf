"""Write checkpoints in the Hub layout: cast, reshard and int8-quantize a folder (`convert`), or save a model (`save`).

The output is what transformers' `save_pretrained` writes: `model.safetensors` when everything fits in one shard,
otherwise `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes of all tensors}, "weight_map": {key: file}}`); config.json with its `dtype`;
the tokenizer, processor and generation files copied as they are. Only safetensors, JSON and the tokenizer's text
files are ever written (never pickle). Tensors stream one at a time, so the peak memory is one output shard plus
the largest tensor, not the model. The folder is built beside `dst` and renamed into place only when complete.

Weight-only int8 on disk (`quantize="int8"`, or saving a model swapped by `quantize.quantize_int8`): for every
nn.Linear of the decoder and the lm_head (`quantize.int8_module_names`), `X.weight` is int8 (out, in) and
`X.scales` (out,) is in the model dtype, with w ~= scales[:, None] * weight; biases stay in the model dtype.
config.json carries INT8_CONFIG, which `weights.load_weights` reads to build Int8Linear modules before loading.
transformers cannot load such a folder: it warns "Unknown quantization type", ignores the scales and would treat
the int8 codes as weights.
"""

import dataclasses
import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .checkpoint import INDEX_FILE, SINGLE_FILE, TensorEntry, checkpoint_shards, read_header, read_tensor
from .config import Qwen2AudioConfig
from .errors import WeightsError
from .model import Qwen2AudioForConditionalGeneration
from .quantize import Int8Linear, check_quantize, int8_module_names, quantize_weight
from .weights import CHANGED_MARKER, INT8_QUANT_METHOD, meta_model, parse_dtype, swap_in_int8

INT8_CONFIG = {"quant_method": INT8_QUANT_METHOD, "bits": 8, "group": "per_output_channel",
               "modules": "decoder_linear"}

# The files besides the weights that a model folder may hold; config.json is rewritten, these are copied as they are.
SIDE_FILES = ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
              "vocab.json", "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.json",
              "chat_template.jinja")

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


def write_shards(folder: Path, tensors: Iterable[tuple[str, Tensor]], max_shard_size: int) -> None:
    """Fill shards in order, starting a new one when the next tensor would overflow (a bigger tensor gets its own),
    then name them: one shard is `model.safetensors`, several are `model-i-of-n` with an index."""
    shards: list[list[str]] = []  # the keys of each written shard
    shard: dict[str, Tensor] = {}

    def flush() -> None:  # written under a temporary name until the number of shards is known
        save_file(shard, folder / f"shard-{len(shards)}.partial", metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    size = total = 0
    for key, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_shard_size:
            flush()
            size = 0
        shard[key] = tensor.contiguous()
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
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_json(path: Path, raw: dict) -> None:
    path.write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


@contextmanager
def fresh_folder(dst: Path, force: bool) -> Iterator[Path]:
    """Yield an empty folder beside `dst`; when the block succeeds it becomes `dst` (an old `dst` is replaced only
    then); when it fails it is deleted, so no half-written `dst` ever exists."""
    if dst.exists() and not dst.is_dir():
        raise WeightsError(f"{dst} exists and is not a folder; choose another destination")
    if dst.is_dir() and any(dst.iterdir()):
        if not force:
            raise WeightsError(f"{dst} exists and is not empty; pass --force (force=True) to replace it")
        if not (dst / "config.json").is_file() and not any(dst.glob("*.safetensors")):
            raise WeightsError(f"{dst} is not empty and is not a model folder (no config.json or safetensors); "
                               "refusing to replace it even with --force")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = tmp.with_name(tmp.name.replace(".partial-", ".old-"))
    if dst.exists():
        dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)


def read_source_tensor(path: Path, entry: TensorEntry) -> Tensor:
    with open(path, "rb") as f:  # plain reads: nothing of the source stays resident once the tensor is written
        return read_tensor(f, entry, path)


def copy_side_files(src: Path, dst: Path) -> None:
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def convert(src: str | Path, dst: str | Path, dtype: str | torch.dtype | None = None, quantize: str | None = None,
            max_shard_size: str | int = "2GB", force: bool = False) -> Path:
    """Copy the checkpoint folder `src` to `dst`: floating tensors cast to `dtype` (None keeps them), the decoder's
    linear weights int8 if quantize="int8", in shards of at most `max_shard_size` (one bigger tensor gets its own)."""
    src, dst = Path(src), Path(dst)
    target, limit = parse_dtype(dtype), parse_size(max_shard_size)
    check_quantize(quantize)
    if not src.is_dir():
        raise WeightsError(f"source folder {src} does not exist")
    if src.resolve() != dst.resolve() and src.resolve().is_relative_to(dst.resolve()):
        raise WeightsError(f"{dst} contains the source {src}; write the converted model elsewhere")
    shards = checkpoint_shards(src)
    headers = {path: read_header(path) for path in shards}
    config = Qwen2AudioConfig.from_file(src)
    raw = json.loads((src / "config.json").read_text())

    # (output key, shard, source key), in the source's order: reading is sequential through each file.
    jobs = [(key, path, key) for path, keys in sorted(shards.items()) for key in keys]
    int8_keys: set[str] = set()
    if quantize == "int8":
        int8_keys = {f"{n}.weight" for n in int8_module_names(meta_model(config))}
        head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
        if config.text_config.tie_word_embeddings and not any(key == head for key, _, _ in jobs):
            # An int8 lm_head is stored on its own (int8 + scales); a tied one is quantized from the embedding.
            jobs += [(head, path, key) for key, path, _ in jobs if key == embed]
        raw["quantization_config"] = INT8_CONFIG

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for key, path, source_key in jobs:
            if source_key not in headers[path]:
                raise WeightsError(f"{path.name} lacks {source_key}, which {INDEX_FILE} places there")
            tensor = read_source_tensor(path, headers[path][source_key])
            if target is not None and tensor.is_floating_point():
                tensor = tensor.to(target)
            if key in int8_keys and tensor.is_floating_point():  # an int8 source stays as it is
                # Quantize the cast weight, as load(dtype=..., quantize="int8") does.
                q, scales = quantize_weight(tensor)
                yield key, q
                yield key.removesuffix("weight") + "scales", scales.to(tensor.dtype)
            else:
                yield key, tensor

    with fresh_folder(dst, force) as tmp:
        write_shards(tmp, tensors(), limit)
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
    quantized = any(isinstance(m, Int8Linear) for m in model.language_model.modules())
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
        raw = json.loads((source / "config.json").read_text())
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

    state = model.state_dict()
    head = "language_model.lm_head.weight"
    tied = state[head].data_ptr() == state["language_model.model.embed_tokens.weight"].data_ptr()

    def tensors() -> Iterator[tuple[str, Tensor]]:
        for key, tensor in state.items():
            tensor = tensor.detach().cpu()
            if key == head and tied:  # transformers 5 never ties Qwen2-Audio's lm_head: it reads both; safetensors
                tensor = tensor.clone()  # refuses shared storage
            yield key, tensor.to(target) if tensor.is_floating_point() else tensor

    with fresh_folder(dst, force) as tmp:
        write_shards(tmp, tensors(), limit)
        write_json(tmp / "config.json", set_config_dtype(raw, target))
        if source is not None:
            copy_side_files(source, tmp)
    return dst
