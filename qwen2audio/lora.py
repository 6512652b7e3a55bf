"""LoRA (Hu et al., 2021, arXiv:2106.09685) as a module wrapper, written here; adapters.py saves it in PEFT's layout.

`apply_lora(model, LoraConfig(...))` replaces each chosen nn.Linear by a `LoRALinear` holding it:

    y = base_layer(x) + scaling * lora_B(lora_A(dropout(x))),   scaling = lora_alpha / r  (or / sqrt(r), rsLoRA)

with A (r, in) drawn as nn.Linear's default init and B (out, r) zeros, so the wrapped model computes exactly what it
did; every other parameter is frozen. The submodule names (`base_layer`, `lora_A`, `lora_B`, `lora_dropout`) are
PEFT's. Over bf16 or fp16 weights the adapter is kept in fp32 (what PEFT does by default): x is cast to fp32 for
the adapter and the sum rounded once to the layer's dtype. `merge_lora` folds scaling * B @ A into the base
weights (no extra cost at inference), `unmerge_lora` takes it out again, `unload_lora` puts the plain nn.Linear
modules back, so that `qwen2audio.save` writes the Hub layout.
"""

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import InputError

_DECODER_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_DECODER_MLP = ("gate_proj", "up_proj", "down_proj")


def lora_targets(attention: bool = True, mlp: bool = False, encoder: bool = False, projector: bool = False) -> str:
    """A target_modules regex over our module names: the decoder's attention projections (q/k/v/o) and/or its MLP
    (gate/up/down), optionally every linear of the audio encoder's layers and the projector."""
    decoder = [rf"self_attn\.{n}" for n in _DECODER_ATTENTION] * attention + [rf"mlp\.{n}" for n in _DECODER_MLP] * mlp
    parts = [rf"language_model\.model\.layers\.\d+\.(?:{'|'.join(decoder)})"] if decoder else []
    if encoder:
        parts.append(r"audio_tower\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|fc1|fc2)")
    if projector:
        parts.append(r"multi_modal_projector\.linear")
    if not parts:
        raise InputError("lora_targets() selects nothing: ask for attention, mlp, encoder and/or projector")
    return "|".join(parts)


@dataclass(frozen=True)
class LoraConfig:
    """r: the rank; lora_alpha: the scale numerator; target_modules: PEFT's rule over our module names (a string is a
    regex that must match the whole name, a tuple lists names or their last parts, e.g. ("q_proj", "v_proj"),
    which also picks the encoder's q_proj and v_proj)."""
    r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: str | tuple[str, ...] = lora_targets()
    use_rslora: bool = False  # scaling lora_alpha / sqrt(r) instead of lora_alpha / r

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise InputError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))

    def selects(self, name: str) -> bool:
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, name) is not None
        return any(name == t or name.endswith("." + t) for t in self.target_modules)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoRALinear(nn.Module):
    """base_layer(x) + scaling * lora_B(lora_A(lora_dropout(x))); merged: base_layer(x) alone, B @ A being inside."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        self.base_layer = base_layer
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=weight.device, dtype=dtype)
        nn.init.zeros_(self.lora_B.weight)  # the wrapped layer starts as the base layer
        self.r, self.scaling, self.merged = r, scaling, False

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        delta = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))  # adapter's dtype
        return (out + delta * self.scaling).to(out.dtype)  # one rounding to the layer's dtype

    def delta_weight(self) -> Tensor:
        """scaling * B @ A (out, in), in the adapter's dtype: what merging adds to the base weight."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            weight = self.base_layer.weight
            weight.copy_(weight.to(self.lora_A.weight.dtype) + self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract B @ A again: exact in fp32 up to rounding; over bf16 weights, each merge/unmerge rounds."""
        if self.merged:
            weight = self.base_layer.weight
            weight.copy_(weight.to(self.lora_A.weight.dtype) - self.delta_weight())
            self.merged = False


def wrap_linear(model: nn.Module, name: str, r: int, scaling: float, dropout: float) -> LoRALinear:
    """Replace the nn.Linear at `name` by a LoRALinear around it; returns the wrapper."""
    module = model.get_submodule(name)
    if isinstance(module, LoRALinear):
        raise InputError(f"{name} already has a LoRA adapter; unload_lora(model) first to start a new one")
    if not isinstance(module, nn.Linear):
        raise InputError(f"{name} is a {type(module).__name__}, not a linear layer: LoRA wraps nn.Linear only "
                         "(an int8-quantized model cannot take LoRA; load it without quantize)")
    parent, _, child = name.rpartition(".")
    wrapper = LoRALinear(module, r, scaling, dropout)
    setattr(model.get_submodule(parent) if parent else model, child, wrapper)
    return wrapper


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap every nn.Linear that config.target_modules selects and freeze all other parameters (the adapters
    alone train; call it again with another config to give other layers another rank or alpha). Returns the
    wrapped module names."""
    wrapped = tuple(f"{n}." for n in lora_layers(model))  # their insides (base_layer, lora_A, ...) are not targets
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, LoRALinear)) and config.selects(n) and not n.startswith(wrapped)]
    if not names:
        raise InputError(f"target_modules {config.target_modules!r} selects no linear layer of the model; layer "
                         "names look like language_model.model.layers.0.self_attn.q_proj (see lora_targets)")
    if already := [n for n in names if isinstance(model.get_submodule(n), LoRALinear)]:
        raise InputError(f"{already[0]} already has a LoRA adapter; unload_lora(model) first to start a new one")
    for name in names:
        wrap_linear(model, name, config.r, config.scaling, config.lora_dropout)
    train_only_lora(model)
    return names


def train_only_lora(model: nn.Module) -> None:
    """Freeze every parameter but the adapters' (of this call and of earlier ones)."""
    model.requires_grad_(False)
    for layer in lora_layers(model).values():
        layer.lora_A.requires_grad_(True)
        layer.lora_B.requires_grad_(True)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the model then runs at the base model's cost)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def unload_lora(model: nn.Module, merge: bool = True) -> None:
    """Put the plain nn.Linear modules back, with the adapters merged into them (merge=True) or dropped."""
    for name, layer in lora_layers(model).items():
        layer.merge() if merge else layer.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.base_layer)
