"""CPU matrix-vector kernel for single-token decoding, chosen explicitly by `load()` on CPU.

At batch 1 every decoder linear layer multiplies a weight matrix by one vector. On CPU, torch's `addmv` streams
a bf16 weight at close to memory bandwidth, while `F.linear` with a one-row input goes through the general matrix
path and reads the same weight up to twice as slowly (measured in benchmarks/). Same parameters, same math: the
reference path is `torch.nn.functional.linear`, and tests/test_kernels.py holds the two equal.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def gemv_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias), computed as a matrix-vector product when x holds a single row on CPU."""
    if x.device.type != "cpu" or x.numel() != x.shape[-1] or not weight.dtype.is_floating_point:
        return F.linear(x, weight, bias)
    row = x.reshape(-1)  # (in,)
    out = torch.mv(weight, row) if bias is None else torch.addmv(bias, weight, row)  # (out,)
    return out.view(*x.shape[:-1], -1)


class GemvLinear(nn.Linear):
    """nn.Linear with the same parameters (and checkpoint keys) whose one-row products use gemv_linear."""

    def forward(self, x: Tensor) -> Tensor:
        return gemv_linear(x, self.weight, self.bias)


def use_cpu_gemv(model: nn.Module) -> nn.Module:
    """Switch every plain nn.Linear of the decoder to GemvLinear, in place (no copy: only the class changes)."""
    for module in model.language_model.modules():
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
    return model
