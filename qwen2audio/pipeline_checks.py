"""The checks at the pipeline's public entry points, each done once: load()'s arguments (the model path or Hub repo
id, the device, the memory the model needs), what a loaded folder declares (generation defaults and tokenizer
against the model), and the tensors given to generate()."""

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from .checkpoint import MODEL_FILES
from .config import Qwen2AudioConfig
from .errors import ConfigError, InputError, WeightsError
from .files import is_folder, present
from .memory import check_model_fits
from .model import Qwen2AudioForConditionalGeneration
from .weights import is_int8_checkpoint, parse_dtype


def resolve_model_path(path_or_repo_id: str | Path, quiet: bool = False) -> Path:
    """A local folder as it is; otherwise a Hub repo id, fetched (only the files the model needs) into the HF cache."""
    path = Path(path_or_repo_id).expanduser()
    if is_folder(path):
        return path
    name = str(path_or_repo_id)
    if present(path) or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise WeightsError(f"model {name!r} is neither a folder nor a Hub repo id like 'Qwen/Qwen2-Audio-7B-Instruct'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    try:
        if quiet:
            disable_progress_bars()
        return Path(snapshot_download(name, allow_patterns=MODEL_FILES))
    except Exception as e:
        raise WeightsError(f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without "
                           "network, download the repo elsewhere and pass its local folder as the model path") from None
    finally:
        if quiet:
            enable_progress_bars()


def resolve_device(device: str | torch.device) -> torch.device:
    """The device to load on: "auto" picks cuda, then mps, then cpu; a device this torch build and machine cannot
    use is an InputError before any weight is read."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    available = {"cuda": torch.cuda.is_available, "mps": _mps_available}.get(device.type, lambda: True)
    if not available():
        raise InputError(f"device {str(device)!r} is not available on this machine (this torch is "
                         f"{torch.__version__}); use the CPU (device='cpu', --device cpu) or install a torch build for "
                         "that device")
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def check_load_args(path: object, dtype: object, allow_missing: object = (), **flags: object) -> None:
    """load() and load_model(): the path is a string or a path, dtype a name or a torch dtype, each flag True or
    False (None where it means "the default"), allow_missing a list of name patterns."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InputError(f"the model path must be a folder or a Hub repo id (a string), got {path!r:.60}")
    if dtype is not None and not isinstance(dtype, (str, torch.dtype)):
        raise InputError(f"dtype must be None, a name like 'bfloat16' or a torch dtype, got {dtype!r:.40}")
    for name, value in flags.items():
        if not isinstance(value, bool) and not (value is None and name == "mmap"):
            raise InputError(f"{name} must be True or False, got {value!r:.40} ({type(value).__name__})")
    if isinstance(allow_missing, (str, bytes)) or not isinstance(allow_missing, Sequence) or \
            not all(isinstance(p, str) for p in allow_missing):
        raise InputError(f"allow_missing must be a list of name patterns like ['my_head.*'], got {allow_missing!r:.60}")


def check_fits(folder: Path, dtype: str | torch.dtype | None, device: torch.device, quantize: str | None,
               mapped: bool) -> None:
    """Before anything is built or read: the model config.json describes must fit the device's memory (weights
    that stay mapped, in the file's dtype on the CPU, live in the page cache and are not counted)."""
    if mapped and device.type == "cpu" and dtype is None and quantize is None:
        return
    check_model_fits(Qwen2AudioConfig.from_file(folder), parse_dtype(dtype), device,
                     quantize == "int8" or is_int8_checkpoint(folder, ours=False), folder / "config.json")


def check_loaded(pipe: "object") -> None:
    """What a folder declares, checked against its model once at load: the generation defaults (through the one
    check of generation options) and the tokenizer (an embedding for each of its ids, <|AUDIO|> at the id the
    model reads audio from)."""
    where = Path(pipe.path) / "generation_config.json"
    try:
        defaults = pipe.options()
        vocab = pipe.config.vocab_size
        outside = [i for i in (*defaults.eos_token_ids, defaults.pad_token_id) if i >= vocab]
        if outside:
            raise InputError(f"token id {outside[0]} (eos_token_id or pad_token_id) is outside the vocabulary "
                             f"(0..{vocab - 1})")
    except InputError as e:
        raise ConfigError(f"{where}: {e}") from None
    if pipe.tokenizer is not None:
        pipe.tokenizer.check_model(pipe.config.vocab_size, pipe.config.audio_token_index,
                                   Path(pipe.path) / "config.json")


def _check_tensor(name: str, value: object, floating: bool) -> Tensor:
    if not isinstance(value, Tensor) or value.is_meta or value.is_floating_point() != floating or \
            value.is_complex():
        kind = "a floating" if floating else "an integer"
        what = f"a {value.dtype} tensor on {value.device}" if isinstance(value, Tensor) else type(value).__name__
        raise InputError(f"{name} must be {kind} tensor with values (not on the meta device), got {what}")
    return value


def check_generate_inputs(model: Qwen2AudioForConditionalGeneration, input_ids: object,
                          input_features: object = None, feature_attention_mask: object = None) -> None:
    """generate()'s tensors: ids through model.check_ids; audio features with their frame mask, one mask row of
    0/1 per clip, finite values (NaN features would give NaN logits, reported as bad weights)."""
    model.check_ids(input_ids)
    if input_features is None:
        if feature_attention_mask is not None:
            raise InputError("feature_attention_mask was given without input_features")
        return
    features = _check_tensor("input_features", input_features, floating=True)
    if feature_attention_mask is None:
        raise InputError("input_features need their feature_attention_mask (the processor returns both)")
    mask = _check_tensor("feature_attention_mask", feature_attention_mask, floating=False)
    if features.ndim != 3 or mask.shape != (features.shape[0], features.shape[-1]):
        raise InputError(f"feature_attention_mask {tuple(mask.shape)} must have one row per clip and one column per "
                         f"frame of input_features {tuple(features.shape)}; use the processor's outputs as they are")
    if not bool(((mask == 0) | (mask == 1)).all()) or not bool(torch.isfinite(features).all()):
        raise InputError("feature_attention_mask must hold 0/1 and input_features finite values; use the "
                         "processor's outputs as they are")


def check_single(conversations: list, batched: bool) -> list:
    """stream() takes one conversation: a batch of several is an InputError (chat() takes batches)."""
    if batched and len(conversations) != 1:
        raise InputError(f"stream() takes one conversation, got a batch of {len(conversations)}; use chat() for "
                         "a batch")
    return conversations[0]


def check_audio_list(audio: object) -> list:
    """The clips given with a raw prompt: None or a list (a lone path or array is a list of one)."""
    if audio is None:
        return []
    if isinstance(audio, (list, tuple)):
        return list(audio)
    raise InputError(f"audio must be a list of clips (paths, URLs, bytes or 16 kHz arrays), got "
                     f"{type(audio).__name__}; wrap one clip in a list")

