"""Matrix products for the CPU layers of layers.py: rows (n, in) times a weight (out, in), three ways.

- A few rows (decoding, n <= MAX_SKINNY_ROWS): the product is bound by reading the weight once from memory.
  `skinny_product` does it with torch's `addmv` / `addmm` on weight @ rows.T, which stream a weight close to memory
  speed where torch multiplies the weight's dtype fast (F.linear with such skinny inputs reads it up to twice as
  slowly); the C++ kernels (cpu_avx2.cpp, cpu_avx512.cpp) stream bf16, fp16 or int8 weights and widen them in
  registers, for CPUs without fast bf16 arithmetic and for int8, or multiply bf16 pairs with AVX512_BF16.
- Many rows (prefill, the encoder): `widened_product` has each thread widen blocks of weight rows into its own fp32
  (or bf16) buffer, exactly and at memory speed, and run torch's GEMM on each while it is in cache. The weights stay
  as they are stored; no full-size widened copy is ever made.
- Under torch.compile the C++ kernels are called through custom ops (below), which compiled code keeps whole. They
  have no backward: the layers call them only when no gradient is needed, as compiled decoding never trains.
"""

import torch
from torch import Tensor

from .extension import cpu_extension

MAX_SKINNY_ROWS = 16  # up to this many rows (decoding a batch), the weight-streaming products are faster
WIDEN_BLOCK_BYTES = 4 * 2**20  # the most one thread widens at a time (fastest of 1-4 MB on Zen 4, 1 MB L2)


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


def bf16_rows(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """rows (n, in) @ weight.T + bias for bf16 rows and a bf16 weight: exact products, fp32 sums (AVX512_BF16, four
    rows per weight load); (n, out) fp32."""
    if torch.compiler.is_compiling():
        return torch.ops.qwen2audio.bf16_rows(rows, weight, bias)
    return cpu_extension().bf16_linear_avx512(rows, weight, bias)


def int8_rows(rows: Tensor, weight: Tensor, scales: Tensor, isa: str) -> Tensor:
    """scales * (rows @ weight.T) for an int8 weight, in rows' dtype; each row is rounded to int16 with its own
    scale first (see cpu_ops.cpp). isa: "avx2" or "avx512_vnni", which give the same results, bit for bit."""
    if torch.compiler.is_compiling():
        return torch.ops.qwen2audio.int8_rows(rows, weight, scales, isa)
    return cpu_extension().int8_linear(rows, weight, scales, isa)


def widened_product(rows: Tensor, weight: Tensor, dtype: torch.dtype) -> Tensor:
    """rows (M, in) @ weight.T computed in `dtype` (fp32; bf16 for an int8 weight) for a weight stored narrower
    (bf16, fp16, int8): each thread widens blocks of weight rows exactly into its own buffer and multiplies them
    there (cpu_ops.cpp widened_mm), so the GEMM reads each block from cache and no full-size copy is made."""
    out_features, in_features = weight.shape
    per_thread = -(-out_features // (4 * torch.get_num_threads()))  # at least 4 blocks per thread: balanced
    block_rows = min(WIDEN_BLOCK_BYTES // (in_features * dtype.itemsize), per_thread)
    block_rows = max(16, block_rows // 16 * 16)  # whole cache lines of y per thread
    return cpu_extension().widened_mm(rows.to(dtype).contiguous(), weight, block_rows)


def widened(weight: Tensor) -> Tensor:
    """A whole bf16 / fp16 / int8 weight widened to fp32 exactly, at memory speed (for small weights only)."""
    out = torch.empty(weight.shape, dtype=torch.float32)
    cpu_extension().widen(weight.contiguous(), out)
    return out


def cached_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """softmax(scale * q @ k.T, where mask) @ v for a few query rows q (B, heads, T, head_dim) over a key / value
    cache k, v (B, kv_heads, S, head_dim), in fp32, in q's dtype. Bound by reading the cache once per query row, as
    decoding is by reading the weights (torch's CPU flash attention took 4-15x longer at one bf16 query row)."""
    return cpu_extension().attend(q, k, v, mask, scale).to(q.dtype)


# The same C++ kernels as custom ops, for torch.compile. Eager code calls the functions above directly: a custom
# op's first call imports ~800 modules (1-2 s).
@torch.library.custom_op("qwen2audio::float_rows", mutates_args=())
def _float_rows_op(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return cpu_extension().float_linear_avx2(rows, weight, bias)


@torch.library.custom_op("qwen2audio::bf16_rows", mutates_args=())
def _bf16_rows_op(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return cpu_extension().bf16_linear_avx512(rows, weight, bias)


@_float_rows_op.register_fake
@_bf16_rows_op.register_fake
def _(rows: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # both kernels return fp32 sums
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
