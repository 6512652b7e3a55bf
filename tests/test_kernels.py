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
