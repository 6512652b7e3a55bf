"""CPU kernels for decoding (a few rows times a weight matrix), chosen explicitly by `load()` on CPU.

Decoding multiplies each decoder weight matrix by one row per sequence of the batch, so its speed is how fast the
weights stream from memory.
- bf16 / fp32: torch's `addmv` (one row) and `addmm` on weight @ rows.T (a few rows) stream a weight at close to
  memory bandwidth, while `F.linear` with such skinny inputs reads the same weight up to twice as slowly (measured
  in benchmarks/). Same parameters, same math; the reference path is `F.linear`.
- int8: `int8_gemv.cpp`, a small C++ kernel (AVX-512 VNNI) built on first use, streams int8 weights about 1.6x
  faster than torch's `_weight_int8pack_mm`, which is limited by widening each weight to fp32.
tests/test_kernels.py holds each against its reference.
"""

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


MAX_SKINNY_ROWS = 16  # up to this many rows (decoding a batch), the weight-streaming form below is faster


def skinny_product(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows (n, in) @ weight.T + bias for a few rows: one pass over the weight, as `addmv` / `addmm` on
    weight @ rows.T."""
    if rows.shape[0] == 1:
        out = torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])
        return out[None]
    out = torch.mm(weight, rows.T) if bias is None else torch.addmm(bias[:, None], weight, rows.T)  # (out, n)
    return out.T.contiguous()


# The same, as a custom op for torch.compile: compiled code calls it as it is instead of generating its own, slower,
# reduction loops. Eager code calls the function itself: a custom op's first call imports ~800 modules (1-2 s).
@torch.library.custom_op("qwen2audio::skinny_linear", mutates_args=())
def skinny_linear(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return skinny_product(rows, weight, bias)


@skinny_linear.register_fake
def _(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


def gemv_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """F.linear(x, weight, bias), computed by streaming the weight once when x holds a few rows on CPU."""
    n_rows = x.numel() // x.shape[-1]
    if x.device.type != "cpu" or n_rows > MAX_SKINNY_ROWS or n_rows == 0 or not weight.dtype.is_floating_point:
        return F.linear(x, weight, bias)
    product = skinny_linear if torch.compiler.is_compiling() else skinny_product
    out = product(x.reshape(n_rows, x.shape[-1]), weight, bias)  # (n_rows, out)
    return out.view(*x.shape[:-1], -1)


class GemvLinear(nn.Linear):
    """nn.Linear with the same parameters (and checkpoint keys) whose one-row products use gemv_linear."""

    def forward(self, x: Tensor) -> Tensor:
        return gemv_linear(x, self.weight, self.bias)


def use_cpu_gemv(model: nn.Module, verbose: bool = False) -> nn.Module:
    """Switch every plain nn.Linear of the decoder to GemvLinear, in place (no copy: only the class changes), and
    int8 layers to the int8 kernel below where it can run."""
    from ..quantize import Int8Linear

    int8_layers = []
    for module in model.language_model.modules():
        if type(module) is nn.Linear:
            module.__class__ = GemvLinear
        elif isinstance(module, Int8Linear):
            int8_layers.append(module)
    if int8_layers and int8_kernel(verbose) is not None:
        for module in int8_layers:
            module.use_int8_kernel = True
    return model


# ---------------------------------------------------------------------------------------------------------------
# Weight-only int8: a C++ kernel (int8_gemv.cpp, AVX-512 VNNI) compiled on first use with torch's cpp_extension.

INT8_KERNEL_FEATURES = ("avx512_f", "avx512_bw", "avx512_vl", "avx512_vnni")
_INT8_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp"]
_int8_kernel: object = None  # the built module, or the reason it is unavailable (str)


def int8_kernel_unsupported() -> str | None:
    """Why this CPU cannot run the int8 kernel, or None when it can."""
    if not hasattr(torch.cpu, "get_capabilities"):
        return "this torch version cannot report the CPU's instruction sets"
    capabilities = torch.cpu.get_capabilities()
    missing = [f for f in INT8_KERNEL_FEATURES if not capabilities.get(f)]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def int8_kernel(verbose: bool = False):
    """The compiled int8 kernel module, or None (with a warning once) where it cannot run or be built.

    It needs a CPU with the AVX-512 VNNI instructions, a C++ compiler and ninja; the build (~30 s) happens once
    and is cached by torch (TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions).
    """
    global _int8_kernel
    if _int8_kernel is None:
        unsupported = int8_kernel_unsupported()
        if unsupported:
            _int8_kernel = unsupported
        else:
            try:
                from torch.utils.cpp_extension import load

                if verbose:
                    print("preparing the int8 CPU kernel (built once in ~30 s, then cached by torch) ...",
                          file=sys.stderr, flush=True)
                _int8_kernel = load("qwen2audio_int8_gemv", [str(Path(__file__).with_name("int8_gemv.cpp"))],
                                    extra_cflags=_INT8_FLAGS, extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler, no ninja, no headers: fall back, saying why
                last = (str(e).strip().splitlines() or [""])[-1]
                _int8_kernel = (f"it could not be built ({type(e).__name__}: {last}); it needs a C++ compiler and "
                                "ninja (pip install ninja)")
        if isinstance(_int8_kernel, str):
            warnings.warn(f"int8 decoding uses torch's _weight_int8pack_mm: the faster int8 CPU kernel is off "
                          f"because {_int8_kernel}", stacklevel=2)
    return None if isinstance(_int8_kernel, str) else _int8_kernel


def int8_product(rows: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """scales * (rows @ weight.T) for a few float rows (n, in) and an int8 weight (out, in); each row is rounded to
    int16 with its own scale first (see int8_gemv.cpp). Compiled code calls it through the custom op below."""
    if torch.compiler.is_compiling():
        return torch.ops.qwen2audio.int8_gemv(rows, weight, scales)
    return int8_kernel().int8_gemv(rows, weight, scales)


@torch.library.custom_op("qwen2audio::int8_gemv", mutates_args=())
def int8_gemv(rows: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return int8_kernel().int8_gemv(rows, weight, scales)


@int8_gemv.register_fake
def _(rows: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])
