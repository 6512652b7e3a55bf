"""The CPU layers that `prepare_for_cpu` (cpu.py) puts in place of a model's own, sharing their parameters.

Each is made from a plain layer with `from_module`, holds the very same Parameter and buffer objects (no copy: the
state dict, its keys and dtypes are unchanged, so saving works as before), shows its own name in print(model), and
gives the plain layer back with `plain()`. Each computes the plain layer's function; only the way differs:

  StreamingLinear  nn.Linear in the weights' dtype; a few rows stream the weight once (torch's addmv / addmm, the
                   AVX2 kernel, or the AVX512_BF16 one)
  Fp32Linear       nn.Linear over bf16 / fp16 weights, computed in fp32: a few rows through the AVX2 kernel, many
                   through widened blocks and fp32 GEMM (products.py); returns fp32
  Fp32Conv1d       nn.Conv1d over bf16 / fp16 weights, computed in fp32 (the weights are small: widened per call)
  Fp32LayerNorm    nn.LayerNorm over bf16 / fp16 parameters, computed in fp32
  Int8CpuLinear    a weight-only int8 layer (quantize.Int8Linear): a few rows through an int8 kernel, many through
                   widened blocks and GEMM

Autograd: where a gradient is needed (grad mode on and an input or a parameter requiring grad), every layer runs
the plain, differentiable torch operations instead of a kernel, so a prepared model still trains in eager mode.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .products import MAX_SKINNY_ROWS, bf16_rows, float_rows, int8_rows, streamed_rows, widened, widened_product


def needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def fp32_or_wider(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def share(layer: nn.Module, module: nn.Module) -> None:
    """Give `layer` the parameters and buffers of `module`: the same objects, under the same names."""
    for name, p in module._parameters.items():
        setattr(layer, name, p)  # None too: a layer without bias holds bias = None
    for name, b in module.named_buffers(recurse=False):
        layer.register_buffer(name, b)


class KernelLayer:
    """A layer made from a plain one by `from_module`, sharing its parameters; `plain()` gives the plain one back."""

    def made_from(self, module: nn.Module) -> "KernelLayer":
        share(self, module)
        self.__dict__["_plain"] = module  # kept outside the module tree: not in state_dict(), not in print(model)
        return self

    def plain(self) -> nn.Module:
        """The plain layer, holding this layer's current parameters and buffers."""
        share(self._plain, self)
        return self._plain


class KernelLinear(KernelLayer, nn.Linear):
    @classmethod
    def from_module(cls, linear: nn.Linear) -> "KernelLinear":
        return cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta").made_from(linear)


class StreamingLinear(KernelLinear):
    """rows: the few-row product, for at most max_rows rows (more go to F.linear): "torch" (addmv / addmm), "avx2"
    (bf16 / fp16 weights widened in registers, fp32 sums) or "avx512_bf16" (bf16 rows and weights, exact products,
    fp32 sums); the C++ kernels' results are rounded once to x's dtype."""

    @classmethod
    def from_module(cls, linear: nn.Linear, rows: str = "torch", max_rows: int = MAX_SKINNY_ROWS) -> "StreamingLinear":
        layer = super().from_module(linear)
        layer.rows, layer.max_rows = rows, max_rows
        return layer

    def forward(self, x: Tensor) -> Tensor:
        n_rows = x.numel() // self.in_features
        if needs_grad(x, self.weight, self.bias) or not 0 < n_rows <= self.max_rows or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(n_rows, self.in_features)
        if self.rows == "avx512_bf16" and x.dtype == self.weight.dtype == torch.bfloat16:
            y = bf16_rows(rows, self.weight, self.bias).to(x.dtype)
        elif self.rows != "torch":  # "avx2", or bf16 weights with rows of another dtype
            y = float_rows(rows, self.weight, self.bias).to(x.dtype)
        else:
            y = streamed_rows(rows, self.weight, self.bias)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows={self.rows}, max_rows={self.max_rows}"


