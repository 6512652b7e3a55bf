"""LoRA adapters on disk in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

PEFT stores `base_model.model.<module>.lora_A.weight` (r, in) and `.lora_B.weight` (out, r), where <module> is the
module's name inside transformers' model. transformers 5 renamed Qwen2-Audio's modules (facts §7.4), so the same
layer has three spellings:

    ours = the Hub checkpoint keys         language_model.model.layers.0.self_attn.q_proj
    transformers 5 (peft 0.21 writes)      model.language_model.layers.0.self_attn.q_proj
    transformers 4                         language_model.model.layers.0.self_attn.q_proj   (= ours)

and likewise `language_model.lm_head` / `lm_head`, `audio_tower` / `model.audio_tower`, `multi_modal_projector` /
`model.multi_modal_projector`. `save_adapter` writes transformers 5's names, the ones peft 0.21.2 on transformers
5.24 writes and reads (checked: it does not rename transformers-4 keys of the audio tower when loading);
`load_adapter` reads both. adapter_config.json's target_modules is written as a regex over transformers 5's names
that selects exactly the wrapped layers.
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import InputError, WeightsError
from .lora import LoRALinear, lora_layers, train_only_lora, unload_lora, wrap_linear

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
# (our prefix, transformers 5's), most specific first.
_RENAMES = (("language_model.model.", "model.language_model."), ("language_model.lm_head", "lm_head"),
            ("audio_tower.", "model.audio_tower."), ("multi_modal_projector.", "model.multi_modal_projector."))


def peft_name(name: str) -> str:
    """Our module name -> transformers 5's."""
    for ours, theirs in _RENAMES:
        if name.startswith(ours):
            return theirs + name[len(ours):]
    return name


def our_name(name: str) -> str:
    """A module name of transformers 5 or 4 -> ours (4's are ours already)."""
    for ours, theirs in _RENAMES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    return name


def targets_regex(model: nn.Module, wrapped: list[str]) -> str:
    """A regex (fullmatch, transformers 5's names) selecting exactly the wrapped layers: `\\d+` for the layer index
    when that selects the same set, else the names one by one."""
    chosen = {peft_name(n) for n in wrapped}
    linears = {peft_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)} | chosen
    general = sorted({re.escape(re.sub(r"\.layers\.\d+\.", ".layers.<N>.", n)).replace("<N>", r"\d+")
                      for n in chosen})
    regex = "|".join(general)
    if {n for n in linears if re.fullmatch(regex, n)} == chosen:
        return regex
    return "|".join(re.escape(n) for n in sorted(chosen))


