"""CPU kernel for decoding (a few rows times a weight matrix), chosen explicitly by `load()` on CPU.

Decoding multiplies each decoder weight matrix by one row per sequence of the batch. On CPU, torch's `addmv`
(one row) and `addmm` on weight @ rows.T (a few rows) stream a bf16 weight at close to memory bandwidth, while
`F.linear` with such skinny inputs reads the same weight up to twice as slowly (measured in benchmarks/). Same parameters, same math: the
reference path is `torch.nn.functional.linear`, and tests/test_kernels.py holds the two equal.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn


MAX_SKINNY_ROWS = 16  # up to this many rows (decoding a batch), the weight-streaming form below is faster


@torch.library.custom_op("qwen2audio::skinny_linear", mutates_args=())
def skinny_linear(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows (n, in) @ weight.T + bias for a few rows: one pass over the weight, as `addmv` / `addmm` on weight @ rows.T.

    A custom op so that torch.compile calls it as it is instead of generating its own, slower, reduction loops.
    """
    if rows.shape[0] == 1:
        out = torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])
        return out[None]
    out = torch.mm(weight, rows.T) if bias is None else torch.addmm(bias[:, None], weight, rows.T)  # (out, n)
    return out.T.contiguous()


@skinny_linear.register_fake
def _(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


def gemv_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias), computed by streaming the weight once when x holds a few rows on CPU."""
    n_rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or n_rows > MAX_SKINNY_ROWS or n_rows == 0 or not weight.dtype.is_floating_point:
        return F.linear(x, weight, bias)
    out = skinny_linear(x.reshape(n_rows, x.shape[-1]), weight, bias)  # (n_rows, out)
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
