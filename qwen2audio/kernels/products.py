"""Matrix products for the CPU layers of layers.py: rows (n, in) times a weight (out, in), three ways.

- A few rows (decoding, n <= MAX_SKINNY_ROWS): the product is bound by reading the weight once from memory.
  `skinny_product` does it with torch's `addmv` / `addmm` on weight @ rows.T, which stream a weight close to memory
  speed where torch multiplies the weight's dtype fast (F.linear with such skinny inputs reads it up to twice as
  slowly); the C++ kernels (cpu_avx2.cpp, cpu_avx512.cpp) stream bf16, fp16 or int8 weights and widen them in
  registers, for CPUs without fast bf16 arithmetic and for int8.
- Many rows (prefill, the encoder): `widened_product` widens a block of weight rows at a time into one fp32 (or
  bf16) buffer, exactly and at memory speed, and runs torch's GEMM on it while it is in cache. The weights stay as
  they are stored; no full-size widened copy is ever made.
- Under torch.compile the C++ kernels are called through custom ops (below), which compiled code keeps whole. They
  have no backward: the layers call them only when no gradient is needed, as compiled decoding never trains.
"""

import torch
from torch import Tensor

from .extension import cpu_extension

MAX_SKINNY_ROWS = 16  # up to this many rows (decoding a batch), the weight-streaming products are faster
WIDEN_BLOCK_BYTES = 2 * 2**20  # one widened block: fits the L2/L3 cache the GEMM then reads it from


def skinny_product(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows (n, in) @ weight.T + bias for a few rows, in torch: one pass over the weight, as `addmv` / `addmm` on
    weight @ rows.T."""
    if rows.shape[0] == 1:
        out = torch.mv(weight, rows[0]) if bias is None else torch.addmv(bias, weight, rows[0])
        return out[None]
    out = torch.mm(weight, rows.T) if bias is None else torch.addmm(bias[:, None], weight, rows.T)  # (out, n)
    return out.T.contiguous()


def streamed_rows(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """skinny_product, through its custom op when compiling (compiled code would otherwise generate its own, slower,
    reduction loops for it)."""
    if torch.compiler.is_compiling():
        return torch.ops.qwen2audio.skinny_product(rows, weight, bias)
    return skinny_product(rows, weight, bias)


def float_rows(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows (n, in) @ weight.T + bias in fp32 for a bf16 / fp16 weight, widened in registers (AVX2); (n, out) fp32."""
    if torch.compiler.is_compiling():
        return torch.ops.qwen2audio.float_rows(rows, weight, bias)
    return cpu_extension().float_linear_avx2(rows, weight, bias)


def int8_rows(rows: Tensor, weight: Tensor, scales: Tensor, isa: str) -> Tensor:
    """scales * (rows @ weight.T) for an int8 weight, in rows' dtype; each row is rounded to int16 with its own
    scale first (see cpu_ops.cpp). isa: "avx2" or "avx512_vnni", which give the same results, bit for bit."""
    if torch.compiler.is_compiling():
        return torch.ops.qwen2audio.int8_rows(rows, weight, scales, isa)
    return cpu_extension().int8_linear(rows, weight, scales, isa)


def widened_product(rows: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """rows (M, in) @ weight.T computed in `dtype` (fp32; bf16 for an int8 weight) for a weight stored narrower
    (bf16, fp16, int8): each block of weight rows is widened exactly into one reused buffer, then multiplied."""
    widen = cpu_extension().widen
    out_features, in_features = weight.shape
    block_rows = max(8, WIDEN_BLOCK_BYTES // (in_features * dtype.itemsize))
    rows = rows.to(dtype)
    y = rows.new_empty(rows.shape[0], out_features)  # (M, out)
    buffer = rows.new_empty(min(block_rows, out_features), in_features)
    for start in range(0, out_features, block_rows):
        block = buffer[:min(block_rows, out_features - start)]  # (b, in)
        widen(weight[start:start + block.shape[0]], block)
        torch.mm(rows, block.T, out=y[:, start:start + block.shape[0]])  # written in place, column block of y
    return y


def widened(weight: Tensor) -> Tensor:
    """A whole bf16 / fp16 / int8 weight widened to fp32 exactly, at memory speed (for small weights only)."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    cpu_extension().widen(weight.contiguous(), out)
    return out


# The same C++ kernels as custom ops, for torch.compile. Eager code calls the functions above directly: a custom
# op's first call imports ~800 modules (1-2 s).
@torch.library.custom_op("qwen2audio::float_rows", mutates_args=())
def _float_rows_op(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return cpu_extension().float_linear_avx2(rows, weight, bias)


@_float_rows_op.register_fake
def _(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0], dtype=torch.float32)


@torch.library.custom_op("qwen2audio::int8_rows", mutates_args=())
def _int8_rows_op(rows: Tensor, weight: Tensor, scales: Tensor, isa: str) -> Tensor:
    return cpu_extension().int8_linear(rows, weight, scales, isa)


@_int8_rows_op.register_fake
def _(rows: Tensor, weight: Tensor, scales: Tensor, isa: str) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


@torch.library.custom_op("qwen2audio::skinny_product", mutates_args=())
def _skinny_product_op(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return skinny_product(rows, weight, bias)


@_skinny_product_op.register_fake
def _(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])
