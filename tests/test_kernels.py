"""Kernels against their plain definitions: the CPU gemv path equals F.linear; rms_norm and rope against math."""

import math

import pytest
import torch
import torch.nn.functional as F

from qwen2audio.kernels import apply_rope, rms_norm, rope_cos_sin
from qwen2audio.kernels.cpu import GemvLinear, gemv_linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_equals_linear(dtype, bias):
    torch.manual_seed(0)
    w = torch.randn(300, 256).to(dtype)
    b = torch.randn(300).to(dtype) if bias else None
    for shape in [(1, 1, 256), (1, 256), (256,), (3, 2, 256), (8, 1, 256), (40, 256)]:  # 1 row, few, many
        x = torch.randn(shape).to(dtype)
        expected, got = F.linear(x, w, b).float(), gemv_linear(x, w, b).float()
        assert got.shape == expected.shape
        # Only the summation order differs: a few fp32 / bf16 roundings of the largest output.
        tol = (2e-6 if dtype == torch.float32 else 2e-2) * expected.abs().max().item()
        assert (got - expected).abs().max().item() <= tol


def test_gemv_linear_keeps_parameters():
    linear = torch.nn.Linear(8, 4)
    before = dict(linear.state_dict())
    linear.__class__ = GemvLinear
    assert linear.state_dict().keys() == before.keys()
    x = torch.randn(1, 1, 8)
    assert torch.allclose(linear(x), F.linear(x, before["weight"], before["bias"]), atol=1e-6)


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


# ---------------------------------------------------------------------------------------------------------------
# The int8 C++ kernel (int8_gemv.cpp): built where the CPU has AVX-512 VNNI, checked against math in float64.

from qwen2audio.kernels.cpu import int8_kernel, int8_kernel_unsupported  # noqa: E402
from qwen2audio.quantize import Int8Linear, quantize_weight  # noqa: E402

needs_vnni = pytest.mark.skipif(int8_kernel_unsupported() is not None,
                                reason=f"the int8 kernel needs AVX-512 VNNI: {int8_kernel_unsupported()}")


@needs_vnni
def test_int8_kernel_builds_where_the_cpu_allows_it():
    assert int8_kernel() is not None  # a CPU with the instructions must get the kernel, not a silent fallback


