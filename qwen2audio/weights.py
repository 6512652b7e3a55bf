"""Checkpoint loading: Hub safetensors (single file or sharded), strict names, meta-device build, no pickle.

The model is built on the meta device (no memory), every tensor is read once from its shard, cast if asked, moved
to the target device and assigned in place of the meta parameter: the weights are never held twice.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .config import Qwen2AudioConfig
from .errors import WeightsError
from .model import Qwen2AudioForConditionalGeneration
from .quantize import Int8Linear, int8_module_names

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
        try:
            with safe_open(single, framework="pt") as f:
                return {single: list(f.keys())}
        except Exception as e:  # safetensors raises its own types for truncated or corrupt files
            raise WeightsError(f"cannot read {single}: {e}; the file may be truncated or corrupt") from None
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


def load_weights(folder: str | Path, config: Qwen2AudioConfig | None = None, dtype: str | torch.dtype | None = None,
                 device: str | torch.device = "cpu", progress: bool = False) -> Qwen2AudioForConditionalGeneration:
    """Build the model on the meta device and fill it from the folder's safetensors, strictly by name."""
    folder = Path(folder)
    config = config or Qwen2AudioConfig.from_file(folder)
    dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = Qwen2AudioForConditionalGeneration(config)
    int8 = is_int8_checkpoint(folder)
    if int8:  # swap in Int8Linear (still on meta) so that names, shapes and assignment below see int8 + scales
        for name in int8_module_names(model):
            parent, _, child = name.rpartition(".")
            linear = model.get_submodule(name)
            setattr(model.get_submodule(parent), child, Int8Linear(
                linear.in_features, linear.out_features, linear.bias is not None, linear.weight.dtype, "meta"))
    tied = config.text_config.tie_word_embeddings and not int8  # an int8 lm_head is stored on its own
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if tied:
        expected.pop("language_model.lm_head.weight")

    shards = checkpoint_shards(folder)
    found = {k for keys in shards.values() for k in keys}
    missing, unexpected = set(expected) - found, found - set(expected)
    if missing or unexpected:
        parts = [f"missing keys: {_describe(missing)}" if missing else "",
                 f"unexpected keys: {_describe(unexpected)}" if unexpected else ""]
        raise WeightsError(f"checkpoint {folder} does not match config.json ({'; '.join(p for p in parts if p)}); "
                           "is this a Qwen2-Audio checkpoint with its own config.json?")

    state: dict[str, torch.Tensor] = {}
    bar = _progress_bar(sum(len(k) for k in shards.values()), folder) if progress else None
    for path, keys in shards.items():
        try:
            with safe_open(path, framework="pt", device=str(device)) as f:
                absent = set(keys) - set(f.keys())
                if absent:
                    raise WeightsError(f"{path.name} lacks {_describe(absent)}, which {INDEX_FILE} places there; "
                                       "the shard is incomplete or from another checkpoint")
                for key in keys:
                    if bar is not None:
                        bar.update(1)
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != expected[key]:
                        raise WeightsError(f"{path.name}: tensor {key} has shape {shape}, config.json implies "
                                           f"{expected[key]}")
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except WeightsError:
            raise
        except Exception as e:  # safetensors raises its own types for truncated or corrupt files
            raise WeightsError(f"cannot read {path}: {e}; the file may be truncated or corrupt") from None
    if tied:
        state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"]
    if bar is not None:
        bar.close()
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
