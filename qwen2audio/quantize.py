"""Weight-only int8 for the decoder's linear layers and the lm_head: a module swap on a built model
(`quantize_int8`), or done while loading (`load(..., quantize="int8")`, the same values).

Each output channel keeps one scale: w[o, :] ~= scales[o] * q[o, :] with q in [-127, 127] (symmetric, absmax).
Activations stay in the model dtype; the matmul reads int8 weights (half the bytes of bf16), which is what bounds
decoding speed at batch 1. Int8Linear's own forward is the plain math (dequantize, multiply: what torch.compile fuses
on GPU); on CPU, kernels.prepare_for_cpu (called by load()) puts kernels.layers.Int8CpuLinear in its place, which
shares its tensors and runs the int8 CPU kernels (decoding rounds each activation row to int16 inside the product,
an error far below the weights'). The audio encoder stays in the model dtype.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import InputError


QUANTIZE_BLOCK_ROWS = 256  # rows converted at a time: the fp32 block stays in cache (3x faster than 2048 rows)


def check_quantize(quantize: str | None) -> None:
    """The one check of a `quantize` argument, for every entry point that takes one."""
    if quantize not in (None, "int8"):
        raise InputError(f"quantize must be None or 'int8', got {quantize!r}")


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(out, in) float weight -> (int8 (out, in), float32 scales (out,)), per output channel absmax."""
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start in range(0, weight.shape[0], QUANTIZE_BLOCK_ROWS):
        w = weight[start:start + QUANTIZE_BLOCK_ROWS].to(torch.float32, copy=True)  # the steps below work in place
        low, high = torch.aminmax(w, dim=1)
        s = torch.maximum(-low, high).clamp_(min=1e-12).div_(127.0)  # absmax / 127
        q[start:start + QUANTIZE_BLOCK_ROWS] = w.div_(s[:, None]).round_().clamp_(-127, 127)  # integers: exact
        scales[start:start + QUANTIZE_BLOCK_ROWS] = s
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (scales * q)^T + bias, with q int8 and scales per output channel (in the activation dtype)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        dtype = linear.weight.dtype
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, dtype, linear.weight.device)
        q, scales = quantize_weight(linear.weight.data)
        module.weight.copy_(q)
        module.scales.copy_(scales.to(dtype))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.data)
        return module

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)  # integers exact in any float dtype
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_module_names(model: nn.Module) -> list[str]:
    """The linear layers that weight-only int8 replaces: every nn.Linear of the decoder, lm_head included."""
    return [f"language_model.{name}" for name, m in model.language_model.named_modules() if isinstance(m, nn.Linear)]


def quantize_int8(model: nn.Module) -> nn.Module:
    """Swap the decoder's nn.Linear layers for Int8Linear, in place; returns the model."""
    for name in int8_module_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Int8Linear.from_linear(getattr(parent, child)))
    return model