def int8_reference(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the kernel's math, exact in float64: each row rounded to int16 with scale max|x| / 32767 (fp32, as the
    kernel); an error bound against the unrounded rows: half a rounding step per element, times sum |w| * scale)."""
    x32 = x.float()
    sx = x32.abs().amax(dim=1, keepdim=True) / 32767
    xq = torch.where(sx > 0, torch.round(x32 / torch.where(sx > 0, sx, 1)), 0).double() * sx.double()
    exact = xq @ w.double().T * scales.double()
    bound = (sx.double() / 2) @ (w.double().abs().sum(dim=1) * scales.double().abs())[None]
    return exact, bound


@needs_vnni
@pytest.mark.parametrize("n_in", [32, 77, 4096, 8192 + 40])  # whole 32-lanes, a tail, the 7B width, two int32 chunks
def test_int8_kernel_against_math(n_in):
    g = torch.Generator().manual_seed(n_in)
    out = 4 * 9 + 3  # not a multiple of 4: the last rows take the plain path
    w = torch.randint(-128, 128, (out, n_in), dtype=torch.int8, generator=g)
    scales = torch.rand(out, generator=g) * 0.01
    for n in (1, 2, 3, 16):
        x = torch.randn(n, n_in, generator=g) * torch.logspace(-3, 1, n)[:, None]  # rows of different sizes
        x[:, :5] *= 50  # a few large activations, as real decoder inputs have
        got = torch.ops.qwen2audio.int8_gemv(x, w, scales).double()
        exact, bound = int8_reference(x, w, scales)
        true = x.double() @ w.double().T * scales.double()
        # exact integer sums, scaled in float64, then one rounding to fp32
        assert ((got - exact).abs() <= 2 ** -23 * exact.abs()).all()
        assert ((got - true).abs() <= bound * 1.001 + 1e-6 * true.abs().amax(dim=1, keepdim=True)).all()


@needs_vnni
def test_int8_kernel_edge_values():
    # The largest products in every lane for more than one chunk: int32 sums must not overflow.
    x = torch.full((1, 20000), -3.0)
    for value in (127, -128):
        w = torch.full((4, 20000), value, dtype=torch.int8)
        got = torch.ops.qwen2audio.int8_gemv(x, w, torch.ones(4)).double()
        expected = -3.0 * value * 20000  # x rounds to -32767 * (3 / 32767): exact up to the fp32 scale
        assert ((got - expected).abs() <= 1e-6 * abs(expected)).all()
    zero = torch.zeros(2, 64)  # an all-zero row has no scale: its outputs are zero
    assert torch.equal(torch.ops.qwen2audio.int8_gemv(zero, torch.ones(5, 64, dtype=torch.int8), torch.ones(5)),
                       torch.zeros(2, 5))


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_with_the_kernel_equals_without(dtype):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 300).to(dtype)
    plain = Int8Linear.from_linear(linear)
    fast = Int8Linear.from_linear(linear)
    fast.use_int8_kernel = True
    assert torch.equal(plain.weight, quantize_weight(linear.weight.data)[0])
    for shape in [(1, 1, 256), (4, 256), (2, 8, 256), (40, 256)]:  # decoding rows, and a prefill (no kernel)
        x = torch.randn(shape).to(dtype)
        expected, got = plain(x).float(), fast(x).float()
        tol = (1e-4 if dtype == torch.float32 else 2e-2) * expected.abs().max().item()
        assert got.shape == expected.shape and (got - expected).abs().max().item() <= tol


@needs_vnni
def test_int8_kernel_generates_what_torchs_int8_kernel_generates(tiny_checkpoint):
    import qwen2audio
    from helpers import audio_prompt_ids, left_pad, test_signal
    from qwen2audio.features import audio_token_count, extract_features

    features, frame_mask = extract_features([test_signal(1.0, seed=4), test_signal(2.0, seed=5)])
    rows = [audio_prompt_ids([audio_token_count(int(f))], [[9707, 11], [3555, 374] * (i + 1)])
            for i, f in enumerate(frame_mask.sum(-1).tolist())]
    input_ids, attention_mask = left_pad(rows)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, input_features=features,
                  feature_attention_mask=frame_mask)
    options = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.0, ignore_eos=True)
    fast = qwen2audio.load(tiny_checkpoint, quantize="int8", quiet=True)
    plain = qwen2audio.load(tiny_checkpoint, quantize="int8", cpu_gemv=False, quiet=True)
    assert fast.model.language_model.lm_head.use_int8_kernel and not plain.model.language_model.lm_head.use_int8_kernel
    torch.testing.assert_close(fast.generate(**inputs, **options), plain.generate(**inputs, **options), rtol=0, atol=0)


@pytest.mark.parametrize("failure", ["unsupported cpu", "build error"])
def test_int8_falls_back_to_torchs_kernel_with_a_warning(tiny_checkpoint, monkeypatch, failure):
    import torch.utils.cpp_extension

    import qwen2audio
    import qwen2audio.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "_int8_kernel", None)  # forget the kernel this process may have loaded
    if failure == "unsupported cpu":
        monkeypatch.setattr(cpu, "int8_kernel_unsupported", lambda: "this CPU lacks avx512_vnni")
    else:
        def no_compiler(*args, **kwargs):
            raise RuntimeError("Ninja is required to load C++ extensions")
        monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
        monkeypatch.setattr(cpu, "int8_kernel_unsupported", lambda: None)
    with pytest.warns(UserWarning, match="lacks avx512_vnni" if failure == "unsupported cpu" else "pip install ninja"):
        pipe = qwen2audio.load(tiny_checkpoint, quantize="int8", quiet=True)
    head = pipe.model.language_model.lm_head
    assert isinstance(head, Int8Linear) and not head.use_int8_kernel
    ids = torch.tensor([[9707, 11, 3555]])
    assert pipe.generate(ids, max_new_tokens=3, do_sample=False, ignore_eos=True).shape == (1, 3)