class Fp32Linear(KernelLinear):
    def forward(self, x: Tensor) -> Tensor:
        n_rows, dtype = x.numel() // self.in_features, fp32_or_wider(x.dtype)
        if needs_grad(x, self.weight, self.bias) or dtype != torch.float32 or n_rows == 0 or \
                x.device.type != "cpu" or (torch.compiler.is_compiling() and n_rows > MAX_SKINNY_ROWS):
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x.to(dtype), self.weight.to(dtype), bias)
        rows = x.reshape(n_rows, self.in_features)
        if n_rows <= MAX_SKINNY_ROWS:
            y = float_rows(rows, self.weight, self.bias)  # (n, out) fp32
        else:
            y = widened_product(rows, self.weight, torch.float32)
            y = y if self.bias is None else y.add_(self.bias)
        return y.view(*x.shape[:-1], self.out_features)


class Fp32Conv1d(KernelLayer, nn.Conv1d):
    @classmethod
    def from_module(cls, conv: nn.Conv1d) -> "Fp32Conv1d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                    conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        return layer.made_from(conv)

    def forward(self, x: Tensor) -> Tensor:
        dtype = fp32_or_wider(x.dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        if needs_grad(x, self.weight, self.bias) or dtype != torch.float32 or torch.compiler.is_compiling():
            return self._conv_forward(x.to(dtype), self.weight.to(dtype), bias)
        return self._conv_forward(x.to(dtype), widened(self.weight), bias)


class Fp32LayerNorm(KernelLayer, nn.LayerNorm):
    @classmethod
    def from_module(cls, norm: nn.LayerNorm) -> "Fp32LayerNorm":
        layer = cls(norm.normalized_shape, norm.eps, norm.elementwise_affine, bias=norm.bias is not None, device="meta")
        return layer.made_from(norm)

    def forward(self, x: Tensor) -> Tensor:
        dtype = fp32_or_wider(x.dtype)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


class Int8CpuLinear(KernelLayer, nn.Module):
    """isa: the few-row kernel: "avx512_vnni" or "avx2" (cpu_avx*.cpp), or "torch" (torch._weight_int8pack_mm);
    widen: whether many rows go through widened blocks (the C++ extension) or torch's dequantization."""

    def __init__(self, in_features: int, out_features: int, isa: str, widen: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.isa, self.widen = in_features, out_features, isa, widen
        self.bias = None  # the int8 layer's bias, if it has one, replaces this

    @classmethod
    def from_module(cls, int8: nn.Module, isa: str, widen: bool) -> "Int8CpuLinear":
        """int8: a layer with an int8 `weight` (out, in) buffer, `scales` (out,) and `bias` (None or (out,))."""
        return cls(int8.in_features, int8.out_features, isa, widen).made_from(int8)

    def forward(self, x: Tensor) -> Tensor:
        n_rows = x.numel() // self.in_features
        fast = not needs_grad(x, self.bias) and x.device.type == "cpu" and n_rows > 0 and \
            x.dtype in (torch.float32, torch.bfloat16)
        rows = x.reshape(n_rows, self.in_features)
        if fast and n_rows <= MAX_SKINNY_ROWS and self.isa != "torch":
            y = int8_rows(rows, self.weight, self.scales, self.isa)  # scaled, in x's dtype
        elif fast and n_rows <= MAX_SKINNY_ROWS:  # int8 weights read as they are, widened in registers by torch
            y = torch._weight_int8pack_mm(rows, self.weight, self.scales.to(x.dtype))
        elif fast and self.widen and not torch.compiler.is_compiling():
            y = widened_product(rows, self.weight, x.dtype).mul_(self.scales)  # integers widened exactly
        else:  # the plain layer's math: dequantize, multiply (fused by torch.compile)
            y = F.linear(rows, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"isa={self.isa}"
