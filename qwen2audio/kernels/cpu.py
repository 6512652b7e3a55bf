"""The fast CPU paths as one explicit step of inference: `prepare_for_cpu(model, kernels)` chooses the kernels once,
from what the CPU reports, and swaps the model's layers for the CPU layers of layers.py, which share their
parameters (print(model) shows them; `restore_plain(model)` undoes it). `load()` calls it on CPU.

The choices (`kernels=`, CLI `--kernels`):
  "native"     products in the weights' dtype through torch's kernels, which use AMX / AVX512_BF16 where the CPU
               has them; the decoder's few-row products stream each weight once (StreamingLinear: torch's addmv
               where the CPU has AMX, else the AVX512_BF16 kernel for bf16 where the CPU has it, else the AVX2
               kernel with fp32 sums; see native_rows); int8 decoding through the AVX-512 VNNI kernel where the
               CPU has it, else the AVX2 one, else torch's `_weight_int8pack_mm`; int8 prefill through widened
               blocks (int8 -> bf16 / fp32) and GEMM
  "avx2"       for CPUs without bf16 arithmetic: bf16 / fp16 weights stay as stored and every product computes in
               fp32 with the AVX2 + FMA kernels (Fp32Linear, Fp32Conv1d, Fp32LayerNorm); the decoder's activations
               and KV cache are fp32 (model.activation_dtype); int8 decoding through the AVX2 kernel
  "reference"  nothing swapped: the plain model (F.linear), the specification the others are tested against
  "auto"       (default) "native" where the CPU multiplies the weights' dtype in hardware (bf16: AMX or
               AVX512_BF16), or the weights are fp32; "avx2" on other x86-64 CPUs with AVX2 + FMA; else "native"
"""

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..decoder import Attention
from ..errors import InputError
from .extension import cpu_extension
from .layers import Fp32Conv1d, Fp32LayerNorm, Fp32Linear, Int8CpuLinear, KernelLayer, StreamingLinear
from .products import MAX_SKINNY_ROWS

log = logging.getLogger("qwen2audio")

KERNELS = ("auto", "native", "avx2", "reference")
NARROW = (torch.bfloat16, torch.float16)
# The hardware that multiplies a dtype fast (torch's names for the CPU's features).
HARDWARE = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
VNNI = {"avx512_bw", "avx512_vl", "avx512_vnni"}  # what the AVX-512 int8 kernel needs
BF16_KERNEL = {"avx512_bw", "avx512_vl", "avx512_bf16"}  # what the AVX-512 bf16 kernel needs
_CPUINFO_NAMES = {"fma": "fma3", "avx512f": "avx512_f", "avx512bw": "avx512_bw", "avx512vl": "avx512_vl"}


def cpu_features() -> set[str]:
    """The instruction sets this CPU reports, under torch's names ("avx2", "fma3", "avx512_bf16", "amx_bf16",
    "avx512_vnni", ...): torch.cpu.get_capabilities(), else the flags of /proc/cpuinfo."""
    if hasattr(torch.cpu, "get_capabilities"):
        return {name for name, value in torch.cpu.get_capabilities().items() if value is True}
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return {_CPUINFO_NAMES.get(f, f) for f in flags.split(":", 1)[1].split()}


def check_kernels(kernels: str, device: torch.device = torch.device("cpu")) -> None:
    """The one check of a `kernels` argument: a known choice, and one that applies to the device."""
    if kernels not in KERNELS:
        raise InputError(f"kernels must be one of {', '.join(map(repr, KERNELS))}, got {kernels!r}")
    if kernels not in ("auto", "reference") and device.type != "cpu":
        raise InputError(f"kernels={kernels!r} chooses CPU kernels, but the device is {device}; leave kernels='auto'")


def choose_kernels(kernels: str, features: set[str], dtype: torch.dtype) -> tuple[str, str]:
    """(choice, why) for a `kernels` argument, the CPU's features and the weights' dtype."""
    check_kernels(kernels)
    has_avx2 = {"avx2", "fma3"} <= features
    if kernels == "avx2" and not has_avx2:
        raise InputError("kernels='avx2' needs a CPU with AVX2 and FMA, and this one reports neither or only one; "
                         "use kernels='auto'")
    if kernels != "auto":
        return kernels, "asked for"
    if dtype not in NARROW:
        return "native", f"{dtype} weights: torch's kernels multiply them fast on every CPU"
    hardware = [f for f in HARDWARE[dtype] if f in features]
    if hardware:
        return "native", f"this CPU multiplies {dtype} in hardware ({', '.join(hardware)})"
    if has_avx2:
        return "avx2", f"this CPU has AVX2 + FMA but no {dtype} arithmetic ({' or '.join(HARDWARE[dtype])})"
    return "native", "this CPU has no AVX2 + FMA"


def prepare_for_cpu(model: nn.Module, kernels: str = "auto", verbose: bool = False) -> str:
    """Swap the layers of a Qwen2-Audio model for the CPU layers of `kernels` (see the module docstring), in place;
    returns the choice made. Parameters are shared, never copied. The choice is logged on the "qwen2audio" logger;
    verbose: say on stderr, when it is a terminal, that the C++ kernels load (their first use builds them)."""
    restore_plain(model)
    dtype = model.language_model.model.embed_tokens.weight.dtype
    features = cpu_features()
    choice, why = choose_kernels(kernels, features, dtype)
    has_int8 = any(is_int8_layer(m) for m in model.modules())
    rows, attention = native_rows(features, dtype), decodes_in_kernels(features)
    wanted = choice == "avx2" or (choice == "native" and (has_int8 or rows != "torch" or attention))
    extension = cpu_extension(verbose) if wanted else None
    if choice == "avx2" and extension is None:
        choice, why = "native", "the avx2 kernels could not be built (see the warning)"
    if choice == "avx2":
        count = swap_layers(model, lambda path, m: avx2_layer(m))
        model.activation_dtype = torch.float32 if dtype in NARROW else None  # bf16 in memory, fp32 arithmetic
    elif choice == "native":
        isa, rows = (int8_isa(features), rows) if extension is not None else ("torch", "torch")
        streaming = (rows, streaming_rows_limit(features, dtype, rows))
        count = swap_layers(model, lambda path, m: native_layer(path, m, streaming, isa, extension is not None))
    else:
        count = 0
    attention = extension is not None and (choice == "avx2" or (choice == "native" and attention))
    use_attention_kernel(model, attention)
    log.info(f"CPU kernels: {choice} ({why}); {count} layers swapped; compute dtype {model.dtype}; "
             f"decoding attention: {'the C++ kernel' if attention else 'torch'}")
    return choice


