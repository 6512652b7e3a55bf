"""Each kernel against its plain definition, wherever it can run: the numeric kernels (reference.py) against math;
the C++ CPU kernels (cpu_avx2.cpp, cpu_avx512.cpp) against float64 math with stated bounds; the torch products
(products.py) against F.linear. The AVX2 kernels run on every x86-64 CPU with AVX2 + FMA, AVX-512 ones included;
a kernel this CPU cannot run is skipped with the reason. Layers, the choice and the model: test_cpu_layers.py."""

import math

import pytest
import torch
import torch.nn.functional as F

from qwen2audio.kernels import apply_rope, rms_norm, rope_cos_sin
from qwen2audio.kernels.cpu import cpu_features
from qwen2audio.kernels.extension import cpu_extension, unavailable_reason
from qwen2audio.kernels.products import skinny_product, widened_product

U = 2.0 ** -24  # fp32 unit roundoff


def test_rms_norm_and_rope_against_math():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    w = torch.randn(16)
    expected = w * x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(rms_norm(x, w, 1e-5), expected, atol=1e-6)
    # RoPE rotates each (i, i + d/2) pair by angle pos * theta^(-2i/d): norms are kept, angles add up.
    positions = torch.tensor([[0, 1, 7]])
    cos, sin = rope_cos_sin(positions, 8, 10000.0)
    q = torch.randn(1, 1, 3, 8)
    rotated = apply_rope(q, cos[:, None], sin[:, None])
    assert torch.allclose(rotated[..., 0, :], q[..., 0, :])  # position 0: identity
    assert torch.allclose(rotated.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    angle = 7 * 10000.0 ** (-2 * 1 / 8)  # pair i = 1 at position 7
    a, b = q[0, 0, 2, 1], q[0, 0, 2, 5]
    assert torch.allclose(rotated[0, 0, 2, 1], a * math.cos(angle) - b * math.sin(angle), atol=1e-5)
    assert torch.allclose(rotated[0, 0, 2, 5], b * math.cos(angle) + a * math.sin(angle), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_product_equals_linear(dtype, bias):
    torch.manual_seed(0)
    w = torch.randn(300, 256).to(dtype)
    b = torch.randn(300).to(dtype) if bias else None
    for n in (1, 3, 16):
        x = torch.randn(n, 256).to(dtype)
        expected, got = F.linear(x, w, b).float(), skinny_product(x, w, b).float()
        assert got.shape == expected.shape == (n, 300)
        # Only the summation order differs: a few fp32 / bf16 roundings of the largest output.
        tol = (2e-6 if dtype == torch.float32 else 2e-2) * expected.abs().max().item()
        assert (got - expected).abs().max().item() <= tol


# ---------------------------------------------------------------------------------------------------------------
# The C++ kernels. Each needs the extension (a C++ compiler and ninja) and its instruction set.

def _missing(*features: str) -> str | None:
    why = unavailable_reason()
    if why:
        return why
    missing = [f for f in features if f not in cpu_features()]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


AVX2_MISSING = _missing("avx2", "fma3", "f16c")
VNNI_MISSING = _missing("avx2", "fma3", "avx512_bw", "avx512_vl", "avx512_vnni")
BF16_MISSING = _missing("avx2", "fma3", "avx512_bw", "avx512_vl", "avx512_bf16")
needs_bf16_kernel = pytest.mark.skipif(BF16_MISSING is not None,
                                       reason=f"the AVX512_BF16 kernel cannot run: {BF16_MISSING}")
needs_avx2 = pytest.mark.skipif(AVX2_MISSING is not None, reason=f"the AVX2 kernels cannot run: {AVX2_MISSING}")
ISAS = [pytest.param("avx2", marks=needs_avx2),
        pytest.param("avx512_vnni", marks=pytest.mark.skipif(VNNI_MISSING is not None,
                                                             reason=f"the VNNI kernel cannot run: {VNNI_MISSING}"))]


@needs_avx2
def test_the_extension_builds_where_the_cpu_can_run_it():
    assert cpu_extension() is not None  # a CPU with the instructions must get the kernels, not a silent fallback


def float_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """First-order error bound of the AVX2 kernel's fp32 arithmetic: 8 lanes each add in/8 products by FMA (one
    rounding per step), a 3-step lane sum, up to 7 tail products (2 roundings each), the bias: at most
    (in/8 + 18) roundings of the sum of |x w| (and |b|)."""
    magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    return (x.shape[1] / 8 + 18) * U * magnitude


@needs_avx2
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_in", [7, 77, 4096])  # tail only, 8-lanes + tail, the 7B's width
def test_float_rows_against_float64(weight_dtype, n_in):
    g = torch.Generator().manual_seed(n_in)
    w = torch.randn(4 * 9 + 3, n_in, generator=g).to(weight_dtype)  # 39 rows: blocks of 4 and a tail of 3
    check_rows_kernel(cpu_extension().float_linear_avx2, w, [(1, True), (2, False), (3, True), (16, True)],
                      torch.float32, float_bound, g)


def check_rows_kernel(kernel, w: torch.Tensor, cases: list[tuple[int, bool]], x_dtype: torch.dtype, bound,
                      g: torch.Generator) -> None:
    """kernel(x, w, b) against float64 math within bound(x, w, b), for each (n rows, with a bias) of `cases`: rows
    of different sizes, in x_dtype."""
    for n, with_bias in cases:
        x = (torch.randn(n, w.shape[1], generator=g) * torch.logspace(-3, 2, n)[:, None]).to(x_dtype)
        b = torch.randn(w.shape[0], generator=g) if with_bias else None
        got = kernel(x, w, b)
        exact = x.double() @ w.double().T + (0 if b is None else b.double())
        assert got.dtype == torch.float32 and got.shape == (n, w.shape[0])
        assert ((got.double() - exact).abs() <= bound(x, w, b)).all()


@needs_avx2
def test_float_rows_take_bf16_rows_and_bias():
    # Activation rows and bias in bf16 are widened first: the same as passing them in fp32.
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 50, generator=g).bfloat16()
    x, b = torch.randn(2, 50, generator=g).bfloat16(), torch.randn(20, generator=g).bfloat16()
    ext = cpu_extension()
    assert torch.equal(ext.float_linear_avx2(x, w, b), ext.float_linear_avx2(x.float(), w, b.float()))


def bf16_bound(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """First-order error bound of the AVX512_BF16 kernel: products of bf16 pairs are exact in fp32; each of 16 lanes
    adds in/16 of them one at a time (vdpbf16ps rounds after each of its two additions), then a 4-step lane sum and
    the bias: at most (in/16 + 7) roundings of the sum of |x w| (and |b|). (The instruction also treats subnormal
    inputs and results as zero, which these magnitudes never produce.)"""
    magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    return (x.shape[1] / 16 + 7) * U * magnitude


@needs_bf16_kernel
@pytest.mark.parametrize("n_in", [7, 77, 4096])  # tail only, 32-element steps + tail, the 7B's width
def test_bf16_rows_against_float64(n_in):
    g = torch.Generator().manual_seed(n_in)
    w = torch.randn(4 * 9 + 3, n_in, generator=g).bfloat16()  # 39 rows: blocks of 4 and a tail of 3
    cases = [(1, True), (2, False), (3, True), (4, False), (7, True), (16, True)]  # groups of 4 rows, and tails
    check_rows_kernel(cpu_extension().bf16_linear_avx512, w, cases, torch.bfloat16, bf16_bound, g)


@needs_bf16_kernel
def test_bf16_rows_round_other_rows_to_bf16_first():
    # fp32 rows are rounded to bf16 (the kernel multiplies bf16 pairs); a bf16 bias is widened exactly.
    g = torch.Generator().manual_seed(4)
    w = torch.randn(20, 50, generator=g).bfloat16()
    x, b = torch.randn(2, 50, generator=g), torch.randn(20, generator=g).bfloat16()
    ext = cpu_extension()
    assert torch.equal(ext.bf16_linear_avx512(x, w, b), ext.bf16_linear_avx512(x.bfloat16(), w, b.float()))
    with pytest.raises(RuntimeError, match="bf16 weight expected"):
        ext.bf16_linear_avx512(x, w.half(), None)


@needs_avx2
@pytest.mark.parametrize("src, dst", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                      (torch.int8, torch.float32), (torch.int8, torch.bfloat16)])
def test_widen_is_exact(src, dst):
    g = torch.Generator().manual_seed(0)
    if src == torch.int8:
        values = torch.cat([torch.arange(-128, 128), torch.randint(-128, 128, (1000,), generator=g)]).to(torch.int8)
    else:  # normal numbers, subnormals, zeros of both signs, infinities, NaN
        info = torch.finfo(src)
        special = torch.tensor([0.0, -0.0, info.tiny, info.tiny / 4, -info.tiny / 8, info.max, -info.max,
                                math.inf, -math.inf, math.nan])
        values = torch.cat([special, torch.randn(1000, generator=g) * 100]).to(src)
    for count in (1, 7, 8, 15, 16, 17, values.numel()):  # vector widths and every tail
        out = torch.full((count,), 7.0, dtype=dst)
        cpu_extension().widen(values[:count], out)
        torch.testing.assert_close(out, values[:count].to(dst), rtol=0, atol=0, equal_nan=True)


@needs_avx2
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.int8])
def test_widened_product_against_float64(monkeypatch, weight_dtype):
    import qwen2audio.kernels.products as products

    monkeypatch.setattr(products, "WIDEN_BLOCK_BYTES", 1)  # the smallest blocks, 16 rows: two full and a partial one
    g = torch.Generator().manual_seed(1)
    w = torch.randn(38, 96, generator=g).to(weight_dtype) if weight_dtype != torch.int8 else \
        torch.randint(-128, 128, (38, 96), dtype=torch.int8, generator=g)
    x = torch.randn(40, 96, generator=g)
    got = widened_product(x, w, torch.float32)
    exact = x.double() @ w.double().T
    assert got.shape == (40, 38) and ((got.double() - exact).abs() <= float_bound(x, w, None)).all()
    if weight_dtype == torch.int8:  # int8 widened to bf16 for a bf16 GEMM: the integers are exact there too
        got = widened_product(x.bfloat16(), w, torch.bfloat16)
        torch.testing.assert_close(got, F.linear(x.bfloat16(), w.bfloat16()), rtol=0, atol=0)