def adapter_config(model: nn.Module, base_model: str | None = None) -> dict:
    """adapter_config.json for the model's LoRA layers; layers whose r or alpha differ from the most common go to
    rank_pattern / alpha_pattern under their full transformers-5 name."""
    layers = lora_layers(model)
    if not layers:
        raise InputError("the model has no LoRA layers to save; apply_lora(model, LoraConfig(...)) first")
    alphas = {name: layer.scaling * layer.r for name, layer in layers.items()}
    r = Counter(layer.r for layer in layers.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    dropouts = {layer.lora_dropout.p if isinstance(layer.lora_dropout, nn.Dropout) else 0.0
                for layer in layers.values()}
    return {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
            "r": r, "lora_alpha": alpha, "lora_dropout": max(dropouts), "use_rslora": False, "use_dora": False,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "target_modules": targets_regex(model, list(layers)),
            "rank_pattern": {re.escape(peft_name(n)): m.r for n, m in layers.items() if m.r != r},
            "alpha_pattern": {re.escape(peft_name(n)): a for n, a in alphas.items() if a != alpha}}


def save_adapter(model: nn.Module, folder: str | Path, base_model: str | None = None) -> Path:
    """Write the model's LoRA adapters (unmerged values) to `folder` in PEFT's layout; base_model is recorded as
    base_model_name_or_path. Returns the folder."""
    folder = Path(folder)
    config = adapter_config(model, base_model)
    tensors = {}
    for name, layer in lora_layers(model).items():
        key = PREFIX + peft_name(name)
        tensors[f"{key}.lora_A.weight"] = layer.lora_A.weight.detach().cpu().contiguous()
        tensors[f"{key}.lora_B.weight"] = layer.lora_B.weight.detach().cpu().contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


_UNSUPPORTED = {"use_dora": (False, None), "fan_in_fan_out": (False, None), "modules_to_save": (None, []),
                "bias": ("none", None), "lora_bias": (False, None), "target_parameters": (None, []),
                "layer_replication": (None, []), "trainable_token_indices": (None, [], {})}


def read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise WeightsError(f"{folder} has no {ADAPTER_CONFIG}: is it a PEFT adapter folder?")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise WeightsError(f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') load here")
    for key, allowed in _UNSUPPORTED.items():
        if config.get(key, allowed[0]) not in allowed:
            raise WeightsError(f"{path}: {key} = {config[key]!r} is not supported here (plain LoRA only); merge "
                               "that adapter with peft and load the merged model instead")
    return config


def _pattern_value(patterns: dict, name: str, default: float) -> float:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def read_adapter_weights(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module name as stored (transformers 5's or 4's): (lora_A (r, in), lora_B (out, r))}."""
    path = folder / ADAPTER_WEIGHTS
    if not path.is_file():
        raise WeightsError(f"{folder} has no {ADAPTER_WEIGHTS} (an adapter_model.bin pickle is not read: convert it "
                           "with peft to safetensors)")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        match = re.fullmatch(rf"{re.escape(PREFIX)}(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if match is None:
            raise WeightsError(f"{path}: unexpected key {key}; a LoRA adapter holds {PREFIX}<module>.lora_A.weight "
                               "and .lora_B.weight only")
        pairs.setdefault(match[1], {})[match[2]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise WeightsError(f"{path}: {module} has only {', '.join(pair)}")
    return {module: (pair["lora_A"], pair["lora_B"]) for module, pair in pairs.items()}


def _base_linear(model: nn.Module, name: str, module: str, folder: Path) -> nn.Linear:
    try:
        base = model.get_submodule(name)
    except AttributeError:
        base = None
    if isinstance(base, LoRALinear):
        raise InputError(f"{name} already has a LoRA adapter; unload_lora(model) first to load another")
    if not isinstance(base, nn.Linear):
        raise WeightsError(f"{folder / ADAPTER_WEIGHTS}: {module} ({name} here) is not a linear layer of this model")
    return base


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Wrap the layers a PEFT-layout adapter holds (named as transformers 5 or 4 names them) and load its weights;
    every other parameter is frozen, as after apply_lora. Everything is checked before the model is changed.
    Returns the wrapped module names (ours)."""
    folder = Path(folder)
    config = read_adapter_config(folder)
    plan = []
    for module, (a, b) in read_adapter_weights(folder).items():
        name = our_name(module)
        base, r = _base_linear(model, name, module, folder), a.shape[0]
        if a.shape != (r, base.in_features) or b.shape != (base.out_features, r):
            raise WeightsError(f"{folder / ADAPTER_WEIGHTS}: {module} has lora_A {tuple(a.shape)} and lora_B "
                               f"{tuple(b.shape)}; this model's layer needs ({r}, {base.in_features}) and "
                               f"({base.out_features}, {r})")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        plan.append((name, r, alpha / (r ** 0.5 if config.get("use_rslora") else r), a, b))
    for name, r, scaling, a, b in plan:
        layer = wrap_linear(model, name, r, scaling, config.get("lora_dropout", 0.0))
        with torch.no_grad():
            layer.lora_A.weight.copy_(a)
            layer.lora_B.weight.copy_(b)
    train_only_lora(model)
    return [name for name, *_ in plan]


def check_merge_args(folder: str | Path, quantize: str | None, mmap: bool | None) -> Path:
    """What `load(..., adapter=folder)` needs, checked before any weight is read: the folder's adapter_config.json,
    and weights it can change (read into memory, not int8)."""
    if quantize is not None:
        raise InputError("adapter= folds the adapter into full-precision weights, which quantize='int8' never "
                         "holds: merge first (qwen2audio finetune --merge, or load without quantize and "
                         "qwen2audio.save), then quantize the merged folder")
    if mmap:
        raise InputError("adapter= changes the weights in memory, so they cannot stay mapped from the files: drop "
                         "mmap=True")
    read_adapter_config(Path(folder))
    return Path(folder)


def merge_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Load a PEFT-layout adapter and fold it into the base weights (plain nn.Linear modules again, nothing
    frozen): the model then runs at the base model's cost. Returns the layers it changed."""
    names = load_adapter(model, folder)
    unload_lora(model, merge=True)
    model.requires_grad_(True)
    return names