def int8_isa(features: set[str]) -> str:
    """The int8 decoding kernel for a CPU: AVX-512 VNNI, else AVX2 (the same results), else torch's."""
    return "avx512_vnni" if VNNI <= features else "avx2" if {"avx2", "fma3"} <= features else "torch"


def restore_plain(model: nn.Module) -> None:
    """Undo prepare_for_cpu: the plain layers back (sharing the parameters), activations in the weights' dtype."""
    swap_layers(model, lambda path, m: m.plain() if isinstance(m, KernelLayer) else None)
    use_attention_kernel(model, False)
    model.activation_dtype = None


def use_attention_kernel(model: nn.Module, on: bool) -> None:
    """Whether the decoder's attention runs a few cached query rows (decoding) through the C++ kernel, which reads
    the cache once in fp32 (kernels/products.py cached_attention), or through torch's scaled_dot_product_attention."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.cpu_kernel = on


def is_int8_layer(module: nn.Module) -> bool:
    """A weight-only int8 layer (quantize.Int8Linear): an int8 weight (out, in) and per-row scales."""
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dtype == torch.int8 and hasattr(module, "scales")


def avx2_layer(module: nn.Module) -> nn.Module | None:
    narrow = getattr(module, "weight", None) is not None and module.weight.dtype in NARROW
    if type(module) is nn.Linear:
        return Fp32Linear.from_module(module) if narrow else StreamingLinear.from_module(module)
    if type(module) is nn.Conv1d and narrow:
        return Fp32Conv1d.from_module(module)
    if type(module) is nn.LayerNorm and narrow:
        return Fp32LayerNorm.from_module(module)
    if is_int8_layer(module):
        return Int8CpuLinear.from_module(module, "avx2", widen=True)
    return None


def native_rows(features: set[str], dtype: torch.dtype) -> str:
    """The few-row product of "native" bf16 / fp16 layers: torch's addmv where the CPU has AMX (it streams at 82-103%
    of copy bandwidth on a Xeon); else, for bf16 weights on a CPU with AVX512_BF16, that kernel (4-16 rows: 1.3-1.8x
    faster than torch's product on an AMD EPYC Zen 4, which is bound by arithmetic there); else the AVX2 kernel
    (torch's bf16 addmv streamed 1.4-2.9 GB/s on that EPYC and 1.8-2.0 on an AVX2 EPYC, the kernel 24-37 GB/s since
    it prefetches the next rows). Measurements: benchmarks/README.md."""
    if not decodes_in_kernels(features) or dtype not in NARROW:
        return "torch"
    return "avx512_bf16" if dtype == torch.bfloat16 and BF16_KERNEL <= features else "avx2"


def decodes_in_kernels(features: set[str]) -> bool:
    """Whether decoding's few-row work (the products of native_rows, the attention) runs in the C++ kernels: on
    x86-64 CPUs with AVX2 + FMA but no AMX, where torch's paths stay as they were measured. For the attention:
    torch's CPU flash attention took 4-15x longer for one bf16 query row than the kernel (2.5-3x in fp32) on an AMD
    EPYC Zen 4; benchmarks/README.md."""
    return {"avx2", "fma3"} <= features and not any(f.startswith("amx") for f in features)


def streaming_rows_limit(features: set[str], dtype: torch.dtype, rows: str) -> int:
    """The most rows "native" streams (more go to F.linear). For the AVX2 kernel on a CPU that multiplies the dtype
    in hardware, 8: since the kernel prefetches the next weight rows it is faster than torch's product up to 6 rows
    and as fast at 7-8, and torch's is faster at 16 (bf16 on an AMD EPYC Zen 4 with AVX512_BF16, 11008 x 4096:
    4 rows 3.3 ms against 4.8, 8 rows 5.4 against 5.7, 16 rows 10.8 against 7.0; benchmarks/README.md).
    Otherwise 16 (the AVX512_BF16 kernel is faster than torch's product up to 32 rows there)."""
    hardware = any(f in features for f in HARDWARE.get(dtype, ()))
    return 8 if rows == "avx2" and hardware else MAX_SKINNY_ROWS


def native_layer(path: str, module: nn.Module, rows: tuple[str, int], isa: str, widen: bool) -> nn.Module | None:
    if type(module) is nn.Linear and path.startswith("language_model."):  # the decoder: where decoding streams
        return StreamingLinear.from_module(module, *rows)
    if is_int8_layer(module):
        return Int8CpuLinear.from_module(module, isa, widen)
    return None


def swap_layers(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Replace each layer for which make(path, layer) gives a new one (setattr on its parent); returns how many."""
    count = 0
    for parent_path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = make(f"{parent_path}.{name}" if parent_path else name, child)
            if new is not None:
                setattr(parent, name, new)
                count += 1
    return count


def int8_kernel():  # the old name of extension.cpu_extension, still used by tests/test_weights.py: remove with it
    return cpu_extension()