# -- int8: the AVX2 and AVX-512 VNNI kernels compute the same exact integer sums.

def int8_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kernels' math, exact in float64: each row rounded to int16 with scale max|x| / 32767 (fp32, as the
    kernels); an error bound against the unrounded rows: half a rounding step per element, times sum |w| * scale)."""
    x32 = x.float()
    sx = x32.abs().amax(dim=1, keepdim=True) / 32767
    xq = torch.where(sx > 0, torch.round(x32 / torch.where(sx > 0, sx, 1)), 0).double() * sx.double()
    exact = xq @ w.double().T * scales.double()
    bound = (sx.double() / 2) @ (w.double().abs().sum(dim=1) * scales.double().abs())[None]
    return exact, bound


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n_in", [32, 77, 4096, 8192 + 40])  # whole vectors, a tail, the 7B width, two chunks
def test_int8_kernel_against_math(isa, n_in):
    g = torch.Generator().manual_seed(n_in)
    out = 4 * 9 + 3  # not a multiple of 4: the last rows take the one-row path
    w = torch.randint(-128, 128, (out, n_in), dtype=torch.int8, generator=g)
    scales = torch.rand(out, generator=g) * 0.01
    for n in (1, 2, 3, 16):
        x = torch.randn(n, n_in, generator=g) * torch.logspace(-3, 1, n)[:, None]  # rows of different sizes
        x[:, :5] *= 50  # a few large activations, as real decoder inputs have
        got = cpu_extension().int8_linear(x, w, scales, isa).double()
        exact, bound = int8_reference(x, w, scales)
        true = x.double() @ w.double().T * scales.double()
        # exact integer sums, scaled in float64, then one rounding to fp32
        assert ((got - exact).abs() <= 2 ** -23 * exact.abs()).all()
        assert ((got - true).abs() <= bound * 1.001 + 1e-6 * true.abs().amax(dim=1, keepdim=True)).all()


@pytest.mark.parametrize("isa", ISAS)
def test_int8_kernel_edge_values(isa):
    # The largest products in every lane over more than one chunk: the int32 sums must not overflow.
    x = torch.full((1, 20000), -3.0)
    for value in (127, -128):
        w = torch.full((4, 20000), value, dtype=torch.int8)
        got = cpu_extension().int8_linear(x, w, torch.ones(4), isa).double()
        expected = -3.0 * value * 20000  # x rounds to -32767 * (3 / 32767): exact up to the fp32 scale
        assert ((got - expected).abs() <= 1e-6 * abs(expected)).all()
    zero = torch.zeros(2, 64)  # an all-zero row has no scale: its outputs are zero
    got = cpu_extension().int8_linear(zero, torch.ones(5, 64, dtype=torch.int8), torch.ones(5), isa)
    assert torch.equal(got, torch.zeros(2, 5))


@pytest.mark.skipif(VNNI_MISSING is not None, reason=f"the VNNI kernel cannot run: {VNNI_MISSING}")
def test_int8_kernels_agree_bit_for_bit():
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-128, 128, (37, 4100), dtype=torch.int8, generator=g)
    x, scales = torch.randn(5, 4100, generator=g).bfloat16(), torch.rand(37, generator=g).bfloat16()
    ext = cpu_extension()
    avx2, vnni = ext.int8_linear(x, w, scales, "avx2"), ext.int8_linear(x, w, scales, "avx512_vnni")
    assert avx2.dtype == torch.bfloat16 and torch.equal(avx2, vnni)


def attention_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """First-order error bound of the attention kernel's fp32 arithmetic, per query row: each score is a sum of D
    products in 2 x 8 lanes (D/8 + 6 roundings of sum |q k| scale), which exp turns into that relative error of
    each weight, doubled by the normalisation; then S FMA steps per output, one rounding each, and the division."""
    qk = q.double().abs() @ k.double().abs().transpose(-1, -2) * scale  # (B, H, T, S)
    score_error = ((q.shape[-1] / 8 + 6) * U * qk).amax(-1, keepdim=True) + 4 * U
    return (2 * score_error + (k.shape[-2] + 4) * U) * v.double().abs().amax((-2, -1), keepdim=True)


@needs_avx2
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads, kv_heads, T, S, D", [(4, 4, 1, 37, 128), (8, 2, 3, 50, 24), (2, 1, 16, 9, 8)])
def test_attention_kernel_against_float64(dtype, heads, kv_heads, T, S, D):
    g = torch.Generator().manual_seed(S)
    B = 3
    cache_k, cache_v = (torch.randn(B, kv_heads, S + 5, D, generator=g).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # views of a longer cache, as decoding passes them
    q = (torch.randn(B, heads, T, D, generator=g) * 2).to(dtype)
    masks = [None, torch.rand(B, 1, T, S, generator=g) > 0.4, torch.rand(1, 1, T, S, generator=g) > 0.4]
    for mask in masks:
        if mask is not None:
            mask[..., 0] = True  # every row may attend to something
        got = cpu_extension().attend(q, k, v, mask, D ** -0.5)
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                               scale=D ** -0.5, enable_gqa=True)
        assert got.dtype == torch.float32 and got.shape == (B, heads, T, D)
        group = heads // kv_heads  # each kv head serves `group` query heads
        bound = attention_bound(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), D ** -0.5)
        assert ((got.double() - exact).abs() <= bound).all()


@needs_avx2
def test_attention_kernel_edges():
    ext = cpu_extension()
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    mask = torch.tensor([[True, False, False, False], [False, False, False, False]])[None, None]
    out = ext.attend(q, k, v, mask, 1.0)
    assert torch.allclose(out[:, :, 0], v[:, :, 0], atol=1e-6)  # one key allowed: its value exactly
    assert torch.equal(out[:, :, 1], torch.zeros(1, 2, 8))  # no key allowed: zeros (SDPA would give NaN)
    q[0, 0, 0, 3] = math.nan  # a NaN (or an overflow) anywhere in a row's scores makes the row NaN, never hidden
    assert ext.attend(q, k, v, None, 1.0)[0, 0, 0].isnan().all()
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ext.attend(torch.randn(1, 1, 1, 12), torch.randn(1, 1, 3, 12), torch.randn(1, 1, 3, 12), None, 1.0)
    with pytest.raises(RuntimeError, match="contiguous rows"):
        columns = torch.randn(1, 2, 8, 4).transpose(-1, -2)  # (1, 2, 4, 8) with rows of stride 4
        ext.attend(q, columns, columns, None, 1.0)
